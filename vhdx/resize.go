package vhdx

import (
	"encoding/binary"
	"fmt"
)

// Resize changes the virtual size of the image at path (offline: the image
// must not be in use). Growing maps nothing new for a dynamic image and
// allocates (fallocate) the new blocks of a fixed one; when the BAT region
// is too small for the new size, a larger BAT is written at the end of the
// file and the region tables switch to it through the log. Shrinking needs
// shrink and refuses when a block past the new end holds data, naming the
// first such virtual offset. Differencing images are refused
// (errDifferencingResize says why), before their parents are looked for.
func Resize(path string, newSize uint64, shrink bool) error {
	meta, err := openFileWith(path, OpenOptions{ReadOnly: true, NoLock: true, ReplayLogInMemory: true}, openMetadata)
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	hasParent := meta.l.hasParent
	meta.Close()
	if hasParent {
		return errDifferencingResize(path)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	err = im.resize(newSize, shrink)
	if cerr := im.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("resize: %w", cerr)
	}
	return err
}

// errDifferencingResize is the refusal to resize a differencing image.
//
// A child is its parent's disk with some sectors replaced (§2.6: a
// NOT_PRESENT block or a clear sector bitmap bit reads the parent), so it
// has the parent's size. MS-VHDX states no rule for a child of another
// size, and no implementation reads one: Hyper-V expands only fixed and
// dynamic disks (virtdisk ExpandVirtualDisk: "valid only for fixed and
// expandable virtual disks"; Hyper-V Manager will not edit a disk with
// checkpoints until they are merged); libvhdi fails to read a grown child
// past its parent's end ("unable to read data from parent file") and 7-Zip
// reports "Unexpected end of data" (both tried on a child whose size item
// was raised by hand). Open refuses a size mismatch (ErrParentGeometry),
// so growing only the top would leave an image nothing opens. The way is
// the one Hyper-V takes: merge the chain, then resize the base.
func errDifferencingResize(path string) error {
	if path == "" {
		path = "the image"
	}
	return fmt.Errorf("resize: %s is a differencing image, whose virtual size is its parent's (a NOT_PRESENT block reads the parent, §2.6); "+
		"Hyper-V resizes only fixed and dynamic disks, and libvhdi and 7-Zip fail to read a child past its parent's end; "+
		"merge the chain into its base (`vhost-vhdx commit`) and resize the base: %w", path, ErrUnsupported)
}

