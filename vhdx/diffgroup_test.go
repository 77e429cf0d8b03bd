package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// Group commit of a differencing image's first writes (diffgroup.go).

// diffChainSize: 64 MiB with 1 MiB blocks, one chunk (4096 blocks), 16
// blocks per 4 KiB bitmap page. The parent holds data in every block the
// tests write (diffBlocks), so a sector that reads zeros there is a lost
// write; the rest of the disk reads zeros throughout and is not checked.
const diffChainSize = 64 * mib

var diffBlocks = []int64{0, 1, 2, 3, 5, 7, 9, 11, 12, 13, 17, 20, 30, 40}

func newDiffChain(t testing.TB) memChain {
	t.Helper()
	var ws []imageWrite
	for _, b := range diffBlocks {
		ws = append(ws, imageWrite{b * mib, pattern(100+b, mib)})
	}
	return newMemChain(t, CreateOptions{Size: diffChainSize, BlockSize: mib}, ws)
}

// diffParentDisk is what the chain reads before the child is written.
func diffParentDisk() []byte {
	d := make([]byte, diffChainSize)
	for _, b := range diffBlocks {
		copy(d[b*mib:], pattern(100+b, mib))
	}
	return d
}

// readBack fails t unless every write reads back from im.
func readBack(t *testing.T, im *Image, ws []imageWrite) {
	t.Helper()
	for _, w := range ws {
		got := make([]byte, len(w.data))
		if _, err := im.ReadAt(got, w.off); err != nil || !bytes.Equal(got, w.data) {
			t.Fatalf("write at %#x does not read back (%v)", w.off, err)
		}
	}
}

