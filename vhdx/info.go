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
	// HostAllocatedBytes is what the file occupies on the host file system
	// (st_blocks × 512, hostalloc.go): less than FileSize for a sparse
	// file, the space discards gave back; -1 when unknown.
	HostAllocatedBytes int64     `json:"host_allocated_bytes"`
	DiskID             uuid.UUID `json:"disk_id"`
	FileWriteGUID      uuid.UUID `json:"file_write_guid"`
	DataWriteGUID      uuid.UUID `json:"data_write_guid"`
	LogGUID            uuid.UUID `json:"log_guid"`
	LogOffset          uint64    `json:"log_offset"`
	LogLength          uint32    `json:"log_length"`
	LogReplayed        bool      `json:"log_replayed"` // this open replayed the log
	Creator            string    `json:"creator"`
	// Differencing images: the parent as opened (its path; "" when not
	// attached) and the locator's parent_linkage.
	ParentPath    string    `json:"parent_path,omitempty"`
	ParentLinkage uuid.UUID `json:"parent_linkage,omitempty,omitzero"`
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
	var parentPath string
	var linkage uuid.UUID
	if im.parent != nil {
		parentPath = im.parent.path
	}
	if im.l.hasParent {
		im.mu.Lock()
		linkage = im.l.locator.linkage
		im.mu.Unlock()
	}
	return Info{
		VirtualSize:        im.l.size,
		Type:               im.imageType(),
		BlockSize:          im.l.blockSize,
		LogicalSectorSize:  im.l.logicalSector,
		PhysicalSectorSize: im.l.physicalSector,
		FileSize:           fs,
		AllocatedBytes:     int64(im.allocated.Load()) * int64(im.l.blockSize),
		HostAllocatedBytes: im.hostAllocated(),
		DiskID:             im.l.diskID,
		FileWriteGUID:      h.fileWriteGUID,
		DataWriteGUID:      h.dataWriteGUID,
		LogGUID:            h.logGUID,
		LogOffset:          h.logOffset,
		LogLength:          h.logLength,
		LogReplayed:        im.logReplayed,
		Creator:            im.l.creator,
		ParentPath:         parentPath,
		ParentLinkage:      linkage,
	}
}

// BackingChain returns Info for this image and each layer below it, top
// first.
func (im *Image) BackingChain() []Info {
	var out []Info
	for l := im; l != nil; l = l.parent {
		out = append(out, l.Info())
	}
	return out
}

// Extent is a run of the virtual disk that is either stored in a file of
// the chain (Data, at FileOffset of layer Layer: 0 this image, 1 its parent,
// ...) or reads as zeros (FileOffset 0, Layer -1).
type Extent struct {
	Offset     int64 `json:"offset"`
	Length     int64 `json:"length"`
	FileOffset int64 `json:"file_offset"`
	Data       bool  `json:"data"`
	Layer      int   `json:"layer"`
}

// appendExtent adds ext to out, merging it with the last extent when both
// are zeros, or data of the same layer contiguous in the file.
func appendExtent(out []Extent, ext Extent) []Extent {
	if n := len(out); n > 0 {
		last := &out[n-1]
		if last.Offset+last.Length == ext.Offset && last.Data == ext.Data && last.Layer == ext.Layer &&
			(!ext.Data || last.FileOffset+last.Length == ext.FileOffset) {
			last.Length += ext.Length
			return out
		}
	}
	return append(out, ext)
}

// Extents lists the virtual disk as merged runs of what the chain reads:
// data (with the layer and file offset it comes from) and zeros; adjacent
// data merges only when it is of the same layer and contiguous in its file.
func (im *Image) Extents() ([]Extent, error) {
	if im.closed.Load() {
		return nil, fmt.Errorf("extents: %w", ErrClosed)
	}
	return im.chainExtents(nil, 0, im.l.size, 0)
}

// chainExtents appends the extents of [start, end) as seen through this
// layer, which is layer depth below the top.
func (im *Image) chainExtents(out []Extent, start, end uint64, depth int) ([]Extent, error) {
	var below func(out []Extent, pos, n uint64) ([]Extent, error)
	if im.parent != nil {
		below = func(out []Extent, pos, n uint64) ([]Extent, error) {
			return im.parent.chainExtents(out, pos, pos+n, depth+1)
		}
	}
	return im.fileExtents(out, start, end, depth, below)
}

// LayerExtents lists what THIS file defines, ignoring the layers below:
// Data (Layer 0, at FileOffset) where the file holds the sectors
// (FULLY_PRESENT, or PARTIALLY_PRESENT with the bitmap bit set); Layer -1
// (no data) where this file defines zeros (ZERO, UNDEFINED, UNMAPPED; in a
// base image also NOT_PRESENT); Layer 1 (no data) where a differencing image
// leaves the sectors to its parent. A merge copies the Data runs and the
// Layer -1 runs (as zeros) of a child into its parent.
func (im *Image) LayerExtents() ([]Extent, error) {
	if im.closed.Load() {
		return nil, fmt.Errorf("extents: %w", ErrClosed)
	}
	var below func(out []Extent, pos, n uint64) ([]Extent, error)
	if im.l.hasParent {
		below = func(out []Extent, pos, n uint64) ([]Extent, error) {
			return appendExtent(out, Extent{Offset: int64(pos), Length: int64(n), Layer: 1}), nil
		}
	}
	return im.fileExtents(nil, 0, im.l.size, 0, below)
}

// fileExtents appends the extents of [start, end) as this file defines
// them, its data at layer depth; below, when not nil, appends the runs the
// file leaves to the layers below (NOT_PRESENT blocks, §2.5.1.1, and clear
// bits of PARTIALLY_PRESENT ones, §2.4), which are zeros otherwise.
func (im *Image) fileExtents(out []Extent, start, end uint64, depth int, below func(out []Extent, pos, n uint64) ([]Extent, error)) ([]Extent, error) {
	for pos := start; pos < end; {
		_, e, in, left := im.locate(pos)
		n := min(left, end-pos)
		off := batFileOffset(e) + in
		switch st := batState(e); {
		case st == stateFullyPresent:
			out = appendExtent(out, Extent{Offset: int64(pos), Length: int64(n), FileOffset: int64(off), Data: true, Layer: depth})
		case st == stateNotPresent && below != nil:
			var err error
			if out, err = below(out, pos, n); err != nil {
				return nil, err
			}
		case st == statePartiallyPresent && im.l.hasParent:
			err := im.bitmapRuns(pos, n, func(at, k uint64, set bool) (err error) {
				switch {
				case set:
					out = appendExtent(out, Extent{Offset: int64(at), Length: int64(k), FileOffset: int64(off + at - pos), Data: true, Layer: depth})
				case below != nil:
					out, err = below(out, at, k)
				default:
					out = appendExtent(out, Extent{Offset: int64(at), Length: int64(k), Layer: -1})
				}
				return err
			})
			if err != nil {
				return nil, err
			}
		default:
			out = appendExtent(out, Extent{Offset: int64(pos), Length: int64(n), Layer: -1})
		}
		pos += n
	}
	return out, nil
}
