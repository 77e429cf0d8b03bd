package vhdx

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"
)

// Writes that make a child's block FULLY_PRESENT (a write covering the
// block, or any write into a block that reads as zeros) in the
// differencing batches (diffgroup.go, joinFullBatch).

// childWant is the chain's contents after the writes, over diffParentDisk
// with the blocks in zeroed read as zeros first (discarded in the child).
func childWant(zeroed []int64, ws ...imageWrite) []byte {
	want := diffParentDisk()
	for _, b := range zeroed {
		clear(want[b*mib : (b+1)*mib])
	}
	for _, w := range ws {
		copy(want[w.off:], w.data)
	}
	return want
}

// checkChild fails t unless every sector of the blocks reads as in want.
func checkChild(t *testing.T, im *Image, want []byte, blocks []int64, when string) {
	t.Helper()
	got := make([]byte, mib)
	for _, b := range blocks {
		if _, err := im.ReadAt(got, b*mib); err != nil {
			t.Fatalf("%s: read block %d: %v", when, b, err)
		}
		for sec := int64(0); sec < mib; sec += 512 {
			if !bytes.Equal(got[sec:sec+512], want[b*mib+sec:b*mib+sec+512]) {
				t.Fatalf("%s: sector at %#x reads neither the parent (or zeros of a discarded block) nor the write into it", when, b*mib+sec)
			}
		}
	}
}

func (im *Image) blockState(b int64) int {
	return int(batState(im.bat.load(batIndex(uint64(b), im.l.chunkRatio))))
}

// TestWholeBlockAndZeroBlockChildWritesShareOneJournalEntryWithPartialOnes:
// writes arriving together — one covering a NOT_PRESENT block, one
// covering a PARTIALLY_PRESENT block, two 4 KiB writes into a block the
// child discarded (ZERO), and partial first writes into a fresh and a
// partial block — are published by one journal entry and one set of
// syncs; the whole and zero blocks become FULLY_PRESENT (the rest of the
// ZERO block reads zeros), the others keep reading the parent around the
// writes, before and after a reopen.
func TestWholeBlockAndZeroBlockChildWritesShareOneJournalEntryWithPartialOnes(t *testing.T) {
	mc := newDiffChain(t)
	ms := newMemStorage(bytes.Clone(mc.child))
	im, err := mc.openChild(t, ms, false)
	if err != nil {
		t.Fatal(err)
	}
	pre := imageWrite{3*mib + 8192, pattern(2, 4096)}
	if _, err := im.WriteAt(pre.data, pre.off); err != nil { // session start; block 3 partial
		t.Fatal(err)
	}
	if err := im.Discard(5*mib, mib); err != nil { // block 5: ZERO
		t.Fatal(err)
	}
	if st := im.blockState(5); st != stateZero {
		t.Fatalf("discarded child block in state %d, want ZERO", st)
	}
	ws := []imageWrite{
		{2 * mib, pattern(90, mib)},          // NOT_PRESENT, whole
		{3 * mib, pattern(91, mib)},          // PARTIALLY_PRESENT, whole
		{5*mib + 4096, pattern(92, 4096)},    // ZERO: a fresh block, zeros around
		{5*mib + 256*kib, pattern(93, 8192)}, // ZERO again: the same reservation
		{7*mib + 512, pattern(94, 4096)},     // NOT_PRESENT, partial: bitmap
		{1 * mib, pattern(95, 4096)},         // NOT_PRESENT, partial, same page
	}
	d := driveBatches(im)
	before := im.Counters()
	d.mustBatch(t, im, ws)
	after := im.Counters()
	if got := after.JournalCommits - before.JournalCommits; got != 1 {
		t.Fatalf("%d journal entries for one batch of %d first writes, want 1", got, len(ws))
	}
	if got := after.Syncs - before.Syncs; got > 2 {
		t.Fatalf("%d fdatasyncs for one batch, want at most 2 (payload, entry)", got)
	}
	if got := after.Allocations - before.Allocations; got != 4 {
		t.Fatalf("%d blocks allocated, want 4 (blocks 1, 2, 5, 7; block 3 keeps its range)", got)
	}
	for b, st := range map[int64]int{2: stateFullyPresent, 3: stateFullyPresent, 5: stateFullyPresent, 7: statePartiallyPresent, 1: statePartiallyPresent} {
		if got := im.blockState(b); got != st {
			t.Fatalf("block %d in state %d, want %d", b, got, st)
		}
	}
	want := childWant([]int64{5}, append([]imageWrite{pre}, ws...)...)
	blocks := []int64{1, 2, 3, 5, 7}
	checkAcrossReopen(t, mc, ms, im, func(im *Image) { checkChild(t, im, want, blocks, "after the batch") })
}