// TestChildFirstWritesArrivingTogetherShareOneJournalEntry: writes into
// sectors the child does not hold — two into the same fresh block, one into
// another fresh block of the same bitmap page, one into a block of another
// page, two into a block the child holds partially — arriving together are
// published by one journal entry, and each reads back while the sectors
// around them still read the parent, before and after a reopen.
func TestChildFirstWritesArrivingTogetherShareOneJournalEntry(t *testing.T) {
	mc := newDiffChain(t)
	s := newMemStorage(bytes.Clone(mc.child))
	im, err := mc.openChild(t, s, false)
	if err != nil {
		t.Fatal(err)
	}
	partial := imageWrite{3*mib + 8192, pattern(2, 4096)}
	if _, err := im.WriteAt(partial.data, partial.off); err != nil { // session start; block 3 partial
		t.Fatal(err)
	}
	ws := []imageWrite{
		{512, pattern(10, 512)},             // block 0, fresh
		{64 * kib, pattern(11, 4096)},       // block 0 again: the same reservation
		{2*mib + 4096, pattern(12, 8192)},   // block 2, same page
		{20 * mib, pattern(13, 4096)},       // block 20, page 1
		{3 * mib, pattern(14, 4096)},        // block 3, partial: bits only
		{3*mib + 512*kib, pattern(15, 512)}, // block 3 again
	}
	d := driveBatches(im)
	before := im.Counters()
	for i, err := range d.batch(im, ws) {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	after := im.Counters()
	if got := after.JournalCommits - before.JournalCommits; got != 1 {
		t.Fatalf("%d journal entries for one batch of %d first writes, want 1", got, len(ws))
	}
	if got := after.Allocations - before.Allocations; got != 3 {
		t.Fatalf("%d payload blocks allocated, want 3 (blocks 0, 2, 20)", got)
	}
	want := diffParentDisk()
	for _, w := range append([]imageWrite{partial}, ws...) {
		copy(want[w.off:], w.data)
	}
	check := func(im *Image, when string) {
		got := make([]byte, diffChainSize)
		if _, err := im.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		for sec := 0; sec < len(got); sec += 512 {
			if !bytes.Equal(got[sec:sec+512], want[sec:sec+512]) {
				t.Fatalf("%s: sector at %#x reads neither the parent nor the write into it", when, sec)
			}
		}
	}
	check(im, "open")
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = mc.openChild(t, s, true)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	check(im, "reopened")
}

// TestReaderSeesParentUntilTheBatchPublishes: while the batch holding a
// write into fresh sectors commits (its payload already written into the
// child's block), a reader of those sectors reads the parent; once the
// write returns, it reads the new data.
func TestReaderSeesParentUntilTheBatchPublishes(t *testing.T) {
	mc := newDiffChain(t)
	im, err := mc.openChild(t, newMemStorage(bytes.Clone(mc.child)), false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	parent := diffParentDisk()
	for _, w := range []imageWrite{
		{5*mib + 4096, pattern(20, 4096)}, // fresh block
		{5*mib + 8192, pattern(21, 4096)}, // now partial: bits only
	} {
		var during []byte
		im.ag.beforeDiffCommit = func() {
			during = make([]byte, len(w.data))
			if _, err := im.ReadAt(during, w.off); err != nil {
				t.Error(err)
			}
		}
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
		if during == nil {
			t.Fatal("the write did not go through a differencing batch")
		}
		if !bytes.Equal(during, parent[w.off:w.off+int64(len(w.data))]) {
			t.Fatalf("write at %#x: a read while its batch commits does not read the parent", w.off)
		}
		im.ag.beforeDiffCommit = nil
		readBack(t, im, []imageWrite{w})
	}
}

// TestFlushArrivingWhileAChildBatchCommits: a Flush called while a
// differencing batch is being committed returns without waiting for it
// to be acknowledged, and afterwards what a power loss keeps holds every
// write acknowledged before the Flush was called.
func TestFlushArrivingWhileAChildBatchCommits(t *testing.T) {
	mc := newDiffChain(t)
	s := newFaultStorage(mc.child)
	im, err := mc.openChild(t, s, false)
	if err != nil {
		t.Fatal(err)
	}
	acked := imageWrite{7*mib + 512, pattern(30, 512)}
	if _, err := im.WriteAt(acked.data, acked.off); err != nil {
		t.Fatal(err)
	}
	var img []byte
	var flushErr error
	var wg sync.WaitGroup
	im.ag.beforeDiffCommit = func() {
		im.ag.beforeDiffCommit = nil
		wg.Add(1)
		go func() { // blocks on Image.mu or the shared sync until the leader lets go
			defer wg.Done()
			flushErr = im.Flush()
			img = s.crashImage(crashDrop)
		}()
	}
	later := imageWrite{9*mib + 4096, pattern(31, 4096)}
	if _, err := im.WriteAt(later.data, later.off); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if flushErr != nil {
		t.Fatalf("flush during a batch commit: %v", flushErr)
	}
	readBack(t, im, []imageWrite{acked, later})
	im.Close()
	re, err := mc.openChild(t, newMemStorage(img), false)
	if err != nil {
		t.Fatalf("what a power loss after the flush keeps does not open: %v", err)
	}
	defer re.Close()
	readBack(t, re, []imageWrite{acked})
	got := make([]byte, len(later.data))
	if _, err := re.ReadAt(got, later.off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, later.data) && !bytes.Equal(got, diffParentDisk()[later.off:later.off+int64(len(got))]) {
		t.Fatal("the write in flight during the flush reads neither the parent nor its data")
	}
}

// failingPayload fails every WriteAt whose data starts with marker: one
// member's payload write, wherever its block lies.
type failingPayload struct {
	Storage
	marker []byte
}

var errPayloadFault = errors.New("injected payload write failure")

func (f *failingPayload) WriteAt(p []byte, off int64) (int, error) {
	if len(p) >= len(f.marker) && bytes.Equal(p[:len(f.marker)], f.marker) {
		return 0, errPayloadFault
	}
	return f.Storage.WriteAt(p, off)
}

// TestFailedPayloadWriteFailsOnlyItsMember: in a batch where one member's
// payload write fails, that member gets the error and its sectors keep
// reading the parent (its bits are not set, its fresh block is not
// published), while the other members — one sharing its fresh block, one
// in a block of its own — succeed and read back, also after a reopen.
// (Host I/O rule 1: a failed data write fails that request only.)
func TestFailedPayloadWriteFailsOnlyItsMember(t *testing.T) {
	mc := newDiffChain(t)
	bad := pattern(40, 4096)
	ms := newMemStorage(bytes.Clone(mc.child))
	im, err := mc.openChild(t, &failingPayload{Storage: ms, marker: bad[:64]}, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(2, 512), 40*mib); err != nil { // session start
		t.Fatal(err)
	}
	ws := []imageWrite{
		{11 * mib, pattern(41, 4096)},       // block 11, shared with the failing member
		{11*mib + 8192, bad},                // fails
		{12*mib + 4096, pattern(42, 4096)},  // block 12, its own
		{13 * mib, bad},                     // block 13: fails, the only member
		{11*mib + 65536, pattern(43, 4096)}, // block 11 again
	}
	before := im.Counters()
	errs := driveBatches(im).batch(im, ws)
	for i, w := range ws {
		failed := bytes.Equal(w.data, bad)
		if failed != errors.Is(errs[i], errPayloadFault) {
			t.Fatalf("write %d at %#x: error %v, want the fault only for the failing members", i, w.off, errs[i])
		}
	}
	if got := im.Counters().Allocations - before.Allocations; got != 2 {
		t.Fatalf("%d blocks allocated, want 2 (block 13 had no member left)", got)
	}
	if st := batState(im.bat.load(batIndex(13, im.l.chunkRatio))); st != stateNotPresent {
		t.Fatalf("block 13, whose only write failed, is in state %d", st)
	}
	parent := diffParentDisk()
	check := func(im *Image) {
		for _, w := range ws {
			want := w.data
			if bytes.Equal(w.data, bad) {
				want = parent[w.off : w.off+int64(len(w.data))]
			}
			got := make([]byte, len(want))
			if _, err := im.ReadAt(got, w.off); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("at %#x: not the expected data (failed write: the parent) (%v)", w.off, err)
			}
		}
	}
	check(im)
	// A failing write alone in its batch still finishes the batch: a
	// whole-block write into the block it had reserved does not wait
	// forever for it.
	im.ag.arrived, im.ag.beforeLead = nil, nil
	if _, err := im.WriteAt(bad, 14*mib+4096); !errors.Is(err, errPayloadFault) {
		t.Fatalf("lone failing write: %v", err)
	}
	whole := imageWrite{14 * mib, pattern(44, mib)}
	if _, err := im.WriteAt(whole.data, whole.off); err != nil {
		t.Fatal(err)
	}
	ws = append(ws, whole)
	checkAcrossReopen(t, mc, ms, im, check)
}

// TestChildBatchesCrashAtEveryBoundaryNeverShowZerosForParentData: phases
// of concurrent child first writes (fresh blocks, two in one block, one
// bitmap page, a second page, partial blocks, sectors whose bits are
// already set; mixed in the same batches, writes covering a NOT_PRESENT
// and a PARTIALLY_PRESENT block and writes into blocks the child
// discarded, which become FULLY_PRESENT), some after a Discard and some
// followed by a Flush, cut by a crash before every storage operation in
// turn. After each crash mode: the chain opens; after
// a SIGKILL (the page cache kept) every acknowledged write reads back;
// after a power loss every flushed write reads back; and every sector
// reads the data of a state the workload passed through or a later one —
// never zeros where the parent had data.
func TestChildBatchesCrashAtEveryBoundaryNeverShowZerosForParentData(t *testing.T) {
	parallelSweep(t)
	mc := newDiffChain(t)
	phases := [][]imageWrite{
		{
			{0, pattern(50, 4096)}, {64 * kib, pattern(51, 4096)}, // block 0 twice
			{mib + 512, pattern(52, 512)},      // block 1, same page
			{2 * mib, pattern(150, mib)},       // block 2, whole: FULLY_PRESENT
			{17*mib + 4096, pattern(53, 8192)}, // block 17, page 1
		},
		{
			{8192, pattern(54, 4096)},           // block 0: bits only
			{mib + 512, pattern(55, 512)},       // present: in place
			{mib + 256*kib, pattern(56, 4096)},  // block 1: bits only
			{30 * mib, pattern(57, 4096)},       // block 30, fresh
			{40*mib + 4096, pattern(151, 4096)}, // block 40 (discarded): ZERO → FULLY_PRESENT
		},
		{
			// Page 0, page 1 and BAT sector 0 again, after a batch with no
			// Flush: this entry holds every sector the previous one left
			// unsynced (rule 4), so only the rule that a child's batch
			// syncs its payloads first keeps their bits from becoming
			// durable without their data.
			{17 * mib, pattern(58, 4096)},           // block 17: bits only
			{3*mib + 4096, pattern(59, 4096)},       // block 3, fresh
			{mib, pattern(152, mib)},                // block 1, partial: whole
			{11*mib + mib - 512, pattern(153, 512)}, // block 11 (discarded): ZERO → FULLY_PRESENT
			{11 * mib, pattern(154, 4096)},          // block 11 again: the same reservation
		},
	}
	discardBefore := [][]int64{{40}, nil, {11}} // whole blocks, before the phase's writes
	flushAfter := []bool{true, false, true}
	states := [][]byte{diffParentDisk()}
	for i, ph := range phases {
		s := bytes.Clone(states[len(states)-1])
		for _, b := range discardBefore[i] {
			clear(s[b*mib : (b+1)*mib])
		}
		for _, w := range ph {
			copy(s[w.off:], w.data)
		}
		states = append(states, s)
	}
	// run reports the phases acknowledged and the phases flushed.
	run := func(s Storage) (acked, flushed int, err error) {
		im, err := mc.openChild(t, s, false)
		if err != nil {
			return 0, 0, fmt.Errorf("open: %w", err)
		}
		d := driveBatches(im)
		for i, ph := range phases {
			for _, b := range discardBefore[i] {
				if err := im.Discard(b*mib, mib); err != nil {
					im.Close()
					return acked, flushed, err
				}
			}
			for _, err := range d.batch(im, ph) {
				if err != nil {
					im.Close()
					return acked, flushed, err
				}
			}
			acked = i + 1
			if flushAfter[i] {
				if err := im.Flush(); err != nil {
					im.Close()
					return acked, flushed, err
				}
				flushed = acked
			}
		}
		if err := im.Close(); err != nil {
			return acked, flushed, err
		}
		return acked, acked, nil
	}
	ref := newFaultStorage(mc.child)
	if a, f, err := run(ref); err != nil || a != len(phases) || f != len(phases) {
		t.Fatalf("reference run: %d/%d phases, %v", a, f, err)
	}
	total := ref.opCount()
	t.Logf("%d operations", total)
	got := make([]byte, mib)
	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(mc.child)
		s.crashAfter(crash)
		acked, flushed, err := run(s)
		if err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: workload error %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			floor := flushed // power loss: only flushed phases are certain
			if mode == crashKeep {
				floor = acked // SIGKILL: the page cache holds every acknowledged write
			}
			where := fmt.Sprintf("crash before op %d of %d (%s), %d phases acked, %d flushed", crash, total, mode, acked, flushed)
			rs := newMemStorage(s.crashImage(mode))
			im, err := mc.openChild(t, rs, false)
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			for _, b := range diffBlocks {
				blk := got[:mib]
				if _, err := im.ReadAt(blk, b*mib); err != nil {
					t.Fatalf("%s: read: %v", where, err)
				}
				whole := false
				for k := floor; k < len(states) && !whole; k++ {
					whole = sameBytes(blk, states[k][b*mib:(b+1)*mib])
				}
				for sec := int64(0); !whole && sec < mib; sec += 512 {
					g := blk[sec : sec+512]
					ok := false
					for k := floor; k < len(states) && !ok; k++ {
						ok = sameBytes(g, states[k][b*mib+sec:b*mib+sec+512])
					}
					if !ok {
						t.Fatalf("%s: sector at %#x reads neither the data of phase %d nor of a later one", where, b*mib+sec, floor)
					}
				}
			}
			if err := im.Close(); err != nil {
				t.Fatalf("%s: close after reopen: %v", where, err)
			}
			im, err = mc.openChild(t, rs, true)
			if err != nil {
				t.Fatalf("%s: read-only open after recovery: %v", where, err)
			}
			im.Close()
		}
	}
}

