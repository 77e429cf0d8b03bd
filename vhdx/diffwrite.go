package vhdx

// Writes to a differencing image (the top of a chain).
//
// A write into sectors this file does not hold never copies parent data. It
// gets a payload block (when the block is NOT_PRESENT) and the chunk's
// sector bitmap block (when the chunk has none) at the end of the file,
// writes the data there, and then, in one journal entry (§2.3), sets the
// sectors' bitmap bits (§2.4) and the BAT entries: payload PARTIALLY_PRESENT,
// bitmap SB_BLOCK_PRESENT (§2.5.1). The journal flushes the data before the
// entry, so a crash at any point leaves either the old state (bits clear:
// the sectors still come from the parent) or the new one. A write covering
// a whole block makes it FULLY_PRESENT instead, with no bitmap.
//
// Bitmap and BAT updates are serialised by im.mu; writes into sectors whose
// bits are already set go straight to the file without it.

import (
	"fmt"
)

// allPresent reports whether every sector of [pos, pos+n) of a
// PARTIALLY_PRESENT block has its bit set.
func (im *Image) allPresent(pos, n uint64) (bool, error) {
	lss := uint64(im.l.logicalSector)
	sec, end := pos/lss, (pos+n+lss-1)/lss
	for sec < end {
		run, set, err := im.bitmapRun(sec, end-sec)
		if err != nil || !set {
			return false, err
		}
		sec += run
	}
	return true, nil
}

// writeDiff writes p (inside one block, sector aligned) at virtual offset
// pos of a differencing image, block entry idx, offset in within the block.
func (im *Image) writeDiff(p []byte, pos, idx, in uint64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed.Load() {
		return fmt.Errorf("write: %w", ErrClosed)
	}
	e := im.bat[idx].Load()
	bs := uint64(im.l.blockSize)
	blockStart := pos - in
	whole := in == 0 && uint64(len(p)) == min(bs, im.l.size-blockStart)
	switch batState(e) {
	case stateFullyPresent: // another writer won the race
		return im.writePayload(p, batFileOffset(e)+in)
	case stateNotPresent:
		if whole {
			return im.allocateLocked(p, idx, in)
		}
	case statePartiallyPresent:
		off := batFileOffset(e)
		if whole {
			if err := im.writePayload(p, off); err != nil {
				return err
			}
			full := makeBATEntry(stateFullyPresent, off)
			if err := im.growTo(im.fileEnd); err != nil {
				return err
			}
			if err := im.journalBATEntry(idx, full, im.fileEnd); err != nil {
				return err
			}
			im.bat[idx].Store(full)
			return nil
		}
		if ok, err := im.allPresent(pos, uint64(len(p))); err != nil {
			return err
		} else if ok {
			return im.writePayload(p, off+in)
		}
	default:
		// ZERO, UNDEFINED, UNMAPPED: the block reads as zeros, not as the
		// parent, so it becomes FULLY_PRESENT over fresh (zero) space.
		return im.allocateLocked(p, idx, in)
	}
	return im.setPresent(p, pos, idx, in, e)
}

