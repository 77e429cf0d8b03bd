package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"strings"
	"sync"
	"testing"
)

// gatedSyncStorage is a memStorage whose Syncs block until the test lets
// each one finish, reporting each start on started; fail makes the next
// released Sync return an error.
type gatedSyncStorage struct {
	*memStorage
	started chan int
	release chan error
	mu      sync.Mutex
	n       int
}

func newGatedSyncStorage() *gatedSyncStorage {
	return &gatedSyncStorage{memStorage: newMemStorage(nil), started: make(chan int, 8), release: make(chan error)}
}

func (g *gatedSyncStorage) Sync() error {
	g.mu.Lock()
	g.n++
	n := g.n
	g.mu.Unlock()
	g.started <- n
	return <-g.release
}

// startFirstGatedSync makes a syncLatch over a new gatedSyncStorage, whose
// flushes that wait for a sync report on waiting, and starts a first Sync,
// whose result arrives on first.
func startFirstGatedSync() (gs *gatedSyncStorage, latch *syncLatch, waiting chan struct{}, first chan error) {
	gs = newGatedSyncStorage()
	latch = &syncLatch{Storage: gs}
	waiting = make(chan struct{}, 8)
	latch.group.waiting = func() { waiting <- struct{}{} }
	first = make(chan error, 1)
	go func() { first <- latch.Sync() }()
	return gs, latch, waiting, first
}

// TestConcurrentFlushesAreAnsweredByOneSyncStartedAfterThem: flushes that
// arrive while an fdatasync runs do not take its answer (it may have begun
// before their writes completed); they wait for the next one, and that one
// fdatasync answers all of them.
func TestConcurrentFlushesAreAnsweredByOneSyncStartedAfterThem(t *testing.T) {
	gs, latch, waiting, first := startFirstGatedSync()
	if n := <-gs.started; n != 1 {
		t.Fatalf("first sync is number %d", n)
	}
	const late = 3
	results := make(chan error, late)
	for range late {
		go func() { results <- latch.Sync() }()
	}
	for range late {
		<-waiting // every late flush waits; none took sync 1's answer
	}
	gs.release <- nil
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-results:
		t.Fatalf("a late flush returned (%v) before any sync that started after it", err)
	default:
	}
	if n := <-gs.started; n != 2 {
		t.Fatalf("second sync is number %d", n)
	}
	gs.release <- nil
	for range late {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
	if gs.n != 2 {
		t.Fatalf("%d fdatasyncs for 1+%d flushes, want 2", gs.n, late)
	}
}

// TestSharedSyncFailureFailsEveryWaiterAndLaterFlushes: when the one
// fdatasync that answers several flushes fails, each of them reports it,
// and the latch keeps failing later flushes (writes before it may be lost).
func TestSharedSyncFailureFailsEveryWaiterAndLaterFlushes(t *testing.T) {
	gs, latch, waiting, first := startFirstGatedSync()
	<-gs.started
	results := make(chan error, 2)
	for range 2 {
		go func() { results <- latch.Sync() }()
	}
	<-waiting
	<-waiting
	gs.release <- nil
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	<-gs.started
	boom := errors.New("EIO")
	gs.release <- boom
	for range 2 {
		if err := <-results; !errors.Is(err, boom) {
			t.Fatalf("waiter got %v, want the shared sync's failure", err)
		}
	}
	// No payload written in place was at risk, so an episode opens
	// (package doc, "Host I/O errors", rule 4): a guest flush fails, with
	// no fdatasync, until a recovery point.
	if err := latch.flush(); !errors.Is(err, errRecoveryNeeded) || !errors.Is(err, boom) {
		t.Fatalf("later flush got %v, want the open episode's failure", err)
	}
	if gs.n != 2 {
		t.Fatalf("%d fdatasyncs, want 2 (a flush in an open episode issues none)", gs.n)
	}

	// With payload written in place at risk (rule 3), every later sync
	// fails, saying so, without an fdatasync.
	gs2 := newGatedSyncStorage()
	lost := &syncLatch{Storage: gs2}
	lost.markDirty()
	failed := make(chan error, 1)
	go func() { failed <- lost.Sync() }()
	<-gs2.started
	gs2.release <- boom
	if err := <-failed; !errors.Is(err, boom) {
		t.Fatalf("sync got %v, want %v", err, boom)
	}
	if err := lost.Sync(); !errors.Is(err, boom) || !strings.Contains(err.Error(), "reopened") {
		t.Fatalf("sync after lost payload got %v, want the latched failure", err)
	}
	if gs2.n != 1 {
		t.Fatalf("%d fdatasyncs, want 1 (none after payload was lost)", gs2.n)
	}
}