// pausingPayload holds the first payload write whose data starts with
// marker until release is closed, after telling started.
type pausingPayload struct {
	Storage
	marker  []byte
	started chan struct{}
	release chan struct{}
	once    sync.Once
}

func (f *pausingPayload) WriteAt(p []byte, off int64) (int, error) {
	if len(p) >= len(f.marker) && bytes.Equal(p[:len(f.marker)], f.marker) {
		f.once.Do(func() {
			close(f.started)
			<-f.release
		})
	}
	return f.Storage.WriteAt(p, off)
}

// discardDuringPausedChildWrite opens mc's child over fresh storage, makes
// block 5 PARTIALLY_PRESENT with partial (which must lie in block 5),
// starts w (into block 5) and, while w's payload write is held, discards
// block 5 whole; it returns once w has completed without error, with the
// open image and its storage for the caller's checks.
func discardDuringPausedChildWrite(t *testing.T, mc memChain, partial, w imageWrite) (*Image, *memStorage) {
	t.Helper()
	ms := newMemStorage(bytes.Clone(mc.child))
	ps := &pausingPayload{Storage: ms, marker: w.data[:64], started: make(chan struct{}), release: make(chan struct{})}
	im, err := mc.openChild(t, ps, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(partial.data, partial.off); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := im.WriteAt(w.data, w.off)
		errc <- err
	}()
	<-ps.started
	if err := im.Discard(5*mib, mib); err != nil {
		t.Fatal(err)
	}
	close(ps.release)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return im, ms
}

