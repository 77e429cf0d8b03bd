package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"unicode/utf16"

	"github.com/google/uuid"
)

// CreateOptions describe a new image.
type CreateOptions struct {
	Size               uint64    // virtual size in bytes, multiple of the logical sector size
	Type               ImageType // Dynamic or Fixed
	BlockSize          uint32    // 0: default chosen by size (see defaultBlockSize)
	LogSize            uint32    // 0: 1 MiB; otherwise a multiple of 1 MiB
	LogicalSectorSize  uint32    // 0: 512
	PhysicalSectorSize uint32    // 0: 4096
	DiskID             uuid.UUID // zero: random (page 83 identifier)
	Creator            string    // file identifier creator string
	// ParentPath, when set, makes a differencing child of that image
	// (Type Dynamic or Differencing). Size, BlockSize, LogicalSectorSize,
	// PhysicalSectorSize and DiskID default to the parent's; Size, the sector
	// sizes and DiskID given explicitly must match it (§2.6.1.2: the
	// IsVirtualDisk items are copied when forking). BlockSize may differ.
	ParentPath string
	// Preallocation: how payload space is reserved (prealloc.go); the
	// default is falloc for fixed images and off for dynamic ones.
	Preallocation Preallocation
}

// defaultBlockSize picks the payload block size when none is given: small
// disks get 8 MiB blocks (less space wasted by partial blocks, as QEMU's
// default), mid-size ones 16 MiB and disks of 100 GiB and more 32 MiB, the
// size Hyper-V uses, which keeps the BAT small.
func defaultBlockSize(size uint64) uint32 {
	switch {
	case size <= 1*gib:
		return 8 * mib
	case size < 100*gib:
		return 16 * mib
	}
	return 32 * mib
}

// Create makes a new image at path; it refuses an existing path. With
// ParentPath it makes a differencing child: the parent chain is opened
// read-only (shared lock) to validate it and read its geometry and
// DataWriteGuid, which becomes the child's parent_linkage.
func Create(path string, opts CreateOptions) error {
	var child *childSpec
	if opts.ParentPath != "" {
		parent, err := Open(opts.ParentPath, OpenOptions{ReadOnly: true})
		var pe *fs.PathError
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("create %s: parent %s does not exist: %w", path, opts.ParentPath, ErrParentNotFound)
		case errors.As(err, &pe):
			// Keep the parent's name in the message: a bare file system
			// reason would read as if it were about the new image.
			return fmt.Errorf("create %s: parent: %v: %w", path, err, ErrInvalidArgument)
		case err != nil:
			return fmt.Errorf("create %s: parent: %w", path, err)
		}
		defer parent.Close()
		pl, err := newParentLocator(path, opts.ParentPath, parent.l.hdr.dataWriteGUID)
		if err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		child = &childSpec{parent: parent, locator: pl}
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create %s: %w: %w", path, ErrInvalidArgument, err)
	}
	err = createStorage(osStorage{f}, opts, child)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("create %s: close: %w", path, cerr)
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("create %s: %w", path, err)
	}
	return nil
}

// childSpec is what creating a differencing image needs from its parent.
type childSpec struct {
	parent  *Image
	locator *parentLocator
}

func normalizeCreate(o *CreateOptions, child *childSpec) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("create: "+format+": %w", append(args, ErrInvalidArgument)...)
	}
	if child != nil {
		p := child.parent
		mismatch := func(what string, got, want any) error {
			return fmt.Errorf("create: %s %v differs from the parent's %v: %w", what, got, want, ErrParentGeometry)
		}
		switch {
		case o.Type == Fixed:
			return bad("a differencing image cannot be fixed")
		case o.Size != 0 && o.Size != p.l.size:
			return mismatch("size", o.Size, p.l.size)
		case o.LogicalSectorSize != 0 && o.LogicalSectorSize != p.l.logicalSector:
			return mismatch("logical sector size", o.LogicalSectorSize, p.l.logicalSector)
		case o.PhysicalSectorSize != 0 && o.PhysicalSectorSize != p.l.physicalSector:
			return mismatch("physical sector size", o.PhysicalSectorSize, p.l.physicalSector)
		case o.DiskID != uuid.Nil && o.DiskID != p.l.diskID:
			return mismatch("disk ID", o.DiskID, p.l.diskID)
		}
		o.Type = Differencing
		o.Size, o.LogicalSectorSize, o.PhysicalSectorSize, o.DiskID = p.l.size, p.l.logicalSector, p.l.physicalSector, p.l.diskID
		if o.BlockSize == 0 {
			o.BlockSize = p.l.blockSize
		}
	}
	if o.LogicalSectorSize == 0 {
		o.LogicalSectorSize = 512
	}
	if o.PhysicalSectorSize == 0 {
		o.PhysicalSectorSize = 4096
	}
	if o.LogSize == 0 {
		o.LogSize = 1 * mib
	}
	if o.BlockSize == 0 {
		o.BlockSize = defaultBlockSize(o.Size)
	}
	if o.DiskID == uuid.Nil {
		o.DiskID = uuid.New()
	}
	switch {
	case o.Type != Dynamic && o.Type != Fixed && (o.Type != Differencing || child == nil):
		return bad("image type %v cannot be created (a differencing image needs ParentPath)", o.Type)
	case o.LogicalSectorSize != 512 && o.LogicalSectorSize != 4096:
		return bad("logical sector size %d is not 512 or 4096", o.LogicalSectorSize)
	case o.PhysicalSectorSize != 512 && o.PhysicalSectorSize != 4096:
		return bad("physical sector size %d is not 512 or 4096", o.PhysicalSectorSize)
	case o.Size == 0 || o.Size%uint64(o.LogicalSectorSize) != 0 || o.Size > maxVirtualDiskSize:
		return bad("size %d is not a non-zero multiple of %d at most 64 TiB", o.Size, o.LogicalSectorSize)
	case o.BlockSize < minBlockSize || o.BlockSize > maxBlockSize || bits.OnesCount32(o.BlockSize) != 1:
		return bad("block size %d is not a power of two in [1 MiB, 256 MiB]", o.BlockSize)
	case o.LogSize%mib != 0 || o.LogSize > 1*gib:
		return bad("log size %d is not a multiple of 1 MiB up to 1 GiB", o.LogSize)
	case len(utf16.Encode([]rune(o.Creator))) > fileIDCreatorLen/2:
		return bad("creator string is longer than %d UTF-16 code units", fileIDCreatorLen/2)
	}
	return nil
}

