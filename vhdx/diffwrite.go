package vhdx

// Writes to a differencing image (the top of a chain).
//
// A write into sectors this file does not hold never copies parent data. It
// gets a payload block (when the block is NOT_PRESENT) and the chunk's
// sector bitmap block (when the chunk has none), writes the data there, and
// then, in a journal entry (§2.3) shared with the other first writes that
// arrive together (diffgroup.go), sets the sectors' bitmap bits (§2.4) and
// the BAT entries: payload PARTIALLY_PRESENT, bitmap SB_BLOCK_PRESENT
// (§2.5.1). The journal flushes the data before the entry, so a crash at
// any point leaves either the old state (bits clear: the sectors still
// come from the parent) or the new one. A write covering a whole block, or
// any write into a block that reads as zeros (ZERO, UNDEFINED, UNMAPPED),
// makes the block FULLY_PRESENT instead, with no bitmap, in the same
// batches and with the same order: data, sync, entry.
//
// Bitmap and BAT updates are made by a batch's leader under im.mu; writes
// into sectors whose bits are already set go straight to the file without
// it.

import (
	"errors"
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

// holdsAll reports whether the image holds every sector of [pos, pos+n)
// (FULLY_PRESENT blocks, or set bits of PARTIALLY_PRESENT ones), so that a
// write there is an in-place overwrite; false also when a bitmap page
// cannot be read (the write path then reports the error).
func (im *Image) holdsAll(pos, n uint64) bool {
	for n > 0 {
		_, e, _, left := im.locate(pos)
		k := min(n, left)
		switch batState(e) {
		case stateFullyPresent:
		case statePartiallyPresent:
			if ok, err := im.allPresent(pos, k); err != nil || !ok {
				return false
			}
		default:
			return false
		}
		pos, n = pos+k, n-k
	}
	return true
}

// writeDiff writes p (inside one block, sector aligned) at virtual offset
// pos of a differencing image, block entry idx, offset in within the block.
// Writes into sectors the image does not hold join a batch (diffgroup.go):
// as bitmap members, or as members that make the block FULLY_PRESENT (a
// write covering the block, or any write into a block that reads as zeros).
// A block is reserved by one batch at a time, for one kind of change: a
// writer finding it reserved by a batch already taken by its leader waits
// for that batch; in the open batch, it joins the reservation, unless it
// would make the block FULLY_PRESENT where the batch gives it a bitmap (then
// it waits too). When the sectors turn out to be present already (another
// writer's batch published them), it returns inPlace and the file offset to
// write p at, without a lock (writeChunk).
func (im *Image) writeDiff(p []byte, pos, idx, in uint64) (fileOff uint64, inPlace bool, err error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	ag := im.group()
	bs := uint64(im.l.blockSize)
	blockStart := pos - in
	whole := in == 0 && uint64(len(p)) == min(bs, im.l.size-blockStart)
	for {
		if im.closed.Load() {
			return 0, false, fmt.Errorf("write: %w", ErrClosed)
		}
		e := im.bat.load(idx)
		st := batState(e)
		// ZERO, UNDEFINED and UNMAPPED read as zeros, not as the parent:
		// any write makes the block FULLY_PRESENT over fresh (zero) space.
		full := whole || st != stateNotPresent && st != statePartiallyPresent && st != stateFullyPresent
		var err error
		switch fb, pb := ag.pendFull[idx], ag.pendPay[idx]; {
		case fb != nil && fb != ag.open, pb != nil && (full || pb != ag.open):
			// A batch reserved the block: once taken by its leader it has
			// fixed its change; a write making the block FULLY_PRESENT
			// cannot share a bitmap member's fresh block. Wait for it to
			// finish, then look again.
			if ag.reservedWait != nil {
				ag.reservedWait(idx)
			}
			ag.cond.Wait()
			continue
		case fb != nil: // the open batch makes the block FULLY_PRESENT: join it
			err = im.joinFullBatch(p, idx, in, e)
		case st == stateFullyPresent: // another writer won the race
			return batFileOffset(e) + in, true, nil
		case full:
			err = im.joinFullBatch(p, idx, in, e)
		default: // NOT_PRESENT or PARTIALLY_PRESENT, not whole
			if st == statePartiallyPresent {
				if ok, err := im.allPresent(pos, uint64(len(p))); err != nil {
					return 0, false, err
				} else if ok {
					return batFileOffset(e) + in, true, nil
				}
			}
			err = im.joinDiffBatch(p, pos, idx, in, e)
		}
		if errors.Is(err, errDiffRetry) {
			continue
		}
		return 0, false, err
	}
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
