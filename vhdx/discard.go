package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// Discard and write-zeroes.
//
// Whole payload blocks leave the BAT: their entries change in batches, up to
// trimBatchSectors 4 KiB BAT sectors per journal entry (§2.3), so trimming a
// whole disk is a handful of commits, and their file ranges are freed (see
// space.go) and punched, so the host file's allocated bytes drop. The state
// they move to reads as zeros:
//   - Discard on a base image: PAYLOAD_BLOCK_UNMAPPED with FileOffsetMB 0
//     (§2.5.1.1: the state for blocks "issued an UNMAP command"; option 2,
//     field set to zero, so the contents can only read as zeros).
//   - Write-zeroes with unmap, and anything on a differencing image:
//     PAYLOAD_BLOCK_ZERO (§2.5.1.1: reads MUST return zeros; on a child
//     neither UNMAPPED nor NOT_PRESENT could promise that the parent's data
//     does not show through).
//
// Parts of blocks are zeroed inside the payload block: a hole punch for
// discard and write-zeroes with unmap, FALLOC_FL_ZERO_RANGE (the space stays
// allocated) for write-zeroes without unmap. A block that is not present
// already reads as zeros on a base image and is left alone.
//
// Fixed images (LeaveBlockAllocated, §2.6.2.1) keep every block allocated:
// discard and write-zeroes zero the range in place with ZERO_RANGE.
//
// Both run lock-free for the in-block zeroing, registered in an epoch like
// any I/O (epoch.go), and take im.mu only to commit BAT changes, where each
// entry is re-read: a write that allocated the block meanwhile is either
// before the commit (and its block is discarded, as the guest asked by
// sending both at once) or after it (and allocates afresh).

// trimMode says what a range is being zeroed for.
type trimMode int

const (
	trimDiscard   trimMode = iota // Discard
	trimZeroUnmap                 // WriteZeroes with unmap
	trimZeroKeep                  // WriteZeroes without unmap: stays allocated
)

func (m trimMode) op() string {
	if m == trimDiscard {
		return "discard"
	}
	return "write zeroes"
}

// trimBatchSectors bounds the BAT sectors per journal entry: 64 data
// sectors and one descriptor sector fit the smallest (1 MiB) log, and cover
// 32768 entries, 256 GiB of disk with 8 MiB blocks.
const trimBatchSectors = 64

// Discard tells the image that [off, off+n) is no longer in use. Afterwards
// the range reads as zeros. off and n are multiples of the logical sector.
func (im *Image) Discard(off, n int64) error { return im.trim(trimDiscard, off, n) }

// WriteZeroes makes [off, off+n) read as zeros. With unmap the space may be
// given back to the host; without it allocated blocks stay allocated.
func (im *Image) WriteZeroes(off, n int64, unmap bool) error {
	if unmap {
		return im.trim(trimZeroUnmap, off, n)
	}
	return im.trim(trimZeroKeep, off, n)
}

func (im *Image) hasParent() bool { return im.imageType() == Differencing }

func (im *Image) trim(mode trimMode, off, n int64) error {
	op := mode.op()
	if im.readOnly {
		return fmt.Errorf("%s: %w", op, ErrReadOnly)
	}
	if n < 0 {
		return fmt.Errorf("%s of %d bytes: %w", op, n, ErrOutOfRange)
	}
	if err := im.checkRange(op, off, uint64(n)); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := im.beginSession(); err != nil {
		return err
	}
	defer im.ep.exit(im.ep.enter())

	bs := uint64(im.l.blockSize)
	start, end := uint64(off), uint64(off)+uint64(n)
	for pos := start; pos < end; {
		b := pos / bs
		blockEnd := min(b*bs+bs, im.l.size) // the last block may be short
		if pos != b*bs || end < blockEnd {
			stop := min(end, blockEnd)
			if err := im.trimPartial(mode, pos, stop); err != nil {
				return err
			}
			pos = stop
			continue
		}
		// Blocks [b, we) are covered entirely.
		we := end / bs
		if end == im.l.size {
			we = im.l.payloadBlocks
		}
		if err := im.trimBlocks(mode, b, we); err != nil {
			return err
		}
		pos = min(we*bs, im.l.size)
	}
	return nil
}