// batchDriver makes the writes of one test batch join it one after another,
// in a fixed order, so that a run's storage operations are the same every
// time: each write starts once the previous one has arrived at its batch
// (or returned), and the first leader waits until all have arrived.
type batchDriver struct {
	arrived chan int
	release chan struct{}
}

func driveBatches(im *Image) *batchDriver {
	d := &batchDriver{arrived: make(chan int, allocBatchMax*2)}
	im.ag.arrived = func(open int) { d.arrived <- open }
	im.ag.beforeLead = func() {
		if r := d.release; r != nil {
			<-r
		}
	}
	return d
}

// batch issues the writes, one goroutine each, and returns their errors
// once all have returned.
func (d *batchDriver) batch(im *Image, ws []imageWrite) []error {
	d.release = make(chan struct{})
	errs := make([]error, len(ws))
	var wg sync.WaitGroup
	for i, w := range ws {
		done := make(chan struct{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(done)
			_, errs[i] = im.WriteAt(w.data, w.off)
		}()
		select {
		case <-d.arrived:
		case <-done:
		}
	}
	close(d.release)
	wg.Wait()
	for len(d.arrived) > 0 {
		<-d.arrived
	}
	return errs
}

// mustBatch issues the writes as one batch and fails t if any write fails.
func (d *batchDriver) mustBatch(t *testing.T, im *Image, ws []imageWrite) {
	t.Helper()
	for i, err := range d.batch(im, ws) {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
}

// openSessionImage opens a new in-memory image of size bytes (1 MiB
// blocks) with 4 KiB written to block 0, so that the write session has
// started and what a test measures next is allocation alone. The image is
// closed when the test ends.
func openSessionImage(t *testing.T, size int64) *Image {
	t.Helper()
	s := createMem(t, CreateOptions{Size: uint64(size), BlockSize: mib})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil { // session start, block 0
		t.Fatal(err)
	}
	return im
}

// TestAllocationsThatArriveTogetherShareOneJournalEntry: writes into N
// unallocated blocks that arrive while a batch is open are published by
// one journal entry, and each reads back.
func TestAllocationsThatArriveTogetherShareOneJournalEntry(t *testing.T) {
	im := openSessionImage(t, 64*mib)
	d := driveBatches(im)
	var ws []imageWrite
	for b := int64(1); b <= 8; b++ {
		ws = append(ws, imageWrite{b*mib + 4096*b, pattern(10+b, 4096)})
	}
	before := im.Counters()
	d.mustBatch(t, im, ws)
	after := im.Counters()
	if got := after.Allocations - before.Allocations; got != 8 {
		t.Fatalf("%d allocations, want 8", got)
	}
	if got := after.JournalCommits - before.JournalCommits; got != 1 {
		t.Fatalf("%d journal entries for one batch of 8, want 1", got)
	}
	if got := after.AllocBatches - before.AllocBatches; got != 1 {
		t.Fatalf("%d batches, want 1", got)
	}
	for _, w := range ws {
		got := make([]byte, len(w.data))
		if _, err := im.ReadAt(got, w.off); err != nil || !bytes.Equal(got, w.data) {
			t.Fatalf("write at %#x does not read back (%v)", w.off, err)
		}
	}
}

// TestSecondWriteIntoPendingBlockJoinsItsAllocation: a write into a block
// whose allocation is still in an uncommitted batch goes into the range
// reserved for it and returns once that batch published it: one block,
// both writes present.
func TestSecondWriteIntoPendingBlockJoinsItsAllocation(t *testing.T) {
	im := openSessionImage(t, 64*mib)
	d := driveBatches(im)
	ws := []imageWrite{{5 * mib, pattern(2, 4096)}, {5*mib + 8192, pattern(3, 8192)}}
	before := im.Counters()
	d.mustBatch(t, im, ws)
	if got := im.Counters().Allocations - before.Allocations; got != 1 {
		t.Fatalf("%d allocations for two writes into one block, want 1", got)
	}
	want := make([]byte, mib)
	copy(want, ws[0].data)
	copy(want[8192:], ws[1].data)
	got := make([]byte, mib)
	if _, err := im.ReadAt(got, 5*mib); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("block 5 does not hold both writes (%v)", err)
	}
	assertNoSharedRanges(t, im)
}

// TestBatchHoldsAtMostAllocBatchMaxBlocks: allocations beyond the bound
// wait for the next batch instead of growing the open one, so a journal
// entry always fits the smallest log.
func TestBatchHoldsAtMostAllocBatchMaxBlocks(t *testing.T) {
	im := openSessionImage(t, 256*mib)
	const n = allocBatchMax + 7
	release := make(chan struct{})
	arrived := make(chan int, n)
	var biggest int
	im.ag.arrived = func(open int) {
		biggest = max(biggest, open) // under im.mu
		arrived <- open
	}
	im.ag.beforeLead = func() { <-release }
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = im.WriteAt(pattern(int64(i), 4096), int64(i+1)*mib)
		}()
	}
	// The first leader holds the open batch until it is full: the first
	// allocBatchMax writes arrive, the others wait for room.
	for range allocBatchMax {
		<-arrived
	}
	close(release)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if biggest != allocBatchMax {
		t.Fatalf("largest open batch held %d blocks, want the bound %d", biggest, allocBatchMax)
	}
	c := im.Counters()
	if c.Allocations != n+1 || c.AllocBatches < 3 {
		t.Fatalf("counters %+v: want %d allocations in at least 3 batches (1 + 64 + the rest)", c, n+1)
	}
}