// reservedWaits makes im report, on the returned channel, each time a
// differencing write starts waiting for a batch that reserved its block.
func reservedWaits(im *Image) chan uint64 {
	c := make(chan uint64, 64)
	im.mu.Lock()
	im.group().reservedWait = func(idx uint64) {
		select {
		case c <- idx:
		default:
		}
	}
	im.mu.Unlock()
	return c
}

// gatedSync holds the first Sync after arm until release is closed, after
// telling entered.
type gatedSync struct {
	Storage
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (g *gatedSync) Sync() error {
	if g.armed.Swap(false) {
		close(g.entered)
		<-g.release
	}
	return g.Storage.Sync()
}

// TestPartialAndWholeWritersOnOneChildBlockNeverShareItWrongly drives a
// partial first write and a write that makes the same block FULLY_PRESENT
// against each other:
//   - partial first (its batch reserves a fresh block for a bitmap), then
//     whole: the whole write waits for the partial's batch and then makes
//     the block FULLY_PRESENT in a batch of its own (two entries);
//   - whole first, then partial while the whole's batch is still open: the
//     partial joins it, writing into the same reserved range (one entry);
//   - whole first, then partial while the whole's batch is committing: the
//     partial waits and then writes in place (no entry of its own);
//   - two 4 KiB writes into a ZERO block (each makes it FULLY_PRESENT):
//     the second joins the first's open batch, or waits for it to commit
//     and writes in place.
//
// Every case ends with the later write's data over the earlier's, the
// block FULLY_PRESENT, and nothing else of the block changed, also after
// a reopen.
func TestPartialAndWholeWritersOnOneChildBlockNeverShareItWrongly(t *testing.T) {
	parallelSweep(t)
	const blk = 9
	whole := imageWrite{blk * mib, pattern(100, mib)}
	zeroW := imageWrite{blk*mib + 128*kib, pattern(101, 4096)}
	partial := imageWrite{blk*mib + 64*kib, pattern(102, 4096)}
	for _, c := range []struct {
		name       string
		zero       bool // discard the block first; zeroW instead of whole
		fullFirst  bool
		committing bool // the second write arrives while the first's batch commits
		entries    uint64
	}{
		{"partial then whole", false, false, false, 2},
		{"whole then partial into its open batch", false, true, false, 1},
		{"whole then partial while it commits", false, true, true, 1},
		{"ZERO block: second write into the first's open batch", true, true, false, 1},
		{"ZERO block: second write while the first commits", true, true, true, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			mc := newDiffChain(t)
			ms := newMemStorage(bytes.Clone(mc.child))
			gs := &gatedSync{Storage: ms, entered: make(chan struct{}), release: make(chan struct{})}
			im, err := mc.openChild(t, gs, false)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(2, 512), 40*mib); err != nil { // session start
				t.Fatal(err)
			}
			var zeroed []int64
			fw := whole
			if c.zero {
				if err := im.Discard(blk*mib, mib); err != nil {
					t.Fatal(err)
				}
				zeroed, fw = []int64{blk}, zeroW
			}
			first, second := partial, fw
			if c.fullFirst {
				first, second = fw, partial
			}
			waits := reservedWaits(im)
			before := im.Counters()
			errc := make(chan error, 2)
			write := func(w imageWrite) {
				go func() {
					_, err := im.WriteAt(w.data, w.off)
					errc <- err
				}()
			}
			if c.committing {
				gs.armed.Store(true) // the first batch's sync before its entry
				write(first)
				<-gs.entered
				write(second)
				<-waits // the second waits for the committing batch
				close(gs.release)
			} else {
				d := driveBatches(im)
				d.release = make(chan struct{})
				write(first)
				<-d.arrived // the first has written its payload into its batch
				write(second)
				if c.entries == 2 {
					<-waits // it cannot join: it waits for the first's batch
				} else {
					<-d.arrived // it joined the open batch
				}
				close(d.release)
			}
			for range 2 {
				if err := <-errc; err != nil {
					t.Fatal(err)
				}
			}
			if got := im.Counters().JournalCommits - before.JournalCommits; got != c.entries {
				t.Fatalf("%d journal entries, want %d", got, c.entries)
			}
			if st := im.blockState(blk); st != stateFullyPresent {
				t.Fatalf("block in state %d, want FULLY_PRESENT", st)
			}
			want := childWant(zeroed, first, second)
			checkAcrossReopen(t, mc, ms, im, func(im *Image) { checkChild(t, im, want, []int64{blk}, c.name) })
		})
	}
}

