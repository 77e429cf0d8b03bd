package vhdx

import (
	"fmt"

	"github.com/google/uuid"
)

// Info is the JSON-tagged summary printed by `vhost-vhdx info`.
type Info struct {
	VirtualSize        uint64    `json:"virtual_size"`
	Type               ImageType `json:"type"`
	BlockSize          uint32    `json:"block_size"`
	LogicalSectorSize  uint32    `json:"logical_sector_size"`
	PhysicalSectorSize uint32    `json:"physical_sector_size"`
	FileSize           int64     `json:"file_size"` // -1 if the size could not be read
	AllocatedBytes     int64     `json:"allocated_bytes"`
	DiskID             uuid.UUID `json:"disk_id"`
	FileWriteGUID      uuid.UUID `json:"file_write_guid"`
	DataWriteGUID      uuid.UUID `json:"data_write_guid"`
	LogGUID            uuid.UUID `json:"log_guid"`
	LogOffset          uint64    `json:"log_offset"`
	LogLength          uint32    `json:"log_length"`
	LogReplayed        bool      `json:"log_replayed"` // this open replayed the log
	Creator            string    `json:"creator"`
}

// Info summarises the image. The header fields are those of the current
// header, which changes when a write session starts and on Close.
func (im *Image) Info() Info {
	im.mu.Lock()
	h := im.l.hdr
	im.mu.Unlock()
	fs, err := im.s.Size()
	if err != nil {
		fs = -1
	}
	return Info{
		VirtualSize:        im.l.size,
		Type:               im.imageType(),
		BlockSize:          im.l.blockSize,
		LogicalSectorSize:  im.l.logicalSector,
		PhysicalSectorSize: im.l.physicalSector,
		FileSize:           fs,
		AllocatedBytes:     int64(im.allocated.Load()) * int64(im.l.blockSize),
		DiskID:             im.l.diskID,
		FileWriteGUID:      h.fileWriteGUID,
		DataWriteGUID:      h.dataWriteGUID,
		LogGUID:            h.logGUID,
		LogOffset:          h.logOffset,
		LogLength:          h.logLength,
		LogReplayed:        im.logReplayed,
		Creator:            im.l.creator,
	}
}

// Extent is a run of the virtual disk that is either stored in the file
// (Data, at FileOffset) or reads as zeros (FileOffset 0).
type Extent struct {
	Offset     int64
	Length     int64
	FileOffset int64
	Data       bool
}

// Extents lists the virtual disk as merged runs of data and zeros; adjacent
// data blocks merge only when they are also contiguous in the file.
func (im *Image) Extents() ([]Extent, error) {
	if im.closed.Load() {
		return nil, fmt.Errorf("extents: %w", ErrClosed)
	}
	var out []Extent
	bs := uint64(im.l.blockSize)
	for b := uint64(0); b < im.l.payloadBlocks; b++ {
		e := im.bat[batIndex(b, im.l.chunkRatio)].Load()
		start := b * bs
		ext := Extent{Offset: int64(start), Length: int64(min(bs, im.l.size-start))}
		if batState(e) == stateFullyPresent {
			ext.Data, ext.FileOffset = true, int64(batFileOffset(e))
		}
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.Data == ext.Data && (!ext.Data || last.FileOffset+last.Length == ext.FileOffset) {
				last.Length += ext.Length
				continue
			}
		}
		out = append(out, ext)
	}
	return out, nil
}