// TestBatchedAllocationsCrashAtEveryBoundary: batches of allocating writes,
// one batch reusing ranges freed by a discard, one followed by a Flush and
// one not, then lone allocations (batches of one, whose entries skip the
// sync before them), cut by a power failure before every operation in turn. After
// replay, in every crash mode: the image opens, no two BAT entries own one
// range, every write whose Flush returned reads back, every other block
// reads its own data or zeros sector by sector (never another block's,
// never the discarded blocks' old data), and untouched blocks are intact.
func TestBatchedAllocationsCrashAtEveryBoundary(t *testing.T) {
	parallelSweep(t)
	const bs = 1 * mib
	start, old := imageWithOldBlocks(t, 1*gib, bs)
	batchA := []imageWrite{{5 * bs, pattern(20, 4096)}, {6*bs + 8192, pattern(21, 4096)}, {7 * bs, pattern(22, 8192)}}
	batchB := []imageWrite{{9*bs + 4096, pattern(30, 4096)}, {10 * bs, pattern(31, 4096)}, {11*bs + bs - 4096, pattern(32, 4096)}}
	// The lone writes alternate between BAT sectors (512 entries each), so
	// an entry must hold the previous one's sector again (rule 4).
	lone := []imageWrite{{600 * bs, pattern(40, 4096)}, {13*bs + 4096, pattern(41, 4096)}, {700 * bs, pattern(42, 4096)}}
	// runWork reports how many phases ended with a successful Flush: 1
	// after the discard, 2 after batch A; batch B and the lone writes are
	// only made durable by Close (3).
	runWork := func(s Storage) (flushed int, reused uint64, err error) {
		im, err := OpenStorage(s, OpenOptions{})
		if err != nil {
			return 0, 0, err
		}
		d := driveBatches(im)
		if err := im.Discard(1*bs, 2*bs); err != nil { // blocks 1 and 2
			return 0, 0, err
		}
		if err := im.Flush(); err != nil {
			return 0, 0, err
		}
		flushed = 1
		for _, err := range d.batch(im, batchA) {
			if err != nil {
				return flushed, 0, err
			}
		}
		if err := im.Flush(); err != nil {
			return flushed, 0, err
		}
		flushed = 2
		for _, err := range d.batch(im, batchB) {
			if err != nil {
				return flushed, 0, err
			}
		}
		for _, w := range lone { // one after another: batches of one, no sync first
			if _, err := im.WriteAt(w.data, w.off); err != nil {
				return flushed, 0, err
			}
		}
		reused = im.space.reusedBytes
		if err := im.Close(); err != nil {
			return flushed, reused, err
		}
		return 3, reused, nil
	}
	ref := newFaultStorage(start)
	n, reused, err := runWork(ref)
	if err != nil || n != 3 {
		t.Fatalf("reference run: %d phases, %v", n, err)
	}
	if reused == 0 {
		t.Fatal("no batch reused a discarded range; the workload must exercise reuse")
	}
	total := ref.opCount()
	t.Logf("%d operations", total)

	isOwnOrZero := func(got []byte, want []byte) bool {
		for i := 0; i < len(got); i += 512 {
			if !isZeros(got[i:i+512]) && !sameBytes(got[i:i+512], want[i:i+512]) {
				return false
			}
		}
		return true
	}
	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(start)
		s.crashAfter(crash)
		flushed, _, err := runWork(s)
		if err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			where := fmt.Sprintf("crash before op %d of %d (%s), %d phases flushed", crash, total, mode, flushed)
			rs := newMemStorage(slices.Clone(s.crashImage(mode)))
			im, err := OpenStorage(rs, OpenOptions{})
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			assertNoSharedRanges(t, im)
			read := blockReader(t, im, bs, where)
			for _, b := range []int64{0, 3} {
				if !sameBytes(read(b), old[b]) {
					t.Fatalf("%s: untouched block %d changed", where, b)
				}
			}
			for _, b := range []int64{1, 2} {
				if got := read(b); !isZeros(got) && (flushed >= 1 || !isOwnOrZero(got, old[b])) {
					t.Fatalf("%s: discarded block %d reads neither zeros nor (before the flush) its old data", where, b)
				}
			}
			for k, batch := range [][]imageWrite{batchA, append(slices.Clone(batchB), lone...)} {
				for _, w := range batch {
					b := w.off / bs
					want := make([]byte, bs)
					copy(want[w.off-b*bs:], w.data)
					got := read(b)
					if flushed >= 2+k {
						if !sameBytes(got, want) {
							t.Fatalf("%s: flushed write into block %d lost or shows other data", where, b)
						}
					} else if !isOwnOrZero(got, want) {
						t.Fatalf("%s: unflushed block %d shows data that is neither its own nor zeros", where, b)
					}
				}
			}
			if err := im.Close(); err != nil {
				t.Fatalf("%s: close: %v", where, err)
			}
		}
	}
}