// TestDiscardDuringAChildFirstWriteNeverShowsTheParent: a whole-block
// Discard of a block the child holds partially lands while a first write
// into other sectors of that block is writing its payload (in a batch not
// yet committed). The write's batch does not set its bits over the
// discarded block; the write starts over and the block reads the write's
// data and zeros elsewhere (discard, then write) — never the parent's
// data, which the discard hid. Also after a reopen.
func TestDiscardDuringAChildFirstWriteNeverShowsTheParent(t *testing.T) {
	mc := newDiffChain(t)
	w := imageWrite{5*mib + 64*kib, pattern(60, 4096)}
	im, ms := discardDuringPausedChildWrite(t, mc, imageWrite{5 * mib, pattern(61, 4096)}, w)
	want := make([]byte, mib)
	copy(want[w.off-5*mib:], w.data)
	check := func(im *Image) {
		got := make([]byte, mib)
		if _, err := im.ReadAt(got, 5*mib); err != nil {
			t.Fatal(err)
		}
		for sec := 0; sec < mib; sec += 512 {
			if !bytes.Equal(got[sec:sec+512], want[sec:sec+512]) {
				t.Fatalf("sector at %#x of the discarded block is neither zeros nor the later write", 5*mib+sec)
			}
		}
	}
	checkAcrossReopen(t, mc, ms, im, check)
}

