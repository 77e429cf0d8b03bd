package vhdx

import (
	"cmp"
	"fmt"
	"slices"
)

// CompactReport says what Compact reclaimed.
type CompactReport struct {
	ZeroBlocks     uint64 // allocated blocks that held only zeros, unmapped
	MovedBlocks    uint64 // blocks moved from the end of the file into holes
	FileSizeBefore int64
	FileSizeAfter  int64
	HostBefore     int64 // bytes allocated on the host (st_blocks), -1 if unknown
	HostAfter      int64
}

// CompactProgress is called as Compact works: phase "scan" (reading
// allocated blocks for zeros) or "move", done out of total blocks.
type CompactProgress func(phase string, done, total uint64)

// Compact shrinks the image at path, offline, the way Hyper-V's Optimize-VHD
// does: allocated blocks that hold only zeros leave the BAT (as a discard
// would: batched journal entries, ranges punched), blocks at the end of the
// file move into holes nearer the start, and the free tail of the file is
// cut off when the image is closed. Every BAT change goes through the log
// after the data it points to is durable, so a power cut at any point
// leaves every block readable with its data. Fixed images keep every block
// and are refused.
func Compact(path string, progress CompactProgress) (*CompactReport, error) {
	im, err := Open(path, OpenOptions{})
	if err != nil {
		return nil, fmt.Errorf("compact: %w", err)
	}
	rep := &CompactReport{HostBefore: im.hostAllocated()}
	rep.FileSizeBefore, _ = im.s.Size()
	err = im.compact(rep, progress)
	if cerr := im.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("compact: %w", cerr)
	}
	if err != nil {
		return rep, err
	}
	// Close truncated the free tail; measure the file as it is now.
	after, err := Open(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		return rep, fmt.Errorf("compact: reopen: %w", err)
	}
	rep.FileSizeAfter, _ = after.s.Size()
	rep.HostAfter = after.hostAllocated()
	after.Close()
	return rep, nil
}

func (im *Image) compact(rep *CompactReport, progress CompactProgress) error {
	if progress == nil {
		progress = func(string, uint64, uint64) {}
	}
	if im.l.leaveAllocated {
		return fmt.Errorf("compact: a fixed image keeps every block allocated: %w", ErrUnsupported)
	}
	if err := im.beginSession(); err != nil {
		return err
	}
	defer im.ep.exit(im.ep.enter())
	bs := uint64(im.l.blockSize)
	cr := im.l.chunkRatio

	// Phase 1: all-zero blocks. Runs of them are trimmed together.
	total := im.l.payloadBlocks
	buf := make([]byte, min(bs, 4*mib))
	var run0, runN uint64
	flush := func() error {
		if runN == 0 {
			return nil
		}
		err := im.trimBlocks(trimZeroUnmap, run0, run0+runN)
		rep.ZeroBlocks += runN
		runN = 0
		return err
	}
	for b := uint64(0); b < total; b++ {
		progress("scan", b, total)
		e := im.bat.load(batIndex(b, cr))
		zero := batState(e) == stateFullyPresent
		for off := uint64(0); zero && off < bs; off += uint64(len(buf)) {
			if err := im.readPayload(buf, batFileOffset(e)+off); err != nil {
				return err
			}
			zero = allZero(buf)
		}
		if zero {
			if runN == 0 {
				run0 = b
			}
			runN++
			continue
		}
		if err := flush(); err != nil {
			return err
		}
	}
	if err := flush(); err != nil {
		return err
	}
	progress("scan", total, total)

	// Phase 2: move the blocks furthest from the start into the lowest
	// holes, in batches: copy, then one journal entry for the batch's BAT
	// entries (the journal flushes the copies first). A source range is
	// freed only after its entry moved, and never used as a destination
	// in the same batch.
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.commitTrimsLocked(); err != nil { // the zero blocks' BAT changes
		return fmt.Errorf("compact: %w", err)
	}
	im.initSpace()
	im.promote()
	for _, p := range im.space.pending { // offline: no I/O holds anything
		im.space.setFree(p.off, p.n)
	}
	im.space.pending = im.space.pending[:0]
	type blk struct{ idx, off uint64 }
	var blocks []blk
	for b := uint64(0); b < total; b++ {
		idx := batIndex(b, cr)
		if e := im.bat.load(idx); batState(e) == stateFullyPresent || batState(e) == statePartiallyPresent {
			blocks = append(blocks, blk{idx, batFileOffset(e)})
		}
	}
	slices.SortFunc(blocks, func(a, b blk) int { return cmp.Compare(b.off, a.off) }) // furthest first
	var moved uint64
	copyBuf := make([]byte, min(bs, 4*mib))
	for len(blocks) > 0 {
		var changes []batChange
		var sources []ownedSpan
		for len(blocks) > 0 && len(changes) < trimBatchSectors {
			src := blocks[0]
			dst, ok := im.space.take(bs >> unitShift)
			if !ok {
				break
			}
			if dst > src.off {
				// The lowest hole lies beyond this block: nothing further
				// down can move either. Give the hole back and stop.
				im.space.setFree(dst, bs)
				blocks = nil
				break
			}
			blocks = blocks[1:]
			for off := uint64(0); off < bs; off += uint64(len(copyBuf)) {
				if err := im.readPayload(copyBuf, src.off+off); err != nil {
					return err
				}
				if err := im.writePayload(copyBuf, dst+off); err != nil {
					return err
				}
			}
			old := im.bat.load(src.idx)
			changes = append(changes, batChange{src.idx, old, makeBATEntry(batState(old), dst)})
			sources = append(sources, ownedSpan{src.off, src.off + bs})
		}
		if len(changes) == 0 {
			break
		}
		slices.SortFunc(changes, func(a, b batChange) int { return cmp.Compare(a.idx, b.idx) })
		if err := im.journalBATChanges(changes); err != nil {
			return fmt.Errorf("compact: %w", err)
		}
		for _, c := range changes {
			im.bat.store(c.idx, c.new)
		}
		for _, sp := range sources {
			if err := punch(im.s, sp.start, sp.end-sp.start); err != nil {
				return fmt.Errorf("compact: give back %#x: %w", sp.start, err)
			}
			im.space.setFree(sp.start, sp.end-sp.start)
		}
		moved += uint64(len(changes))
		rep.MovedBlocks = moved
		progress("move", moved, moved+uint64(len(blocks)))
	}
	return nil
}
