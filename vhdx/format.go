package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/google/uuid"
)

// Sizes and positions fixed by MS-VHDX §2.2.
const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
	tib = 1 << 40

	headerSectionSize = 1 * mib // §2.2: the header section is 1 MiB
	fileIDOffset      = 0
	fileIDSize        = 64 * kib
	header1Offset     = 64 * kib // §2.2.2
	header2Offset     = 128 * kib
	headerSize        = 4 * kib
	regionTable1Off   = 192 * kib // §2.2.3
	regionTable2Off   = 256 * kib
	regionTableSize   = 64 * kib
	metadataTableSize = 64 * kib // §2.6.1
	alignment         = 1 * mib  // §2.1: every object is 1 MiB aligned

	maxRegionEntries   = 2047 // §2.2.3.1
	maxMetadataEntries = 2047 // §2.6.1.1
	maxMetadataItemLen = 1 * mib
	maxVirtualDiskSize = 64 * tib // §2.6.2.2
	minBlockSize       = 1 * mib  // §2.6.2.1
	maxBlockSize       = 256 * mib
	sectorsPerBitmap   = 1 << 23 // §2.4: sectors described by one sector bitmap block

	// maxLogLength bounds the log (LogLength is a uint32, §2.2.2); we also
	// refuse anything shorter than one 1 MiB unit because the journal needs
	// room for at least one entry.
	minLogLength = 1 * mib
)

// File type identifier layout (§2.2.1).
const (
	fileIDSignature  = "vhdxfile"
	fileIDCreatorOff = 8
	fileIDCreatorLen = 512
)

// Header layout (§2.2.2).
const (
	hdrSignature     = "head"
	hdrOffSignature  = 0
	hdrOffChecksum   = 4
	hdrOffSequence   = 8
	hdrOffFileWrite  = 16
	hdrOffDataWrite  = 32
	hdrOffLogGUID    = 48
	hdrOffLogVersion = 64
	hdrOffVersion    = 66
	hdrOffLogLength  = 68
	hdrOffLogOffset  = 72
)

// Region table layout (§2.2.3).
const (
	rtSignature     = "regi"
	rtOffChecksum   = 4
	rtOffEntryCount = 8
	rtHeaderSize    = 16
	rtEntrySize     = 32
	rteOffGUID      = 0
	rteOffFileOff   = 16
	rteOffLength    = 24
	rteOffRequired  = 28
)

// Metadata table layout (§2.6.1).
const (
	mdSignature      = "metadata"
	mdOffEntryCount  = 10
	mdHeaderSize     = 32
	mdEntrySize      = 32
	mdeOffItemID     = 0
	mdeOffOffset     = 16
	mdeOffLength     = 20
	mdeOffFlags      = 24
	mdFlagIsUser     = 1 << 0
	mdFlagIsVirtual  = 1 << 1
	mdFlagIsRequired = 1 << 2
	mdItemMinOffset  = 64 * kib // §2.6.1.2

	fpFlagLeaveBlockAllocated = 1 << 0 // §2.6.2.1
	fpFlagHasParent           = 1 << 1
)

// BAT entry layout (§2.5.1).
const (
	batStateMask    = 0x7
	batReservedMask = uint64(0xFFFFF) &^ batStateMask // bits 3..19
	batOffsetShift  = 20

	// Payload block states (§2.5.1.1). 5 is reserved in v1.0 but was
	// UNMAPPED in the v0.95 draft; QEMU reads it as zeros and so do we.
	stateNotPresent       = 0
	stateUndefined        = 1
	stateZero             = 2
	stateUnmapped         = 3
	stateReserved4        = 4
	stateUnmappedV095     = 5
	stateFullyPresent     = 6
	statePartiallyPresent = 7

	// Sector bitmap block states (§2.5.1.2).
	sbNotPresent = 0
)

func batState(e uint64) uint64      { return e & batStateMask }
func batFileOffset(e uint64) uint64 { return (e >> batOffsetShift) << batOffsetShift }
func makeBATEntry(state, fileOff uint64) uint64 {
	return (fileOff>>batOffsetShift)<<batOffsetShift | state
}

// header is the decoded form of one 4 KiB header (§2.2.2).
type header struct {
	seq           uint64
	fileWriteGUID uuid.UUID
	dataWriteGUID uuid.UUID
	logGUID       uuid.UUID
	logVersion    uint16
	version       uint16
	logLength     uint32
	logOffset     uint64
}