// CreateStorage writes a new image to the empty storage s. The layout follows
// Hyper-V and QEMU: 1 MiB header section, the log at 1 MiB, a 1 MiB metadata
// region, then the BAT region rounded up to 1 MiB; a fixed image's payload
// blocks follow the BAT contiguously, all FULLY_PRESENT.
func CreateStorage(s Storage, opts CreateOptions) error {
	if opts.ParentPath != "" {
		return fmt.Errorf("create: a differencing image needs a path (use Create): %w", ErrInvalidArgument)
	}
	return createStorage(s, opts, nil)
}

func createStorage(s Storage, opts CreateOptions, child *childSpec) error {
	if err := normalizeCreate(&opts, child); err != nil {
		return err
	}
	if sz, err := s.Size(); err != nil {
		return fmt.Errorf("create: file size: %w", err)
	} else if sz != 0 {
		return fmt.Errorf("create: storage is not empty (%d bytes): %w", sz, ErrInvalidArgument)
	}
	cr := chunkRatio(opts.LogicalSectorSize, opts.BlockSize)
	pb := payloadBlocks(opts.Size, opts.BlockSize)
	// §2.5: TotalBATEntries = payload blocks + sector bitmap blocks; a
	// differencing image's BAT reaches the last chunk's bitmap entry.
	entries := pb + (pb+cr-1)/cr
	if child != nil {
		entries = (pb + cr - 1) / cr * (cr + 1)
	}
	batLen := roundUp(entries*8, alignment)
	if batLen > 1<<32-alignment {
		return fmt.Errorf("create: BAT of %d bytes does not fit a region: %w", batLen, ErrInvalidArgument)
	}
	logOff := uint64(headerSectionSize)
	metaOff := logOff + uint64(opts.LogSize)
	batOff := metaOff + 1*mib
	dataOff := batOff + batLen
	fileEnd := dataOff
	bs := uint64(opts.BlockSize)
	if opts.Preallocation < PreallocDefault || opts.Preallocation > PreallocFull {
		return fmt.Errorf("create: %v: %w", opts.Preallocation, ErrInvalidArgument)
	}
	allBlocks := mapsAllBlocks(opts) // prealloc.go
	if allBlocks {
		if child != nil {
			return fmt.Errorf("create: a differencing image cannot be preallocated: %w", ErrInvalidArgument)
		}
		fileEnd += pb * bs
	}

	write := func(b []byte, off uint64, what string) error {
		if _, err := s.WriteAt(b, int64(off)); err != nil {
			return fmt.Errorf("create: write %s at offset %#x: %w", what, off, err)
		}
		return nil
	}
	if err := s.Truncate(int64(fileEnd)); err != nil {
		return fmt.Errorf("create: size file to %#x: %w", fileEnd, err)
	}
	if allBlocks {
		if err := preallocate(s, opts.Preallocation.effective(opts.Type), dataOff, pb*bs); err != nil {
			return fmt.Errorf("create: preallocate %d bytes of payload: %w", pb*bs, err)
		}
	}

	// File type identifier (§2.2.1).
	id := make([]byte, fileIDCreatorOff+fileIDCreatorLen)
	copy(id, fileIDSignature)
	for i, c := range utf16.Encode([]rune(opts.Creator)) {
		binary.LittleEndian.PutUint16(id[fileIDCreatorOff+2*i:], c)
	}
	if err := write(id, fileIDOffset, "file identifier"); err != nil {
		return err
	}

	// Region tables (§2.2.3), identical copies.
	rt := encodeRegionTable([]region{
		{guid: RegionMetadata, offset: metaOff, length: 1 * mib, required: true},
		{guid: RegionBAT, offset: batOff, length: uint32(batLen), required: true},
	})
	if err := write(rt, regionTable1Off, "region table 1"); err != nil {
		return err
	}
	if err := write(rt, regionTable2Off, "region table 2"); err != nil {
		return err
	}

	var loc []byte
	if child != nil {
		var err error
		if loc, err = child.locator.encode(); err != nil {
			return fmt.Errorf("create: %w", err)
		}
	}
	md, err := encodeMetadata(opts, loc)
	if err != nil {
		return err
	}
	if err := write(md, metaOff, "metadata region"); err != nil {
		return err
	}

	// BAT (§2.5). New dynamic blocks are NOT_PRESENT, which the sparse file
	// already reads as; a fixed or preallocated image maps every payload
	// block in order.
	if allBlocks {
		buf := make([]byte, min(batLen, 1*mib))
		var blk uint64
		for base := uint64(0); base < entries; base += uint64(len(buf)) / 8 {
			clear(buf)
			for j := uint64(0); j < uint64(len(buf))/8 && base+j < entries; j++ {
				i := base + j
				if isBitmapIndex(i, cr) || blk >= pb {
					continue
				}
				binary.LittleEndian.PutUint64(buf[j*8:], makeBATEntry(stateFullyPresent, dataOff+blk*bs))
				blk++
			}
			if err := write(buf, batOff+base*8, "BAT"); err != nil {
				return err
			}
		}
	}

	// Headers last (§2.2.2): sequence numbers 0 and 1, so header 2 is current.
	h := header{
		fileWriteGUID: uuid.New(),
		dataWriteGUID: uuid.New(),
		version:       1,
		logLength:     opts.LogSize,
		logOffset:     logOff,
	}
	if err := write(h.encode(), header1Offset, "header 1"); err != nil {
		return err
	}
	h.seq = 1
	if err := write(h.encode(), header2Offset, "header 2"); err != nil {
		return err
	}
	if err := s.Sync(); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	return nil
}