// resize does the work on an open image. Every metadata change goes through
// the journal (§2.3): the BAT entries of new (or dropped) blocks first,
// which lie past the visible disk and so change nothing a reader sees, and
// then, in one entry, the virtual disk size item (§2.6.2.2) with, when the
// BAT moved, both region tables (§2.2.3). A crash leaves the old size or the
// new one. The image's in-memory state describes the old size afterwards:
// callers close it (online growth would swap im.bat, which is a later step).
func (im *Image) resize(newSize uint64, shrink bool) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	l := &im.l
	bad := func(format string, args ...any) error {
		return fmt.Errorf("resize: "+format+": %w", append(args, ErrInvalidArgument)...)
	}
	switch {
	case im.readOnly:
		return fmt.Errorf("resize: %w", ErrReadOnly)
	case l.hasParent:
		return errDifferencingResize(im.path)
	case newSize == 0 || newSize%uint64(l.logicalSector) != 0 || newSize > maxVirtualDiskSize:
		return bad("size %d is not a non-zero multiple of %d at most 64 TiB", newSize, l.logicalSector)
	case newSize == l.size:
		return nil
	case newSize < l.size && !shrink:
		return bad("%d is smaller than the current size %d; shrinking needs the shrink option", newSize, l.size)
	}
	bs := uint64(l.blockSize)
	cr := l.chunkRatio
	oldPB, newPB := l.payloadBlocks, payloadBlocks(newSize, l.blockSize)
	if newSize < l.size {
		for b := newPB; b < oldPB; b++ {
			idx := batIndex(b, cr)
			e := im.bat.load(idx)
			if _, owns := im.ownedRange(idx, e); owns && !l.leaveAllocated {
				return bad("the block at virtual offset %#x past the new end %#x holds data (discard it first)", b*bs, newSize)
			}
		}
	}
	if err := im.beginSessionLocked(); err != nil {
		return err
	}

	// The new BAT contents, entries [0, n) by the spec's count (§2.5).
	n := newPB + (newPB+cr-1)/cr
	newBAT := make([]uint64, n)
	for i := uint64(0); i < min(n, im.bat.len()); i++ {
		newBAT[i] = im.bat.load(i)
	}
	var freed []ownedSpan
	if newSize < l.size {
		// Entries past the new end go: a fixed image's blocks are freed.
		for b := newPB; b < oldPB; b++ {
			idx := batIndex(b, cr)
			if sp, ok := im.ownedRange(idx, im.bat.load(idx)); ok {
				freed = append(freed, sp)
			}
		}
		// The last block's part past the new end reads as zeros should
		// the disk grow again.
		if tail := newSize % bs; tail != 0 {
			e := newBAT[batIndex(newPB-1, cr)]
			if batState(e) == stateFullyPresent {
				if err := punch(im.s, batFileOffset(e)+tail, bs-tail); err != nil {
					return fmt.Errorf("resize: zero the cut-off part of the last block: %w", err)
				}
			}
		}
	} else if l.leaveAllocated {
		// A fixed image stays fixed: the new blocks, contiguous at the end
		// of the file, allocated.
		start := im.fileEnd
		count := newPB - oldPB
		if count > (maxFileOffset-start)/bs {
			return fmt.Errorf("resize: file would exceed %#x bytes: %w", uint64(maxFileOffset), ErrUnsupported)
		}
		// The partial last block of the old size now extends: its file
		// block already has a full block of space.
		im.fileEnd = start + count*bs
		if err := im.s.Truncate(int64(im.fileEnd)); err != nil {
			im.fileEnd = start // nothing there: journal entries must not claim it
			return fmt.Errorf("resize: extend file: %w", err)
		}
		if err := preallocate(im.s, PreallocFalloc, start, count*bs); err != nil {
			return fmt.Errorf("resize: allocate new blocks: %w", err)
		}
		for b := oldPB; b < newPB; b++ {
			newBAT[batIndex(b, cr)] = makeBATEntry(stateFullyPresent, start+(b-oldPB)*bs)
		}
	}

	batLen := roundUp(n*8, alignment)
	if batLen > 1<<32-alignment {
		return bad("a BAT of %d bytes for size %d does not fit a region", batLen, newSize)
	}
	var final []logUpdate
	if batLen <= uint64(l.bat.length) {
		// In place: the entries that change, journaled in batches.
		if err := im.journalBATRange(newBAT, oldPB, newPB); err != nil {
			return err
		}
	} else {
		// Relocate: the whole new BAT is written to fresh space at the end
		// of the file (owned by nothing until the region tables point to
		// it; the journal flushes it before its entry), then the region
		// tables change in the final entry.
		off := im.fileEnd
		if off > maxFileOffset-batLen {
			return fmt.Errorf("resize: file would exceed %#x bytes: %w", uint64(maxFileOffset), ErrUnsupported)
		}
		im.fileEnd = off + batLen
		if err := im.s.Truncate(int64(im.fileEnd)); err != nil {
			im.fileEnd = off // nothing there: journal entries must not claim it
			return fmt.Errorf("resize: extend file for the new BAT: %w", err)
		}
		buf := make([]byte, min(batLen, 1*mib))
		for base := uint64(0); base < batLen/8; base += uint64(len(buf)) / 8 {
			clear(buf)
			for j := uint64(0); j < uint64(len(buf))/8 && base+j < n; j++ {
				binary.LittleEndian.PutUint64(buf[j*8:], newBAT[base+j])
			}
			if _, err := im.s.WriteAt(buf, int64(off+base*8)); err != nil {
				return fmt.Errorf("resize: write new BAT at %#x: %w", off+base*8, err)
			}
		}
		regions := append([]region(nil), l.regions...)
		for i := range regions {
			if regions[i].guid == RegionBAT {
				regions[i].offset, regions[i].length = off, uint32(batLen)
			}
		}
		rt := encodeRegionTable(regions)
		for _, at := range []uint64{regionTable1Off, regionTable2Off} {
			for k := uint64(0); k < regionTableSize; k += logSectorSize {
				final = append(final, logUpdate{offset: at + k, data: rt[k : k+logSectorSize]})
			}
		}
	}
	sizeUpdate, err := im.sizeItemUpdate(newSize)
	if err != nil {
		return err
	}
	final = append(final, sizeUpdate)
	if err := im.journal.commit(final, im.fileEnd, im.fileEnd); err != nil {
		return fmt.Errorf("resize: commit the new size through the log: %w", err)
	}
	if len(freed) > 0 {
		im.release(freed)
		for _, sp := range freed {
			if err := punch(im.s, sp.start, sp.end-sp.start); err != nil {
				return fmt.Errorf("resize: give back %#x: %w", sp.start, err)
			}
		}
	}
	return nil
}

