package vhdx

import (
	"fmt"
	"math/bits"
)

// Free file space and its reuse.
//
// Payload and sector bitmap blocks live at 1 MiB-aligned file offsets
// (§2.1, §2.5.1). Discards take blocks out of the BAT; their ranges become
// free. freeSpace tracks free 1 MiB units below im.fileEnd in a bitset, and
// allocation takes the lowest run that fits a block before growing the file
// (lowest first keeps data packed towards the start, which compact and
// truncation like).
//
// Two rules keep reuse from ever showing stale data:
//   - A freed range is only reusable after the grace period of epochs (see
//     epochs): no I/O that could still hold the old BAT entry is running.
//     Until then it waits in pending with the epoch it was freed in.
//   - A range is zeroed (hole punched) when it is taken, after the grace
//     period, so neither the previous owner's data nor a late write of an
//     I/O that raced with the discard can show through the new block's
//     unwritten sectors. The journal commit that publishes the new BAT entry
//     syncs first, so the zeroing is durable before the entry is.
//
// The set is built lazily, on the first allocation, from the gaps between
// every structure the file holds (headers, log, regions, and every BAT
// entry that owns a range). A crash between a discard's BAT commit and its
// hole punch therefore leaves an unowned gap that the next session finds
// and zeroes before reusing, and a crash after a reuse was zeroed but before
// its commit leaves the range unowned again. Ranges are only freed after the
// commit that unlinks them returned, so no two durable BAT entries ever own
// the same range.
//
// Everything here runs under im.mu.
type freeSpace struct {
	ready   bool
	free    []uint64 // bit u set: 1 MiB unit u is free and reusable now
	pending []pendingFree
	// hint: no free unit lies below it (first-fit search start).
	hint uint64
	// Bytes given back: counts for Info and tests.
	freedBytes  uint64
	reusedBytes uint64
}

// pendingFree is a range waiting for its grace period.
type pendingFree struct {
	off, n uint64 // bytes, 1 MiB aligned
	tag    uint64 // epoch when it was freed
}

const unitShift = 20 // 1 MiB units

func (fs *freeSpace) setFree(off, n uint64) {
	first, count := off>>unitShift, n>>unitShift
	last := first + count
	if need := (last + 63) / 64; uint64(len(fs.free)) < need {
		fs.free = append(fs.free, make([]uint64, need-uint64(len(fs.free)))...)
	}
	for u := first; u < last; u++ {
		fs.free[u/64] |= 1 << (u % 64)
	}
	fs.hint = min(fs.hint, first)
}

func (fs *freeSpace) isFree(u uint64) bool {
	return u/64 < uint64(len(fs.free)) && fs.free[u/64]&(1<<(u%64)) != 0
}

// take finds the lowest run of count free units, clears it and returns its
// byte offset.
func (fs *freeSpace) take(count uint64) (uint64, bool) {
	total := uint64(len(fs.free)) * 64
	u := fs.hint
	for u < total {
		// Skip whole empty words quickly.
		if u%64 == 0 && fs.free[u/64] == 0 {
			u += 64
			continue
		}
		if !fs.isFree(u) {
			if w := fs.free[u/64] >> (u % 64); w != 0 {
				u += uint64(bits.TrailingZeros64(w))
			} else {
				u = (u/64 + 1) * 64
			}
			continue
		}
		run := uint64(0)
		for run < count && fs.isFree(u+run) {
			run++
		}
		if run == count {
			for k := u; k < u+count; k++ {
				fs.free[k/64] &^= 1 << (k % 64)
			}
			return u << unitShift, true
		}
		u += run
	}
	return 0, false
}

// firstFree returns the lowest free unit, or false.
func (fs *freeSpace) firstFree() (uint64, bool) {
	for i := fs.hint / 64; i < uint64(len(fs.free)); i++ {
		if fs.free[i] != 0 {
			return i*64 + uint64(bits.TrailingZeros64(fs.free[i])), true
		}
	}
	return 0, false
}

// ownedSpan is a 1 MiB-rounded file range a structure or BAT entry owns.
type ownedSpan struct{ start, end uint64 }

// blockSpan is the file range a payload block at file offset off owns: the
// block size rounded up to the 1 MiB the BAT's FileOffsetMB counts in
// (§2.5.1), so a block never shares a megabyte with another.
func (im *Image) blockSpan(off uint64) ownedSpan {
	return ownedSpan{off, off + roundUp(uint64(im.l.blockSize), alignment)}
}

// len is the span's length in bytes.
func (sp ownedSpan) len() uint64 { return sp.end - sp.start }

// ownedRange returns the file range BAT entry i owns, if any: payload
// blocks in a state with a meaningful FileOffsetMB (FULLY_PRESENT,
// PARTIALLY_PRESENT, and UNDEFINED/UNMAPPED that kept one, §2.5.1.1), and
// present sector bitmap blocks (1 MiB, §2.5.1.2).
func (im *Image) ownedRange(i, e uint64) (ownedSpan, bool) {
	off := batFileOffset(e)
	if off == 0 {
		return ownedSpan{}, false
	}
	if isBitmapIndex(i, im.l.chunkRatio) {
		if batState(e) == sbNotPresent {
			return ownedSpan{}, false
		}
		return ownedSpan{off, off + 1*mib}, true
	}
	switch batState(e) {
	case stateFullyPresent, statePartiallyPresent, stateUndefined, stateUnmapped, stateUnmappedV095:
		return im.blockSpan(off), true
	}
	return ownedSpan{}, false
}