// setPresent is the bitmap path of writeDiff: e is NOT_PRESENT or
// PARTIALLY_PRESENT and p does not cover the block. Caller holds im.mu.
func (im *Image) setPresent(p []byte, pos, idx, in, e uint64) error {
	l := &im.l
	bs := uint64(l.blockSize)
	lss := uint64(l.logicalSector)
	block := pos / bs
	chunk := block / l.chunkRatio
	sbi := l.sbIndex(chunk)
	if sbi >= l.batOnDisk {
		return fmt.Errorf("write at %#x: the sector bitmap entry %d of chunk %d lies past the BAT region (length %#x): %w",
			pos, sbi, chunk, l.bat.length, ErrUnsupported)
	}
	sb := im.bat[sbi].Load()

	// Reserve space: the payload block, then the bitmap block, each new.
	end := im.fileEnd
	payloadOff := batFileOffset(e)
	newPayload := batState(e) == stateNotPresent
	if newPayload {
		payloadOff = end
		end += bs
	}
	sbOff := batFileOffset(sb)
	newSB := batState(sb) != stateFullyPresent
	if newSB {
		sbOff = end
		end += bitmapBlockSize
	}
	if end > maxFileOffset {
		return fmt.Errorf("write at %#x: file would exceed %#x bytes: %w", pos, uint64(maxFileOffset), ErrUnsupported)
	}
	var spans []ownedSpan // what this write reserved, in file order
	if newPayload {
		spans = append(spans, ownedSpan{payloadOff, payloadOff + bs})
	}
	if newSB {
		spans = append(spans, ownedSpan{sbOff, sbOff + bitmapBlockSize})
	}
	im.fileEnd = end
	// Until the journal may have written its entry, a failure gives the
	// reserved ranges back (nospace.go): a disk that stays full does not
	// make every retry grow the file.
	failed := func(err error) error {
		im.giveBackAll(spans)
		return err
	}
	if err := im.growTo(end); err != nil {
		return failed(err)
	}
	write := im.writePayload // may overwrite sectors already present
	if newPayload {
		write = im.writeFreshPayload
	}
	if err := write(p, payloadOff+in); err != nil {
		return failed(err)
	}

	// The bitmap pages holding the written sectors, with their bits set.
	// A block that was NOT_PRESENT gets all its other bits cleared too:
	// the spec does not consult the bitmap of a NOT_PRESENT block, so bits
	// left over from an earlier life of the block (another writer's
	// trim or merge) must not expose the fresh block's zeros.
	perChunk := l.chunkRatio * l.sectorsPerBlock()
	first := pos / lss
	last := first + uint64(len(p))/lss - 1
	clearFirst, clearLast := first, last
	if newPayload {
		clearFirst = block * l.sectorsPerBlock()
		clearLast = clearFirst + l.sectorsPerBlock() - 1
	}
	firstPage, lastPage := (clearFirst%perChunk)/bitmapPageBits, (clearLast%perChunk)/bitmapPageBits
	updates := make([]logUpdate, 0, lastPage-firstPage+3)
	keys := make([]uint64, 0, lastPage-firstPage+1)
	for page := firstPage; page <= lastPage; page++ {
		buf := make([]byte, bitmapPageSize)
		if !newSB {
			if err := im.copyBitmapPage(buf, chunk, page, sb); err != nil {
				return failed(err)
			}
		}
		pageFirst := chunk*perChunk + page*bitmapPageBits
		pageLast := pageFirst + bitmapPageBits - 1
		if newPayload && !newSB {
			clearBits(buf, max(clearFirst, pageFirst)-pageFirst, min(clearLast, pageLast)-pageFirst)
		}
		if first <= pageLast && last >= pageFirst {
			setBits(buf, max(first, pageFirst)-pageFirst, min(last, pageLast)-pageFirst)
		}
		updates = append(updates, logUpdate{offset: sbOff + page*bitmapPageSize, data: buf})
		keys = append(keys, chunk*bitmapPagesPerBlk+page)
	}

	// The BAT sectors: payload entry PARTIALLY_PRESENT, bitmap entry PRESENT.
	var set [][2]uint64
	if newPayload {
		set = append(set, [2]uint64{idx, makeBATEntry(statePartiallyPresent, payloadOff)})
	}
	if newSB {
		set = append(set, [2]uint64{sbi, makeBATEntry(stateFullyPresent, sbOff)})
	}
	if len(set) > 0 {
		u, err := im.batSectorUpdate(set[0][0], set)
		if err != nil {
			return failed(err)
		}
		updates = append(updates, u)
		if len(set) == 2 && set[1][0]*8/batSectorSize != set[0][0]*8/batSectorSize {
			u, err := im.batSectorUpdate(set[1][0], set)
			if err != nil {
				return failed(err)
			}
			updates = append(updates, u)
		}
	}
	// Deferred: the in-place bitmap and BAT writes become durable with the
	// next sync, and replay of this entry redoes them (doc.go, rule 4).
	if err := im.journal.commitDeferred(updates, im.fileEnd, im.fileEnd); err != nil {
		im.giveBackAfterCommit(err, spans...)
		return fmt.Errorf("write at %#x: sector bitmap of chunk %d: commit through the log: %w", pos, chunk, err)
	}

	// Publish: bitmap pages, then the bitmap entry, then the payload entry,
	// so a reader that sees PARTIALLY_PRESENT finds the bitmap.
	for i, k := range keys {
		im.bitmaps.store(k, updates[i].data)
	}
	if newSB {
		im.bat[sbi].Store(makeBATEntry(stateFullyPresent, sbOff))
	}
	if newPayload {
		im.bat[idx].Store(makeBATEntry(statePartiallyPresent, payloadOff))
		im.allocated.Add(1)
		im.counters.allocations.Add(1)
	}
	return nil
}

// growTo extends the file to end (1 MiB aligned) if it is shorter: a
// journal entry's FlushedFileOffset may not exceed the file size. Caller
// holds im.mu.
func (im *Image) growTo(end uint64) error {
	sz, err := fileSizeOf(im.s)
	if err != nil {
		return err
	}
	if sz >= end {
		return nil
	}
	if err := im.s.Truncate(int64(end)); err != nil {
		return fmt.Errorf("extend file to %#x: %w", end, noSpace(err))
	}
	return nil
}

// copyBitmapPage copies the current contents of a page of chunk's bitmap
// (block entry sb, present) into b, through the cache.
func (im *Image) copyBitmapPage(b []byte, chunk, page, sb uint64) error {
	c := im.bitmaps
	c.mu.Lock()
	defer c.mu.Unlock()
	p, err := im.cachedBitmapPage(chunk, page, sb)
	if err != nil {
		return err
	}
	copy(b, p.bits[:])
	return nil
}

// clearBits clears bits lo..hi (inclusive) of b.
func clearBits(b []byte, lo, hi uint64) {
	for i := lo; i <= hi; {
		if i&7 == 0 && hi-i >= 7 {
			b[i>>3] = 0
			i += 8
			continue
		}
		b[i>>3] &^= 1 << (i & 7)
		i++
	}
}

// setBits sets bits lo..hi (inclusive) of b, LSB first within a byte (§2.4).
func setBits(b []byte, lo, hi uint64) {
	for i := lo; i <= hi; {
		if i&7 == 0 && hi-i >= 7 {
			b[i>>3] = 0xFF
			i += 8
			continue
		}
		b[i>>3] |= 1 << (i & 7)
		i++
	}
}