// encodeMetadata builds the metadata table and the five required items
// (§2.6.2), items packed from 64 KiB as QEMU and Hyper-V do, plus the parent
// locator of a differencing image (IsRequired, not IsVirtualDisk: §2.6.2).
func encodeMetadata(o CreateOptions, locator []byte) ([]byte, error) {
	if mdItemMinOffset+64+len(locator) > 1*mib {
		return nil, fmt.Errorf("create: parent locator of %d bytes does not fit the metadata region: %w", len(locator), ErrInvalidArgument)
	}
	b := make([]byte, mdItemMinOffset+64+len(locator))
	le := binary.LittleEndian
	copy(b, mdSignature)
	type item struct {
		id    uuid.UUID
		flags uint32
		data  []byte
	}
	u32 := func(v uint32) []byte { return le.AppendUint32(nil, v) }
	fpFlags := uint32(0)
	if o.Type == Fixed {
		fpFlags |= fpFlagLeaveBlockAllocated
	}
	if locator != nil {
		fpFlags |= fpFlagHasParent
	}
	diskID := make([]byte, 16)
	guidToDisk(diskID, o.DiskID)
	items := []item{
		{MetaFileParameters, mdFlagIsRequired, append(u32(o.BlockSize), u32(fpFlags)...)},
		{MetaVirtualDiskSize, mdFlagIsRequired | mdFlagIsVirtual, le.AppendUint64(nil, o.Size)},
		{MetaVirtualDiskID, mdFlagIsRequired | mdFlagIsVirtual, diskID},
		{MetaLogicalSectorSize, mdFlagIsRequired | mdFlagIsVirtual, u32(o.LogicalSectorSize)},
		{MetaPhysicalSectorSize, mdFlagIsRequired | mdFlagIsVirtual, u32(o.PhysicalSectorSize)},
	}
	if locator != nil {
		items = append(items, item{MetaParentLocator, mdFlagIsRequired, locator})
	}
	le.PutUint16(b[mdOffEntryCount:], uint16(len(items)))
	off := uint32(mdItemMinOffset)
	for i, it := range items {
		e := b[mdHeaderSize+i*mdEntrySize:]
		guidToDisk(e[mdeOffItemID:], it.id)
		le.PutUint32(e[mdeOffOffset:], off)
		le.PutUint32(e[mdeOffLength:], uint32(len(it.data)))
		le.PutUint32(e[mdeOffFlags:], it.flags)
		copy(b[off:], it.data)
		off += uint32(len(it.data))
	}
	return b, nil
}