// TestConcurrentChildFirstWritesAndReadersNeverSeeZerosForParentData: many
// writers issue first writes into distinct 4 KiB pieces of a few child
// blocks (fresh ones and partial ones, some sharing bitmap pages, one the
// child discarded) and whole-block writes into two others while
// readers read those blocks throughout: every sector a reader sees is the
// parent's or the write's data, never zeros of a block whose bit was
// published before its data; at the end every write reads back.
func TestConcurrentChildFirstWritesAndReadersNeverSeeZerosForParentData(t *testing.T) {
	mc := newDiffChain(t)
	im, err := mc.openChild(t, newMemStorage(bytes.Clone(mc.child)), false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	// Block 13 is discarded first (ZERO): its 4 KiB writes make it
	// FULLY_PRESENT, joining or waiting for each other; blocks 3 and 12
	// (one partial first) are written whole by one write each.
	blocks := []int64{0, 1, 2, 17, 30, 13}
	if _, err := im.WriteAt(pattern(70, 4096), 17*mib+mib-4096); err != nil { // block 17 partial
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(71, 4096), 12*mib+4096); err != nil { // block 12 partial
		t.Fatal(err)
	}
	if err := im.Discard(13*mib, mib); err != nil {
		t.Fatal(err)
	}
	want := diffParentDisk()
	copy(want[17*mib+mib-4096:], pattern(70, 4096))
	copy(want[12*mib+4096:], pattern(71, 4096))
	clear(want[13*mib : 14*mib])
	parent := bytes.Clone(want)
	var ws []imageWrite
	for i, b := range blocks {
		for k := int64(0); k < 24; k++ {
			w := imageWrite{b*mib + k*8*kib, pattern(int64(200+i*24)+k, 4096)}
			ws = append(ws, w)
			copy(want[w.off:], w.data)
		}
	}
	for i, b := range []int64{3, 12} {
		w := imageWrite{b * mib, pattern(int64(400+i), mib)}
		ws = append(ws, w)
		copy(want[w.off:], w.data)
		blocks = append(blocks, b)
	}
	const writers = 8
	var wg sync.WaitGroup
	errc := make(chan error, writers+2)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < len(ws); i += writers {
				if _, err := im.WriteAt(ws[i].data, ws[i].off); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	stop := make(chan struct{})
	var rg sync.WaitGroup
	for r := range 2 {
		rg.Add(1)
		go func() {
			defer rg.Done()
			buf := make([]byte, 64*kib)
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				b := blocks[(n+r)%len(blocks)]
				off := b*mib + int64(n%16)*64*kib
				if _, err := im.ReadAt(buf, off); err != nil {
					errc <- err
					return
				}
				for sec := int64(0); sec < int64(len(buf)); sec += 512 {
					g := buf[sec : sec+512]
					if !bytes.Equal(g, parent[off+sec:off+sec+512]) && !bytes.Equal(g, want[off+sec:off+sec+512]) {
						errc <- fmt.Errorf("sector at %#x reads neither the parent nor the write", off+sec)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	rg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	readBack(t, im, ws)
}

// failingSync fails the next Sync once armed.
type failingSync struct {
	Storage
	armed atomic.Bool
}

var errSyncFault = errors.New("injected sync failure")

func (f *failingSync) Sync() error {
	if f.armed.Swap(false) {
		return errSyncFault
	}
	return f.Storage.Sync()
}

// TestFailedChildBatchCommitFailsEveryMemberAndPublishesNothing: when the
// sync that starts a child batch's commit fails, every member gets the
// error (rule 7), no bit and no BAT entry of the batch is published (the
// sectors still read the parent, the fresh blocks stay NOT_PRESENT), and
// the same writes succeed afterwards (the journal recovers) and read back,
// also after a reopen.
func TestFailedChildBatchCommitFailsEveryMemberAndPublishesNothing(t *testing.T) {
	mc := newDiffChain(t)
	ms := newMemStorage(bytes.Clone(mc.child))
	fs := &failingSync{Storage: ms}
	im, err := mc.openChild(t, fs, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(2, 512), 40*mib); err != nil { // session start
		t.Fatal(err)
	}
	ws := []imageWrite{
		{7 * mib, pattern(80, 4096)},
		{7*mib + 64*kib, pattern(81, 4096)},
		{9*mib + 4096, pattern(82, 8192)},
	}
	d := driveBatches(im)
	im.ag.beforeDiffCommit = func() { fs.armed.Store(true) }
	for i, err := range d.batch(im, ws) {
		if !errors.Is(err, errSyncFault) {
			t.Fatalf("member %d: error %v, want the failed sync", i, err)
		}
	}
	im.ag.beforeDiffCommit = nil
	parent := diffParentDisk()
	for _, b := range []int64{7, 9} {
		if st := batState(im.bat.load(batIndex(uint64(b), im.l.chunkRatio))); st != stateNotPresent {
			t.Fatalf("block %d of the failed batch is in state %d", b, st)
		}
	}
	for _, w := range ws {
		got := make([]byte, len(w.data))
		if _, err := im.ReadAt(got, w.off); err != nil || !bytes.Equal(got, parent[w.off:w.off+int64(len(got))]) {
			t.Fatalf("at %#x after the failed batch: not the parent (%v)", w.off, err)
		}
	}
	for i, err := range d.batch(im, ws) {
		if err != nil {
			t.Fatalf("member %d after the failure: %v", i, err)
		}
	}
	checkAcrossReopen(t, mc, ms, im, func(im *Image) { readBack(t, im, ws) })
}

// checkAcrossReopen runs check on the open child im, closes it, reopens
// the child from ms read-only and runs check again: what was acknowledged
// reads the same from the file as from the image that wrote it.
func checkAcrossReopen(t *testing.T, mc memChain, ms *memStorage, im *Image, check func(*Image)) {
	t.Helper()
	check(im)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	re, err := mc.openChild(t, ms, true)
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	check(re)
}