// TestReaderOfAChildBlockMadeWholeSeesTheOldStateUntilPublish: while the
// batch making a block FULLY_PRESENT commits (its payload already in the
// block's range), a reader of the block reads what it read before — the
// parent for a NOT_PRESENT block, the parent's sectors for a
// PARTIALLY_PRESENT one (the child's own are rewritten in place), zeros
// for a ZERO one — and once the write returns, the new data (and zeros
// around a write into a ZERO block).
func TestReaderOfAChildBlockMadeWholeSeesTheOldStateUntilPublish(t *testing.T) {
	parallelSweep(t)
	for _, c := range []struct {
		name  string
		blk   int64
		pre   *imageWrite // makes the block PARTIALLY_PRESENT first
		zero  bool        // discard the block first
		write imageWrite
	}{
		{"not present, whole", 11, nil, false, imageWrite{11 * mib, pattern(110, mib)}},
		{"partially present, whole", 12, &imageWrite{12*mib + 4096, pattern(111, 8192)}, false, imageWrite{12 * mib, pattern(112, mib)}},
		{"zero, 4 KiB", 13, nil, true, imageWrite{13*mib + 512*kib, pattern(113, 4096)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			mc := newDiffChain(t)
			im, err := mc.openChild(t, newMemStorage(bytes.Clone(mc.child)), false)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if _, err := im.WriteAt(pattern(2, 512), 40*mib); err != nil { // session start
				t.Fatal(err)
			}
			var pre []imageWrite
			if c.pre != nil {
				pre = append(pre, *c.pre)
				if _, err := im.WriteAt(c.pre.data, c.pre.off); err != nil {
					t.Fatal(err)
				}
			}
			var zeroed []int64
			if c.zero {
				zeroed = []int64{c.blk}
				if err := im.Discard(c.blk*mib, mib); err != nil {
					t.Fatal(err)
				}
			}
			old := childWant(zeroed, pre...)
			var during []byte
			im.mu.Lock()
			im.group().beforeDiffCommit = func() {
				during = make([]byte, mib)
				if _, err := im.ReadAt(during, c.blk*mib); err != nil {
					t.Error(err)
				}
			}
			im.mu.Unlock()
			if _, err := im.WriteAt(c.write.data, c.write.off); err != nil {
				t.Fatal(err)
			}
			if during == nil {
				t.Fatal("the write did not go through a differencing batch")
			}
			// Sectors the child already held are overwritten in place, as
			// any rewrite is: they may read either; every other sector
			// reads the old contents.
			neu := childWant(zeroed, append(pre, c.write)...)
			for sec := int64(0); sec < mib; sec += 512 {
				at := c.blk*mib + sec
				held := c.pre != nil && at >= c.pre.off && at < c.pre.off+int64(len(c.pre.data))
				if !bytes.Equal(during[sec:sec+512], old[at:at+512]) && !(held && bytes.Equal(during[sec:sec+512], neu[at:at+512])) {
					t.Fatalf("sector at %#x: a read while the batch commits does not read the block's old contents", at)
				}
			}
			if st := im.blockState(c.blk); st != stateFullyPresent {
				t.Fatalf("block in state %d after the write, want FULLY_PRESENT", st)
			}
			checkChild(t, im, childWant(zeroed, append(pre, c.write)...), []int64{c.blk}, "after the write")
		})
	}
}