// TestAllocationsDiscardsAndFlushesTogetherStayConsistent: allocating
// writers, discards and flushes run at once (under -race this checks the
// journal has one owner at a time: batch leaders commit with Image.mu
// released, trims and flushes commit through lockJournal). Each block is
// written and discarded by one goroutine only, so its final contents are
// known; after Close and a reopen every block reads them and no two
// entries share a range.
func TestAllocationsDiscardsAndFlushesTogetherStayConsistent(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 64 * mib, BlockSize: mib})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const writers, rounds = 6, 12
	final := make([][]byte, 64)
	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				b := int64(w + writers*(r%8)) // blocks w, w+6, ...: this goroutine's own
				d := pattern(int64(100*w+r), 4096)
				if _, err := im.WriteAt(d, b*mib+int64(r%4)*4096); err != nil {
					errs <- err
					return
				}
				want := make([]byte, mib)
				copy(want[int64(r%4)*4096:], d)
				if r%3 == 2 { // discard it again: zeros, and its range reusable
					if err := im.Discard(b*mib, mib); err != nil {
						errs <- err
						return
					}
					want = make([]byte, mib)
				}
				// Rounds r and r+8 write the same 4 KiB of the same block,
				// so the last round alone decides its contents.
				final[b] = want
			}
		}()
	}
	stop := make(chan struct{})
	flushed := make(chan struct{})
	go func() {
		defer close(flushed)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := im.Flush(); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	<-flushed
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	assertNoSharedRanges(t, im)
	for b, want := range final {
		if want == nil {
			continue
		}
		got := make([]byte, mib)
		if _, err := im.ReadAt(got, int64(b)*mib); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("block %d does not hold what its goroutine wrote last", b)
		}
	}
}