// trimPartial zeroes [start, end), which lies inside one block and does not
// cover it entirely.
func (im *Image) trimPartial(mode trimMode, start, end uint64) error {
	idx, e, in, _ := im.locate(start)
	n := end - start
	switch batState(e) {
	case stateFullyPresent:
		fo := batFileOffset(e) + in
		var err error
		if mode == trimZeroKeep || im.l.leaveAllocated {
			err = zeroKeep(im.s, fo, n)
		} else {
			err = punch(im.s, fo, n)
		}
		if err != nil {
			// ZERO_RANGE may need host space (nospace.go); nothing
			// changed but some sectors of an allocated block.
			return fmt.Errorf("%s in block of BAT entry %d at file offset %#x: %w", mode.op(), idx, fo, noSpace(err))
		}
		im.markDirty() // zeroed in place: a failed sync may lose it (recover.go)
		return nil
	case stateZero:
		return nil
	}
	if !im.hasParent() {
		return nil // not present: reads as zeros already
	}
	if mode == trimDiscard {
		// A child's sectors that are not present show the parent already;
		// discarding them must not allocate. Present sectors of a
		// PARTIALLY_PRESENT block are punched: they read zeros, never the
		// parent's old data.
		if batState(e) == statePartiallyPresent {
			fo := batFileOffset(e) + in
			if err := punch(im.s, fo, n); err != nil {
				return fmt.Errorf("discard in block of BAT entry %d at file offset %#x: %w", idx, fo, err)
			}
			im.markDirty()
		}
		return nil
	}
	// Write-zeroes on a child's block that is not (fully) present: the
	// parent shows where the sector bitmap bits are clear, so real zeros
	// are written, which sets them (diffwrite.go).
	return im.writeZeros(start, n)
}