// TestFailingMembersThatMakeBlocksWholeFailAloneOrFailTheBatch: in a batch
// where a whole-block write into a NOT_PRESENT block and a write into a
// ZERO block fail their payload writes, those two get the error and their
// blocks keep their state (parent; zeros) and give their ranges back,
// while a whole-block write into a PARTIALLY_PRESENT block and a partial
// first write in the same batch succeed. Then a batch of such writes whose
// sync fails fails every member and publishes nothing (rule 7); the same
// writes succeed afterwards. Both also after a reopen.
func TestFailingMembersThatMakeBlocksWholeFailAloneOrFailTheBatch(t *testing.T) {
	mc := newDiffChain(t)
	bad := pattern(120, mib)
	ms := newMemStorage(bytes.Clone(mc.child))
	fs := &failingSync{Storage: &failingPayload{Storage: ms, marker: bad[:64]}}
	im, err := mc.openChild(t, fs, false)
	if err != nil {
		t.Fatal(err)
	}
	pre := imageWrite{17*mib + 4096, pattern(121, 4096)}
	if _, err := im.WriteAt(pre.data, pre.off); err != nil { // session start; block 17 partial
		t.Fatal(err)
	}
	for _, b := range []int64{20, 30} {
		if err := im.Discard(b*mib, mib); err != nil {
			t.Fatal(err)
		}
	}
	zeroed := []int64{20, 30}
	before := im.Counters()
	ws := []imageWrite{
		{13 * mib, bad},                    // NOT_PRESENT, whole: fails
		{20*mib + 4096, bad[:4096]},        // ZERO: fails
		{17 * mib, pattern(122, mib)},      // PARTIALLY_PRESENT, whole
		{0, pattern(123, 4096)},            // NOT_PRESENT, partial
		{30*mib + 8192, pattern(124, 512)}, // ZERO
	}
	d := driveBatches(im)
	errs := d.batch(im, ws)
	for i, w := range ws {
		failed := bytes.Equal(w.data[:64], bad[:64])
		if failed != errors.Is(errs[i], errPayloadFault) || !failed && errs[i] != nil {
			t.Fatalf("write %d at %#x: error %v, want the fault only for the failing members", i, w.off, errs[i])
		}
	}
	for b, st := range map[int64]int{13: stateNotPresent, 20: stateZero, 17: stateFullyPresent, 0: statePartiallyPresent, 30: stateFullyPresent} {
		if got := im.blockState(b); got != st {
			t.Fatalf("block %d in state %d, want %d", b, got, st)
		}
	}
	if got := im.Counters().Allocations - before.Allocations; got != 2 {
		t.Fatalf("%d blocks allocated, want 2 (blocks 0 and 30; the failed members' blocks are not)", got)
	}
	good := append([]imageWrite{pre}, ws[2:]...)
	blocks := []int64{0, 13, 17, 20, 30}
	checkChild(t, im, childWant(zeroed, good...), blocks, "after the failed members")

	// A failed commit: every member fails, nothing is published. (No
	// member rewrites sectors the child holds: a sync failing after such
	// an in-place write fails every later sync until a reopen, host I/O
	// rule 3.)
	ws2 := []imageWrite{
		{1 * mib, pattern(126, mib)},       // NOT_PRESENT, whole
		{20*mib + 4096, pattern(127, 512)}, // ZERO
		{2*mib + 512, pattern(128, 512)},   // NOT_PRESENT, partial
	}
	im.mu.Lock()
	im.group().beforeDiffCommit = func() { fs.armed.Store(true) }
	im.mu.Unlock()
	for i, err := range d.batch(im, ws2) {
		if !errors.Is(err, errSyncFault) {
			t.Fatalf("member %d: error %v, want the failed sync", i, err)
		}
	}
	im.mu.Lock()
	im.group().beforeDiffCommit = nil
	im.mu.Unlock()
	for b, st := range map[int64]int{1: stateNotPresent, 20: stateZero, 2: stateNotPresent} {
		if got := im.blockState(b); got != st {
			t.Fatalf("block %d of the failed batch in state %d, want %d", b, got, st)
		}
	}
	blocks = append(blocks, 1, 2)
	checkChild(t, im, childWant(zeroed, good...), blocks, "after the failed commit")
	d.mustBatch(t, im, ws2)
	want := childWant(zeroed, append(good, ws2...)...)
	checkAcrossReopen(t, mc, ms, im, func(im *Image) { checkChild(t, im, want, blocks, "after the retry") })
}