// TestLoneAllocationCostsOneSyncAndFlushOne: an allocation with nothing to
// batch with costs one fdatasync, of its journal entry (the entry holds the
// previous allocation's BAT sector again instead of a sync before it; its
// own in-place BAT write rides on the next sync), and a Flush one more.
// This is the QD1 floor the benchmarks compare against.
func TestLoneAllocationCostsOneSyncAndFlushOne(t *testing.T) {
	im := openSessionImage(t, 64*mib)
	before := im.Counters()
	for b := int64(1); b <= 4; b++ {
		if _, err := im.WriteAt(pattern(b, 4096), b*mib); err != nil {
			t.Fatal(err)
		}
	}
	mid := im.Counters()
	if got := mid.Syncs - before.Syncs; got != 4 {
		t.Errorf("%d fdatasyncs for 4 lone allocations, want 4", got)
	}
	if got := mid.AllocBatches - before.AllocBatches; got != 4 {
		t.Errorf("%d batches for 4 lone allocations, want 4", got)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := im.Counters().Syncs - mid.Syncs; got != 1 {
		t.Errorf("%d fdatasyncs for a Flush, want 1", got)
	}
}

// TestBatchCommitsWithoutSyncCrashAtEveryBoundaryYieldOldOrNewMetadata:
// journal entries written with no sync before them (commitBatch), whose
// in-place writes are left for the next sync, still replay to exactly the
// metadata of the last commit that returned or of the one in flight, never
// a mix, whatever survives of the unsynced writes. Each entry either holds
// the previous one's sectors again, with their current contents, as
// allocation batches do, or does not, and then the journal must sync first.
func TestBatchCommitsWithoutSyncCrashAtEveryBoundaryYieldOldOrNewMetadata(t *testing.T) {
	parallelSweep(t)
	for _, holdAgain := range []bool{true, false} {
		t.Run(fmt.Sprintf("holdAgain=%v", holdAgain), func(t *testing.T) {
			rng := rand.New(rand.NewSource(5))
			cur := map[uint64][]byte{}
			var work [][]logUpdate
			var prev []uint64
			for range 24 {
				var us []logUpdate
				if holdAgain {
					for _, off := range prev {
						us = append(us, logUpdate{offset: off, data: cur[off]})
					}
				}
				own := randomCommit(rng, 1+rng.Intn(3), false)
				prev = prev[:0]
				for _, u := range own {
					cur[u.offset] = u.data
					prev = append(prev, u.offset)
				}
				work = append(work, append(us, own...))
			}
			run := func(s Storage) (int, error) {
				j := newJournal(s, tLR)
				for i, c := range work {
					if _, err := j.commitBatch(c, 1<<20, tFileSize, false); err != nil {
						return i, err
					}
				}
				return len(work), nil
			}
			ref := newLogFixture()
			states := [][]byte{ref.current()}
			{
				j := newJournal(ref, tLR)
				for i, c := range work {
					synced, err := j.commitBatch(c, 1<<20, tFileSize, false)
					if err != nil {
						t.Fatalf("reference commit %d: %v", i, err)
					}
					if i > 0 && synced == holdAgain {
						t.Fatalf("commit %d synced first: %v; want %v", i, synced, !holdAgain)
					}
					states = append(states, ref.current())
				}
			}
			total := ref.opCount()
			base := newLogFixture().current()
			for crash := 1; crash <= total+1; crash++ {
				s := newFaultStorage(base)
				s.crashAfter(crash)
				done, err := run(s)
				if err != nil && !errors.Is(err, errCrashed) {
					t.Fatalf("crash %d: %v is not the crash", crash, err)
				}
				for _, mode := range allCrashModes {
					rs := newMemStorage(s.crashImage(mode))
					if _, err := replayLog(rs, tLR); err != nil {
						t.Fatalf("crash before op %d (%s): replay: %v", crash, mode, err)
					}
					switch {
					case equalOutsideLog(rs.data, states[done]):
					case done < len(work) && equalOutsideLog(rs.data, states[done+1]):
					default:
						t.Fatalf("crash before op %d of %d (%s), %d commits done: replayed metadata is neither state %d nor %d",
							crash, total, mode, done, done, done+1)
					}
				}
			}
		})
	}
}