// journalBATRange journals the BAT sectors holding the entries of blocks
// between the old and the new last block (either order) with their values
// in newBAT, up to trimBatchSectors sectors per entry. Caller holds im.mu.
func (im *Image) journalBATRange(newBAT []uint64, oldPB, newPB uint64) error {
	cr := im.l.chunkRatio
	lo := batIndex(min(oldPB, newPB), cr)
	hi := batIndex(max(oldPB, newPB), cr) + cr // through the last chunk's bitmap entry
	perSector := uint64(batSectorSize / 8)
	var updates []logUpdate
	for sec := lo / perSector; sec*perSector < hi && sec*perSector*8 < uint64(im.l.bat.length); sec++ {
		first := sec * perSector
		buf := make([]byte, batSectorSize)
		if err := readFull(im.s, buf, im.l.bat.offset+first*8, "BAT sector"); err != nil {
			return err
		}
		for j := uint64(0); j < perSector; j++ {
			i := first + j
			var v uint64
			if i < uint64(len(newBAT)) {
				v = newBAT[i]
			}
			if i >= lo {
				binary.LittleEndian.PutUint64(buf[j*8:], v)
			}
		}
		updates = append(updates, logUpdate{offset: im.l.bat.offset + first*8, data: buf})
		if len(updates) == trimBatchSectors {
			if err := im.journal.commit(updates, im.fileEnd, im.fileEnd); err != nil {
				return fmt.Errorf("resize: BAT through the log: %w", err)
			}
			updates = updates[:0]
		}
	}
	if len(updates) > 0 {
		if err := im.journal.commit(updates, im.fileEnd, im.fileEnd); err != nil {
			return fmt.Errorf("resize: BAT through the log: %w", err)
		}
	}
	return nil
}

// sizeItemUpdate returns the journal update of the 4 KiB sector of the
// metadata region holding the virtual disk size item (§2.6.2.2), set to
// size. The item is found in the metadata table, which open validated.
func (im *Image) sizeItemUpdate(size uint64) (logUpdate, error) {
	l := &im.l
	table := make([]byte, metadataTableSize)
	if err := readFull(im.s, table, l.meta.offset, "metadata table"); err != nil {
		return logUpdate{}, err
	}
	count := uint64(binary.LittleEndian.Uint16(table[mdOffEntryCount:]))
	for i := uint64(0); i < min(count, maxMetadataEntries); i++ {
		e := table[mdHeaderSize+i*mdEntrySize:]
		if guidFromDisk(e[mdeOffItemID:]) != MetaVirtualDiskSize {
			continue
		}
		itemOff := l.meta.offset + uint64(binary.LittleEndian.Uint32(e[mdeOffOffset:]))
		secOff := itemOff &^ (logSectorSize - 1)
		if itemOff+8 > secOff+logSectorSize {
			return logUpdate{}, errAt(ErrUnsupported, itemOff, "virtual disk size metadata item", "straddles a 4 KiB sector")
		}
		buf := make([]byte, logSectorSize)
		if err := readFull(im.s, buf, secOff, "metadata sector"); err != nil {
			return logUpdate{}, err
		}
		binary.LittleEndian.PutUint64(buf[itemOff-secOff:], size)
		return logUpdate{offset: secOff, data: buf}, nil
	}
	return logUpdate{}, errAt(ErrCorrupt, l.meta.offset, "metadata table", "no virtual disk size item")
}