// TestDiscardDuringAWholeBlockChildWriteStartsItOver: a whole-block
// Discard of a block the child holds partially lands while a write
// covering that block writes its payload (its batch not yet committed):
// the batch does not make the discarded block FULLY_PRESENT over the
// range the discard freed; the write starts over and the block reads the
// write's data, also after a reopen. Blocks allocated after the discard
// is durable (and its space reusable) keep their own data: committed over
// the discard, the write would leave block 5 on a payload the next
// allocation takes.
func TestDiscardDuringAWholeBlockChildWriteStartsItOver(t *testing.T) {
	mc := newDiffChain(t)
	w := imageWrite{5 * mib, pattern(130, mib)}
	im, ms := discardDuringPausedChildWrite(t, mc, imageWrite{5*mib + 8192, pattern(131, 4096)}, w)
	if st := im.blockState(5); st != stateFullyPresent {
		t.Fatalf("block in state %d, want FULLY_PRESENT", st)
	}
	// The space the discard gave back is free for the next allocations:
	// had the write committed over the discard, a block now allocated
	// would share its payload with block 5, and one would overwrite the
	// other.
	later := []imageWrite{{6 * mib, pattern(132, mib)}, {7 * mib, pattern(133, mib)}, {9*mib + 4096, pattern(134, 4096)}}
	if err := im.Flush(); err != nil { // freed space is reused once the discard is durable
		t.Fatal(err)
	}
	for _, lw := range later {
		if _, err := im.WriteAt(lw.data, lw.off); err != nil {
			t.Fatal(err)
		}
	}
	want := childWant(nil, append([]imageWrite{w}, later...)...)
	checkAcrossReopen(t, mc, ms, im, func(im *Image) {
		checkChild(t, im, want, []int64{5, 6, 7, 9}, "after the discard, the write and later allocations")
	})
}

// segments splits p into pieces of n bytes, as a guest's request arrives.
func segments(p []byte, n int) [][]byte {
	var bufs [][]byte
	for len(p) > 0 {
		k := min(n, len(p))
		bufs = append(bufs, p[:k])
		p = p[k:]
	}
	return bufs
}

// TestMultiSegmentFirstWritesIntoAChildAreOneMemberPerBlock: a request in
// 4 KiB segments covering a NOT_PRESENT block of a child makes it
// FULLY_PRESENT in one journal entry (seen whole, not as 256 bitmap
// members each waiting for its own batch), a segmented run into fresh
// sectors of a partial block is one entry too, and a segmented rewrite of
// sectors the child holds stays an in-place write that allocates nothing.
func TestMultiSegmentFirstWritesIntoAChildAreOneMemberPerBlock(t *testing.T) {
	mc := newDiffChain(t)
	ms := newMemStorage(bytes.Clone(mc.child))
	im, err := mc.openChild(t, ms, false)
	if err != nil {
		t.Fatal(err)
	}
	pre := imageWrite{3 * mib, pattern(140, 4096)}
	if _, err := im.WriteAt(pre.data, pre.off); err != nil { // session start; block 3 partial
		t.Fatal(err)
	}
	ws := []imageWrite{
		{2 * mib, pattern(141, mib)},            // NOT_PRESENT, whole
		{3*mib + 64*kib, pattern(142, 64*kib)},  // PARTIALLY_PRESENT, fresh sectors
		{7*mib + 1020*kib, pattern(143, 8*kib)}, // across blocks 7 and 8: one member each
	}
	for _, w := range ws {
		before := im.Counters().JournalCommits
		if err := im.WriteVec(segments(w.data, 4096), w.off); err != nil {
			t.Fatal(err)
		}
		want := uint64(1)
		if w.off/mib != (w.off+int64(len(w.data))-1)/mib {
			want = 2
		}
		if got := im.Counters().JournalCommits - before; got != want {
			t.Fatalf("write at %#x in %d segments: %d journal entries, want %d", w.off, len(w.data)/4096, got, want)
		}
	}
	if st := im.blockState(2); st != stateFullyPresent {
		t.Fatalf("block 2 written whole in segments is in state %d, want FULLY_PRESENT", st)
	}
	held := imageWrite{3*mib + 64*kib, pattern(144, 64*kib)}
	bufs := segments(held.data, 4096)
	if n := testing.AllocsPerRun(20, func() {
		if err := im.WriteVec(bufs, held.off); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("a segmented rewrite of held sectors: %.1f allocations per call", n)
	}
	ws = append([]imageWrite{pre}, append(ws, held)...)
	want := childWant(nil, ws...)
	checkAcrossReopen(t, mc, ms, im, func(im *Image) { checkChild(t, im, want, []int64{2, 3, 7, 8}, "after the segmented writes") })
}