func decodeHeader(b []byte) header {
	le := binary.LittleEndian
	return header{
		seq:           le.Uint64(b[hdrOffSequence:]),
		fileWriteGUID: guidFromDisk(b[hdrOffFileWrite:]),
		dataWriteGUID: guidFromDisk(b[hdrOffDataWrite:]),
		logGUID:       guidFromDisk(b[hdrOffLogGUID:]),
		logVersion:    le.Uint16(b[hdrOffLogVersion:]),
		version:       le.Uint16(b[hdrOffVersion:]),
		logLength:     le.Uint32(b[hdrOffLogLength:]),
		logOffset:     le.Uint64(b[hdrOffLogOffset:]),
	}
}

// encode returns the 4 KiB on-disk header with its checksum set.
func (h header) encode() []byte {
	b := make([]byte, headerSize)
	le := binary.LittleEndian
	copy(b[hdrOffSignature:], hdrSignature)
	le.PutUint64(b[hdrOffSequence:], h.seq)
	guidToDisk(b[hdrOffFileWrite:], h.fileWriteGUID)
	guidToDisk(b[hdrOffDataWrite:], h.dataWriteGUID)
	guidToDisk(b[hdrOffLogGUID:], h.logGUID)
	le.PutUint16(b[hdrOffLogVersion:], h.logVersion)
	le.PutUint16(b[hdrOffVersion:], h.version)
	le.PutUint32(b[hdrOffLogLength:], h.logLength)
	le.PutUint64(b[hdrOffLogOffset:], h.logOffset)
	putChecksum(b, hdrOffChecksum)
	return b
}

// region is one region table entry (§2.2.3.2).
type region struct {
	guid     uuid.UUID
	offset   uint64
	length   uint32
	required bool
}

func (r region) end() uint64 { return r.offset + uint64(r.length) }

// encodeRegionTable returns a 64 KiB region table with its checksum set.
func encodeRegionTable(regions []region) []byte {
	b := make([]byte, regionTableSize)
	le := binary.LittleEndian
	copy(b, rtSignature)
	le.PutUint32(b[rtOffEntryCount:], uint32(len(regions)))
	for i, r := range regions {
		e := b[rtHeaderSize+i*rtEntrySize:]
		guidToDisk(e[rteOffGUID:], r.guid)
		le.PutUint64(e[rteOffFileOff:], r.offset)
		le.PutUint32(e[rteOffLength:], r.length)
		if r.required {
			le.PutUint32(e[rteOffRequired:], 1)
		}
	}
	putChecksum(b, rtOffChecksum)
	return b
}

// chunkRatio is the number of payload blocks per sector bitmap block
// (§2.4): 2^23 * LogicalSectorSize / BlockSize. With BlockSize ≤ 256 MiB and
// LogicalSectorSize ≥ 512 it is at least 16 and always a power of two.
func chunkRatio(logicalSector, blockSize uint32) uint64 {
	return sectorsPerBitmap * uint64(logicalSector) / uint64(blockSize)
}

// payloadBlocks is Ceil(VirtualDiskSize / BlockSize) (§2.5).
func payloadBlocks(size uint64, blockSize uint32) uint64 {
	return size/uint64(blockSize) + boolU64(size%uint64(blockSize) != 0)
}

// batIndex maps payload block b to its BAT entry index: after every
// chunkRatio payload entries comes one sector bitmap entry (§2.5, figure 6).
func batIndex(b, cr uint64) uint64 { return b + b/cr }

// isBitmapIndex reports whether BAT entry i is a sector bitmap entry.
func isBitmapIndex(i, cr uint64) bool { return i%(cr+1) == cr }

func boolU64(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

func roundUp(x, a uint64) uint64 { return (x + a - 1) / a * a }

// offsetError attaches the file offset of the offending structure to an
// error so that Check can report it; the message already names it.
type offsetError struct {
	off int64
	err error
}

func (e *offsetError) Error() string { return e.err.Error() }
func (e *offsetError) Unwrap() error { return e.err }

// errAt builds an error wrapping sentinel whose message reads
// "<what> at offset 0x..: <rule>: <sentinel>".
func errAt(sentinel error, off uint64, what string, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return &offsetError{
		off: int64(off),
		err: fmt.Errorf("%s at offset %#x: %s: %w", what, off, msg, sentinel),
	}
}

// errorOffset returns the file offset recorded in err, or -1.
func errorOffset(err error) int64 {
	var oe *offsetError
	if errors.As(err, &oe) {
		return oe.off
	}
	return -1
}

// readFull reads exactly len(p) bytes at off, turning a short read (the file
// ends early) into ErrCorrupt naming the structure.
func readFull(s Storage, p []byte, off uint64, what string) error {
	if off > 1<<62 {
		return errAt(ErrCorrupt, off, what, "offset is beyond any possible file")
	}
	n, err := s.ReadAt(p, int64(off))
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return errAt(ErrCorrupt, off, what, "file ends after %d of %d bytes", n, len(p))
	}
	return fmt.Errorf("%s at offset %#x: read: %w", what, off, err)
}
