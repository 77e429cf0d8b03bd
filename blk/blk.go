package blk

import (
	"errors"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// SectorSize is the unit of the request header's sector field and of the
// capacity config field. It is 512 whatever the disk's logical sector size
// (VIRTIO 1.2 §5.2.6: "sector ... is always 512 bytes").
const (
	SectorSize  = 512
	sectorShift = 9
)

// Request types (VIRTIO 1.2 §5.2.6).
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeDiscard     = 11
	TypeWriteZeroes = 13
)

// Status values written to the last device-writable byte (VIRTIO 1.2 §5.2.6).
const (
	StatusOK     uint8 = 0
	StatusIOErr  uint8 = 1
	StatusUnsupp uint8 = 2
)

// Feature bit numbers of the virtio-blk device (VIRTIO 1.2 §5.2.3).
// Transport bits (VERSION_1, ring features) belong to the vhost-user layer.
const (
	FeatureSizeMax     = 1
	FeatureSegMax      = 2
	FeatureRO          = 5
	FeatureBlkSize     = 6
	FeatureFlush       = 9
	FeatureTopology    = 10
	FeatureConfigWCE   = 11
	FeatureMQ          = 12
	FeatureDiscard     = 13
	FeatureWriteZeroes = 14
)

// Defaults for zero Options fields. SegMax follows QEMU's seg-max-adjust
// (queue size 128 minus header and status descriptors); SizeMax only has to be
// non-zero because Linux refuses a device offering SIZE_MAX with size_max 0,
// and QEMU 7.2 forces SIZE_MAX into the guest feature set.
const (
	DefaultSegMax  = 126
	DefaultSizeMax = 1 << 20
)

// Disk is the storage the handler executes requests against. Offsets and
// lengths it receives are already validated: in range and aligned to
// LogicalSectorSize.
type Disk interface {
	ReadVec(bufs [][]byte, off int64) error
	WriteVec(bufs [][]byte, off int64) error
	Flush() error
	Size() int64
	LogicalSectorSize() uint32
	PhysicalSectorSize() uint32
}

// Discarder is an optional Disk upgrade; with it the device offers
// VIRTIO_BLK_F_DISCARD.
type Discarder interface {
	Discard(off, n int64) error
}

// WriteZeroer is an optional Disk upgrade; with it the device offers
// VIRTIO_BLK_F_WRITE_ZEROES. unmap reports the request's UNMAP flag: the
// range may be deallocated as long as it reads back as zeroes.
type WriteZeroer interface {
	WriteZeroes(off, n int64, unmap bool) error
}

// Options configure the device side of a disk.
type Options struct {
	ReadOnly  bool
	Serial    string
	NumQueues uint16
	SegMax    uint32
	SizeMax   uint32
	// Cache, when non-nil on a writable device, offers
	// VIRTIO_BLK_F_CONFIG_WCE: Config reports its mode in `writeback` and
	// handlers flush every write in write-through mode. Nil: no
	// CONFIG_WCE, and writes are durable after FLUSH as always.
	Cache *WriteCache
	// NoSpace, when non-nil, is the device's out-of-space policy and
	// state (nospace.go). Nil: report, nothing counted.
	NoSpace *NoSpace
}

func (o Options) withDefaults() Options {
	if o.NumQueues == 0 {
		o.NumQueues = 1
	}
	if o.SegMax == 0 {
		o.SegMax = DefaultSegMax
	}
	if o.SizeMax == 0 {
		o.SizeMax = DefaultSizeMax
	}
	return o
}

// Sentinel errors. Errors from Handle wrap one of these or an error from the
// Disk, plus the request's type and sector.
var (
	// ErrUnsupported: a request type or flag the device does not implement.
	ErrUnsupported = errors.New("blk: unsupported request")
	// ErrOutOfRange: the request reaches beyond the disk's capacity.
	ErrOutOfRange = errors.New("blk: request beyond the end of the disk")
	// ErrReadOnly: a write-type request on a read-only device.
	ErrReadOnly = errors.New("blk: write to a read-only device")
	// ErrBadRequest: a malformed request (short header, unaligned or
	// oversized data, bad segment).
	ErrBadRequest = errors.New("blk: malformed request")
)

// Status turns an error into a virtio-blk status byte. It is the only place
// that does: virtio has no status for "read-only" or "out of range", and QEMU
// answers both with IOERR, as does this device.
func Status(err error) uint8 {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, ErrUnsupported), errors.Is(err, vhdx.ErrUnsupported):
		return StatusUnsupp
	default:
		return StatusIOErr
	}
}

// sectorSizeOf returns the disk's logical sector size, or 512 if the Disk
// reports something that is not a power of two of at least 512, so that a
// broken Disk cannot make the range check divide by zero.
func sectorSizeOf(d Disk) uint64 {
	l := uint64(d.LogicalSectorSize())
	if l < SectorSize || l&(l-1) != 0 {
		return SectorSize
	}
	return l
}

// physicalSizeOf is sectorSizeOf for the physical sector size, never smaller
// than the logical one.
func physicalSizeOf(d Disk, logical uint64) uint64 {
	p := uint64(d.PhysicalSectorSize())
	if p < logical || p&(p-1) != 0 {
		return logical
	}
	return p
}

// capacitySectors is the disk size in 512-byte sectors, 0 for a nonsensical
// negative size.
func capacitySectors(d Disk) uint64 {
	s := d.Size()
	if s < 0 {
		return 0
	}
	return uint64(s) >> sectorShift
}