// initSpace builds the free set from the gaps below im.fileEnd. Caller
// holds im.mu.
func (im *Image) initSpace() {
	fs := &im.space
	if fs.ready {
		return
	}
	fs.ready = true
	end := im.fileEnd
	units := end >> unitShift
	owned := make([]uint64, (units+63)/64)
	mark := func(start, stop uint64) {
		stop = min(roundUp(stop, alignment), end)
		for u := start >> unitShift; u < stop>>unitShift; u++ {
			owned[u/64] |= 1 << (u % 64)
		}
	}
	mark(0, headerSectionSize)
	mark(im.l.hdr.logOffset, im.l.hdr.logOffset+uint64(im.l.hdr.logLength))
	for _, r := range im.l.regions {
		mark(r.offset, r.end())
	}
	// Entries of pages not stored own nothing (battable.go).
	im.bat.forEachStored(func(i, e uint64) {
		if sp, ok := im.ownedRange(i, e); ok {
			mark(sp.start, sp.end)
		}
	})
	// Trimmed blocks whose BAT change is not committed yet still own
	// their ranges on disk (discard.go: pendingTrims).
	for _, sp := range im.trims.freed {
		mark(sp.start, sp.end)
	}
	fs.free = make([]uint64, len(owned))
	for i, w := range owned {
		fs.free[i] = ^w
	}
	// Units past the file end are not free (growth handles them).
	if r := units % 64; r != 0 {
		fs.free[len(fs.free)-1] &= 1<<r - 1
	}
	fs.hint = 0
}

// release hands ranges unlinked by a committed BAT update to the free set,
// tagged with the current epoch. Caller holds im.mu.
func (im *Image) release(spans []ownedSpan) {
	if len(spans) == 0 {
		return
	}
	im.initSpace()
	tag := im.ep.cur.Load()
	for _, sp := range spans {
		im.space.pending = append(im.space.pending, pendingFree{off: sp.start, n: sp.len(), tag: tag})
		im.space.freedBytes += sp.len()
	}
	im.ep.advance()
}

// promote moves pending ranges whose grace period is over into the free
// set. Caller holds im.mu.
func (im *Image) promote() {
	im.ep.advance()
	fs := &im.space
	keep := fs.pending[:0]
	for _, p := range fs.pending {
		if im.ep.reusable(p.tag) {
			fs.setFree(p.off, p.n)
		} else {
			keep = append(keep, p)
		}
	}
	clear(fs.pending[len(keep):])
	fs.pending = keep
}

// reserveBlock returns the file offset for a new payload block: reused
// free space, zeroed, when a range that fits is past its grace period,
// else fresh space at the end of the file. Caller holds im.mu. The returned
// range reads as zeros.
func (im *Image) reserveBlock(idx uint64) (off uint64, err error) {
	bs := im.blockSpan(0).len()
	im.initSpace()
	im.promote()
	if off, ok := im.space.take(bs >> unitShift); ok {
		if im.beforeReuse != nil {
			im.beforeReuse(off)
		}
		if err := punch(im.s, off, bs); err != nil {
			im.space.setFree(off, bs) // still unowned; zeroed when taken again
			return 0, fmt.Errorf("allocate block for BAT entry %d: zero reused range at %#x: %w", idx, off, noSpace(err))
		}
		im.space.reusedBytes += bs
		return off, nil
	}
	newOff := im.fileEnd
	if newOff > maxFileOffset-bs {
		return 0, fmt.Errorf("allocate block for BAT entry %d: file would exceed %#x bytes: %w", idx, uint64(maxFileOffset), ErrUnsupported)
	}
	newEnd := newOff + bs
	im.fileEnd = newEnd
	if err := im.s.Truncate(int64(newEnd)); err != nil {
		// Nothing was written there and the file did not grow: give the
		// range back (a failed attempt does not grow the file, nospace.go),
		// or every later journal entry would record a FlushedFileOffset
		// past the file.
		im.fileEnd = newOff
		return 0, fmt.Errorf("allocate block for BAT entry %d: extend file to %#x: %w", idx, newEnd, noSpace(err))
	}
	return newOff, nil
}

// truncateFreeTail cuts free space at the end of the file off at Close, so
// a file whose last blocks were discarded shrinks. It runs after LogGuid
// was cleared: no log entry will be replayed whose FlushedFileOffset the
// shorter file would contradict (§2.3.1.1), and what is cut is owned by no
// BAT entry, so a crash before or after the truncation loses nothing. No
// I/O runs at Close, so every pending range is past its grace period.
// Caller holds im.mu.
func (im *Image) truncateFreeTail() error {
	fs := &im.space
	if !fs.ready || len(fs.pending) == 0 && len(fs.free) == 0 {
		return nil
	}
	for _, p := range fs.pending {
		fs.setFree(p.off, p.n)
	}
	fs.pending = fs.pending[:0]
	end := im.fileEnd >> unitShift
	for end > 0 && fs.isFree(end-1) {
		end--
	}
	newEnd := end << unitShift
	if newEnd >= im.fileEnd {
		return nil
	}
	if err := im.s.Truncate(int64(newEnd)); err != nil {
		return fmt.Errorf("close: truncate free space at %#x: %w", newEnd, err)
	}
	for u := end; u < im.fileEnd>>unitShift; u++ {
		fs.free[u/64] &^= 1 << (u % 64)
	}
	im.fileEnd = newEnd
	if err := im.s.Sync(); err != nil {
		return fmt.Errorf("close: sync after truncating free space: %w", err)
	}
	return nil
}