// writeZeros writes zeros over [off, off+n) (n is less than a block)
// through the write path.
func (im *Image) writeZeros(off, n uint64) error {
	for n > 0 {
		c := min(n, uint64(len(zeroChunk)))
		if _, err := im.WriteAt(zeroChunk[:c], int64(off)); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// trimBlocks handles whole payload blocks [b0, b1): fixed images and
// write-zeroes without unmap zero allocated blocks in place; otherwise the
// BAT entries change in batches.
func (im *Image) trimBlocks(mode trimMode, b0, b1 uint64) error {
	bs := uint64(im.l.blockSize)
	if mode == trimZeroKeep || im.l.leaveAllocated {
		for b := b0; b < b1; b++ {
			idx := batIndex(b, im.l.chunkRatio)
			e := im.bat.load(idx)
			if batState(e) != stateFullyPresent {
				continue
			}
			if err := zeroKeep(im.s, batFileOffset(e), bs); err != nil {
				return fmt.Errorf("%s block of BAT entry %d: %w", mode.op(), idx, noSpace(err))
			}
			im.markDirty()
		}
		if im.l.leaveAllocated || !im.hasParent() {
			return nil
		}
		// A child's blocks that are not fully present: ZERO state below.
	}
	// Batches of blocks whose entries lie in at most trimBatchSectors BAT
	// sectors.
	perSector := uint64(batSectorSize / 8)
	for b := b0; b < b1; {
		firstSec := batIndex(b, im.l.chunkRatio) / perSector
		stop := b
		for stop < b1 && batIndex(stop, im.l.chunkRatio)/perSector < firstSec+trimBatchSectors {
			stop++
		}
		if err := im.trimBatch(mode, b, stop); err != nil {
			return err
		}
		b = stop
	}
	return nil
}

// targetEntry returns the entry block e moves to, or false to leave it.
func (im *Image) targetEntry(mode trimMode, e uint64) (uint64, bool) {
	st := batState(e)
	if mode == trimZeroKeep {
		// Only a child's blocks that are not fully present get here.
		if st == stateFullyPresent || st == stateZero {
			return 0, false
		}
		return makeBATEntry(stateZero, 0), true
	}
	if im.hasParent() || mode == trimZeroUnmap {
		if e == makeBATEntry(stateZero, 0) {
			return 0, false
		}
		return makeBATEntry(stateZero, 0), true
	}
	switch {
	case st == stateNotPresent, st == stateZero, batFileOffset(e) == 0 && (st == stateUnmapped || st == stateUndefined || st == stateUnmappedV095):
		return 0, false // reads as zeros and owns nothing
	}
	return makeBATEntry(stateUnmapped, 0), true
}

// trimBatch moves the whole blocks [b0, b1) to their trimmed state in
// memory at once and queues the BAT change for a group commit (see
// pendingTrims), then punches the ranges they owned. The ranges are not
// reusable before that commit (and the grace period after it), so a crash
// before the commit leaves the old entries pointing to punched ranges:
// they read zeros, which a discard or write-zeroes whose Flush had not
// returned may do.
func (im *Image) trimBatch(mode trimMode, b0, b1 uint64) error {
	var freed []ownedSpan
	err := func() error {
		im.lockJournal() // groupcommit.go
		defer im.mu.Unlock()
		if im.closed.Load() {
			return fmt.Errorf("%s: %w", mode.op(), ErrClosed)
		}
		var dropped uint64
		for b := b0; b < b1; b++ {
			idx := batIndex(b, im.l.chunkRatio)
			e := im.bat.load(idx)
			ne, ok := im.targetEntry(mode, e)
			if !ok {
				continue
			}
			im.bat.store(idx, ne)
			if batState(e) == stateFullyPresent || batState(e) == statePartiallyPresent {
				dropped++
			}
			sp, owns := im.ownedRange(idx, e)
			if owns {
				freed = append(freed, sp)
			}
			im.trims.add(idx, sp, owns)
		}
		im.allocated.Add(^(dropped - 1)) // subtract
		if im.trims.sectorCount() >= trimBatchSectors {
			return im.commitTrimsLocked()
		}
		return nil
	}()
	if err != nil {
		return fmt.Errorf("%s: %w", mode.op(), err)
	}
	// The ranges are ours until the queued commit and this call's epoch
	// end (no reuse before then, epoch.go), so they can be punched without
	// the lock. Adjacent ranges go out as one call.
	for i := 0; i < len(freed); {
		k := i + 1
		for k < len(freed) && freed[k].start == freed[k-1].end {
			k++
		}
		if err := punch(im.s, freed[i].start, freed[k-1].end-freed[i].start); err != nil {
			return fmt.Errorf("%s: give back file range %#x: %w", mode.op(), freed[i].start, err)
		}
		i = k
	}
	return nil
}

// pendingTrims queues whole-block BAT changes made by Discard and
// WriteZeroes until a group commit: at Flush, at Close, or once they touch
// trimBatchSectors BAT sectors. An fstrim sends one discard per free extent
// and waits for each, so committing per request would cost a journal entry
// (two fdatasyncs) per extent; queued, a whole fstrim is a handful of
// commits. Nothing is lost by waiting: virtio promises durability only
// after a flush. Under im.mu.
type pendingTrims struct {
	sectors map[uint64]struct{} // BAT sector numbers with queued changes
	freed   []ownedSpan         // ranges the changed entries owned
}

func (p *pendingTrims) add(idx uint64, sp ownedSpan, owns bool) {
	if p.sectors == nil {
		p.sectors = map[uint64]struct{}{}
	}
	p.sectors[idx*8/batSectorSize] = struct{}{}
	if owns {
		p.freed = append(p.freed, sp)
	}
}

func (p *pendingTrims) sectorCount() int { return len(p.sectors) }

// commitPendingTrims is commitTrimsLocked for Flush.
func (im *Image) commitPendingTrims() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if len(im.trims.sectors) == 0 {
		return nil // a Flush with no trims queued does not wait for a batch
	}
	im.awaitJournalLocked() // groupcommit.go
	return im.commitTrimsLocked()
}

// commitTrimsLocked journals the BAT sectors holding queued changes, from
// the in-memory BAT (authoritative: a write that reallocated a trimmed
// block meanwhile is in it too), in entries of up to trimBatchSectors
// sectors, and then hands the ranges the old entries owned to the free
// set. On failure nothing is freed and the batch stays queued: the next
// flush commits it again once the journal has recovered (logrecover.go).
// Caller holds im.mu.
func (im *Image) commitTrimsLocked() error {
	p := &im.trims
	if len(p.sectors) == 0 {
		return nil
	}
	secs := make([]uint64, 0, len(p.sectors))
	for s := range p.sectors {
		secs = append(secs, s)
	}
	slices.Sort(secs)
	for len(secs) > 0 {
		n := min(len(secs), trimBatchSectors)
		if err := im.journalBATSectors(secs[:n]); err != nil {
			return err
		}
		secs = secs[n:]
	}
	im.release(p.freed)
	p.sectors, p.freed = nil, nil
	return nil
}

// journalBATSectors commits the given BAT sectors (sorted), as held in
// memory, in one journal entry. A sector reaching past the entries kept in
// memory is read from disk first so the rest is preserved. Caller holds
// im.mu.
func (im *Image) journalBATSectors(secs []uint64) error {
	updates := make([]logUpdate, 0, len(secs))
	for _, sec := range secs {
		u, err := im.batSectorImage(sec, false)
		if err != nil {
			return err
		}
		updates = append(updates, u)
	}
	if im.beforeTrimCommit != nil {
		im.beforeTrimCommit()
	}
	if err := im.journal.commit(updates, im.fileEnd, im.fileEnd); err != nil {
		return fmt.Errorf("BAT sectors %d..%d: commit through the log: %w", secs[0], secs[len(secs)-1], err)
	}
	return nil
}

// batChange is one entry of a batch (compact.go).
type batChange struct{ idx, old, new uint64 }

// journalBATChanges commits the BAT sectors holding changes (sorted by idx)
// with the new values, in one journal entry. Entries kept in memory are
// written from memory, which is authoritative; a sector reaching past them
// is read from disk first so the rest is preserved. Caller holds im.mu.
func (im *Image) journalBATChanges(changes []batChange) error {
	var updates []logUpdate
	perSector := uint64(batSectorSize / 8)
	for i := 0; i < len(changes); {
		sec := changes[i].idx / perSector
		first := sec * perSector
		u, err := im.batSectorImage(sec, false)
		if err != nil {
			return err
		}
		for ; i < len(changes) && changes[i].idx/perSector == sec; i++ {
			binary.LittleEndian.PutUint64(u.data[(changes[i].idx-first)*8:], changes[i].new)
		}
		updates = append(updates, u)
	}
	if im.beforeTrimCommit != nil {
		im.beforeTrimCommit()
	}
	if err := im.journal.commit(updates, im.fileEnd, im.fileEnd); err != nil {
		return fmt.Errorf("BAT entries %d..%d: commit through the log: %w", changes[0].idx, changes[len(changes)-1].idx, err)
	}
	return nil
}

// punchHoler is a Storage that can zero a range and free its space in one
// step (osStorage: FALLOC_FL_PUNCH_HOLE). It is rangeZeroer under the name
// that says what the data path uses it for.
type punchHoler = rangeZeroer

// allocZeroer is a Storage that zeroes a range and keeps it allocated
// (osStorage: FALLOC_FL_ZERO_RANGE).
type allocZeroer interface {
	zeroKeep(off, n int64) error
}

// punch zeroes [off, off+n) of the file and gives its space back where the
// storage can; otherwise zeros are written in bounded chunks.
func punch(s Storage, off, n uint64) error {
	if z, ok := s.(punchHoler); ok {
		return z.zeroRange(int64(off), int64(n))
	}
	return writeZeroChunks(s, int64(off), int64(n))
}

// zeroKeep zeroes [off, off+n) and keeps it allocated.
func zeroKeep(s Storage, off, n uint64) error {
	if z, ok := s.(allocZeroer); ok {
		return z.zeroKeep(int64(off), int64(n))
	}
	return writeZeroChunks(s, int64(off), int64(n))
}

// zeroKeep uses FALLOC_FL_ZERO_RANGE; where the file system lacks it, a
// hole punch followed by an allocating fallocate gives the same result in
// two calls; zeros are written only when neither exists.
func (s osStorage) zeroKeep(off, n int64) error {
	fd := int(s.f.Fd())
	err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("zero range at %#x+%#x: %w", off, n, err)
	}
	err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		err = unix.Fallocate(fd, unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return writeZeroChunks(s, off, n)
	}
	return fmt.Errorf("zero range at %#x+%#x: %w", off, n, err)
}

// zeroKeep forwards to the wrapped storage (allocZeroer).
func (s *syncLatch) zeroKeep(off, n int64) error {
	if z, ok := s.Storage.(allocZeroer); ok {
		return z.zeroKeep(off, n)
	}
	return writeZeroChunks(s.Storage, off, n)
}
