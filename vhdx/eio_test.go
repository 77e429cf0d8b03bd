package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// ioKind is one kind of Storage call, counted separately by eioStorage.
type ioKind int

const (
	kindRead ioKind = iota
	kindWrite
	kindSync
	kindTruncate
	kindSize
	kindZero // zeroRange / zeroKeep (hole punch, FALLOC_FL_ZERO_RANGE)
	nKinds
)

func (k ioKind) String() string {
	return [...]string{"ReadAt", "WriteAt", "Sync", "Truncate", "Size", "zeroRange"}[k]
}

// eioStorage wraps a faultStorage (which tracks what a power loss would
// keep) and fails the failN-th call of kind failKind with an error wrapping
// EIO; that call has no effect. A failed Sync models Linux after a
// writeback error: the pending writes are marked clean and never reach the
// disk, although reads still see them. Every call's caller (the vhdx
// function making it) is recorded, so a test can tell which call sites a
// workload reached.
type eioStorage struct {
	*faultStorage
	mu       sync.Mutex
	calls    [nKinds]int
	failKind ioKind
	failN    int // 0: never fail
	hit      bool
	before   [nKinds]int      // calls made before a workload's last probe (set by the workload)
	sites    map[string]bool  // "kind function" seen
	seq      [nKinds][]string // the call site of each call, by kind
	// duringSync, if set, runs inside every Sync before it returns: a test
	// hook that makes other I/O complete while fdatasync runs.
	duringSync func()
}

var errInjectedEIO = fmt.Errorf("injected host I/O error: %w", unix.EIO)

func newEIOStorage(img []byte) *eioStorage {
	return &eioStorage{faultStorage: newFaultStorage(img), sites: map[string]bool{}}
}

// call counts one call of kind k and reports whether it must fail.
func (e *eioStorage) call(k ioKind) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls[k]++
	if e.failN == 0 { // a clean run learns the call sites; fault runs only count
		site := callerInVHDX()
		e.sites[k.String()+" "+site] = true
		e.seq[k] = append(e.seq[k], site)
	}
	if e.failN > 0 && k == e.failKind && e.calls[k] == e.failN {
		e.hit = true
		return errInjectedEIO
	}
	return nil
}

// callerInVHDX names the first function up the stack that is package vhdx
// non-test code other than the storage adapters.
func callerInVHDX() string {
	pcs := make([]uintptr, 32)
	n := runtime.Callers(3, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	for {
		f, more := frames.Next()
		if strings.Contains(f.Function, "/vhdx.") && !strings.HasSuffix(f.File, "_test.go") {
			fn := f.Function[strings.LastIndex(f.Function, "/")+len("/vhdx."):]
			if !storageHelpers[fn] && !strings.Contains(fn, "syncLatch") && !strings.Contains(fn, "syncGroup") && !strings.Contains(fn, "osStorage") {
				return fn
			}
		}
		if !more {
			return "?"
		}
	}
}

func (e *eioStorage) ReadAt(p []byte, off int64) (int, error) {
	if err := e.call(kindRead); err != nil {
		return 0, err
	}
	return e.faultStorage.ReadAt(p, off)
}

func (e *eioStorage) WriteAt(p []byte, off int64) (int, error) {
	if err := e.call(kindWrite); err != nil {
		return 0, err
	}
	return e.faultStorage.WriteAt(p, off)
}

func (e *eioStorage) Sync() error {
	err := e.call(kindSync)
	if e.duringSync != nil {
		e.duringSync()
	}
	if err != nil {
		e.faultStorage.mu.Lock()
		e.faultStorage.pending = nil // marked clean, never written back
		e.faultStorage.mu.Unlock()
		return err
	}
	return e.faultStorage.Sync()
}

func (e *eioStorage) Truncate(size int64) error {
	if err := e.call(kindTruncate); err != nil {
		return err
	}
	return e.faultStorage.Truncate(size)
}

func (e *eioStorage) Size() (int64, error) {
	if err := e.call(kindSize); err != nil {
		return 0, err
	}
	return e.faultStorage.Size()
}

func (e *eioStorage) zeroRange(off, n int64) error {
	if err := e.call(kindZero); err != nil {
		return err
	}
	return writeZeroChunks(e.faultStorage, off, n)
}

func (e *eioStorage) zeroKeep(off, n int64) error {
	if err := e.call(kindZero); err != nil {
		return err
	}
	return writeZeroChunks(e.faultStorage, off, n)
}

// eioOp is one step of the scripted workload.
type eioOp struct {
	name  string
	write []byte // data written at off (nil: not a write)
	off   int64
	gone  bool // a later op discards it: not checked
	run   func(im *Image) error
}

// eioWorkload is what a guest does: allocating writes, in-place writes,
// flushes, reads, a discard and write-zeroes, over a 16 MiB image of 1 MiB
// blocks. Every write goes to its own range, so the expected contents of
// each range depend on that write alone (the discard and write-zeroes have
// ranges of their own too).
func eioWorkload() []eioOp {
	w := func(name string, seed int64, off int64) eioOp {
		p := pattern(seed, 8192)
		return eioOp{name: name, write: p, off: off, run: func(im *Image) error { _, err := im.WriteAt(p, off); return err }}
	}
	flush := eioOp{name: "flush", run: func(im *Image) error { return im.Flush() }}
	return []eioOp{
		w("allocate block 0", 1, 0),
		flush,
		w("in place in block 0", 2, 64*kib),
		w("allocate block 3", 3, 3*mib+8*kib),
		flush,
		{name: "read block 0", run: func(im *Image) error {
			_, err := im.ReadAt(make([]byte, 8192), 0)
			return err
		}},
		{name: "read block 0 scattered", run: func(im *Image) error {
			return im.ReadVec([][]byte{make([]byte, 512), make([]byte, 3584)}, 0)
		}},
		func() eioOp { o := w("allocate block 5", 4, 5*mib); o.gone = true; return o }(),
		flush,
		{name: "discard block 5", run: func(im *Image) error { return im.Discard(5*mib, mib) }},
		{name: "write zeroes in block 0", run: func(im *Image) error { return im.WriteZeroes(128*kib, 8192, false) }},
		w("allocate block 7", 5, 7*mib),
		w("in place in block 3", 6, 3*mib+64*kib),
		flush,
	}
}

// eioRun is the outcome of one run of the workload with one injected fault.
type eioRun struct {
	s         *eioStorage
	openErr   error
	errs      []error // per workload op
	afterW    error   // a write after the fault, into a fresh block
	afterF    error   // a flush after it
	closeErr  error
	hostIO    HostIOErrors
	anyFailed bool
	before    [nKinds]int // calls made before the last probe
	live      []byte      // the virtual disk as read after the last probe's flush
	atFlush   []byte      // what a power loss right then would keep
}

const eioImageSize = 16 * mib

func runEIOWorkload(t *testing.T, created []byte, kind ioKind, n int) eioRun {
	t.Helper()
	s := newEIOStorage(created)
	s.failKind, s.failN = kind, n
	r := eioRun{s: s}
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		r.openErr = err
		return r
	}
	for _, op := range eioWorkload() {
		err := op.run(im)
		r.errs = append(r.errs, err)
		r.anyFailed = r.anyFailed || err != nil
	}
	// The fault may hit this first probe itself; the second runs after it.
	_, err = im.WriteAt(pattern(98, 4096), 9*mib)
	r.errs = append(r.errs, err, im.Flush())
	r.s.mu.Lock()
	r.before = r.s.calls
	r.s.mu.Unlock()
	_, r.afterW = im.WriteAt(pattern(99, 4096), 11*mib)
	r.afterF = im.Flush()
	r.hostIO = im.HostIOErrors()
	if r.afterW == nil && r.afterF == nil {
		// A flush just succeeded: a power loss now keeps exactly what the
		// live image reads.
		r.live = make([]byte, eioImageSize)
		if _, err := im.ReadAt(r.live, 0); err != nil {
			r.live = nil
		}
		r.atFlush = s.crashImage(crashDrop)
	}
	r.closeErr = im.Close()
	return r
}

// TestEveryStorageCallSiteFailingWithEIORecoversOrSaysWhy fails, one run at
// a time, every Storage call (of every kind) the workload makes, and checks
// the rules of the package doc ("Host I/O errors"):
//
//   - the operation that hit the error fails with an error wrapping EIO, and
//     no EIO is swallowed;
//   - with the fault gone, a new write and a flush succeed without a reopen,
//     unless a failed sync had guest writes at risk (then every flush fails,
//     saying so), and the journal never goes offline for a single fault;
//   - what a power loss would keep opens, checks clean (leaked space aside)
//     and holds every write acknowledged before a successful flush.
func TestEveryStorageCallSiteFailingWithEIORecoversOrSaysWhy(t *testing.T) {
	parallelSweep(t)
	base := newFaultStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: eioImageSize, BlockSize: mib}); err != nil {
		t.Fatal(err)
	}
	created := base.current()

	clean := runEIOWorkload(t, created, kindRead, 0)
	if clean.openErr != nil || clean.anyFailed || clean.afterW != nil || clean.afterF != nil || clean.closeErr != nil {
		t.Fatalf("workload without a fault: open %v, ops %v, after %v/%v, close %v",
			clean.openErr, clean.errs, clean.afterW, clean.afterF, clean.closeErr)
	}
	checkEIODurable(t, "no fault", clean, created)

	var recovered, lost int
	for kind := ioKind(0); kind < nKinds; kind++ {
		// The last probe checks recovery: no fault there.
		for _, n := range clean.s.faultPoints(kind, clean.before[kind]) {
			name := fmt.Sprintf("%s#%d", kind, n)
			r := runEIOWorkload(t, created, kind, n)
			if !r.s.hit {
				continue // an earlier change of path (none expected: the run is deterministic)
			}
			where := fmt.Sprintf("%s (in %s)", name, siteOf(clean.s, kind, n))
			if r.openErr != nil {
				if !errors.Is(r.openErr, unix.EIO) {
					t.Errorf("%s: open failed with %v, not wrapping EIO", where, r.openErr)
				}
				checkEIOReopens(t, where, r.s.crashImage(crashDrop))
				continue
			}
			sawEIO := false
			for i, err := range append(r.errs, r.afterW, r.afterF, r.closeErr) {
				if err == nil {
					continue
				}
				if !errors.Is(err, unix.EIO) {
					t.Errorf("%s: step %d failed with %v, which does not wrap EIO", where, i, err)
				}
				sawEIO = true
			}
			if !sawEIO {
				t.Errorf("%s: the injected EIO was swallowed: every operation succeeded", where)
			}
			if r.hostIO.JournalOffline {
				t.Errorf("%s: one transient fault took the journal offline: %+v", where, r.hostIO)
			}
			switch {
			case r.afterW == nil && r.afterF == nil:
				recovered++
			case r.hostIO.PayloadLost && kind == kindSync && r.afterF != nil &&
				strings.Contains(r.afterF.Error(), "reopened"):
				lost++
			default:
				t.Errorf("%s: after the fault cleared, write = %v, flush = %v (host I/O state %+v)", where, r.afterW, r.afterF, r.hostIO)
			}
			checkEIODurable(t, where, r, created)
			checkEIOLiveMatchesDurable(t, where, r)
		}
	}
	if recovered == 0 || lost == 0 {
		t.Errorf("recovered %d runs, lost payload in %d: both rules must be exercised", recovered, lost)
	}
	t.Logf("faults injected: %d recovered without reopen, %d lost unflushed payload (flushes fail until reopen)", recovered, lost)
}

// siteOf names the function making call n of kind k in the clean run.
func siteOf(clean *eioStorage, k ioKind, n int) string {
	if n < 1 || n > len(clean.seq[k]) {
		return "?"
	}
	return clean.seq[k][n-1]
}

// checkEIODurable opens what a power loss now would keep (replaying the
// log), checks it clean and looks for every write acknowledged before a
// later successful flush.
func checkEIODurable(t *testing.T, where string, r eioRun, created []byte) {
	t.Helper()
	img := r.s.crashImage(crashDrop)
	im := checkEIOReopens(t, where, img)
	if im == nil {
		return
	}
	defer im.Close()
	ops := eioWorkload()
	// flushedAfter[i]: a flush after op i succeeded.
	okFlushAfter := make([]bool, len(ops))
	later := r.afterF == nil && r.afterW == nil && r.closeErr == nil
	for i := len(ops) - 1; i >= 0; i-- {
		okFlushAfter[i] = later
		if i < len(r.errs) && ops[i].name == "flush" && r.errs[i] == nil {
			later = true
		}
	}
	for i, op := range ops {
		if op.write == nil || op.gone || i >= len(r.errs) || r.errs[i] != nil || !okFlushAfter[i] {
			continue
		}
		got := make([]byte, len(op.write))
		if _, err := im.ReadAt(got, op.off); err != nil {
			t.Errorf("%s: read back %q: %v", where, op.name, err)
			continue
		}
		if !bytes.Equal(got, op.write) {
			t.Errorf("%s: %q was acknowledged and flushed but is lost after a power loss", where, op.name)
		}
	}
}

// checkEIOReopens opens img read-write on memory (replaying its log), runs
// the checks of `check` on it and returns it, or nil after reporting.
func checkEIOReopens(t *testing.T, where string, img []byte) *Image {
	t.Helper()
	c := &checker{collect: true}
	im, err := openStorage(newMemStorage(img), OpenOptions{}, c)
	if err != nil {
		t.Errorf("%s: the image a power loss leaves does not open: %v", where, err)
		return nil
	}
	for _, p := range c.problems {
		if !p.Leak {
			t.Errorf("%s: the image a power loss leaves is not check-clean: %s", where, p.What)
		}
	}
	return im
}

// TestWriteCompletingWhileASyncFailsIsTreatedAsLost drives the interleaving
// the latch must get right: an in-place write completes while an
// fdatasync runs (started after the sync began, so the sync's own snapshot
// of "payload at risk" missed it), and that fdatasync fails. The write may
// have been in the failed writeback, so it counts as lost: no later Flush
// may succeed. Without the write (the second case) the same failure is
// metadata only and the next Flush recovers.
func TestWriteCompletingWhileASyncFailsIsTreatedAsLost(t *testing.T) {
	for _, writeDuring := range []bool{true, false} {
		t.Run(fmt.Sprintf("writeDuringSync=%v", writeDuring), func(t *testing.T) {
			base := newFaultStorage(nil)
			if err := CreateStorage(base, CreateOptions{Size: eioImageSize, BlockSize: mib}); err != nil {
				t.Fatal(err)
			}
			s := newEIOStorage(base.current())
			im, err := OpenStorage(s, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil { // allocates block 0
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			s.mu.Lock()
			s.failKind, s.failN = kindSync, s.calls[kindSync]+1
			s.mu.Unlock()
			if writeDuring {
				s.duringSync = func() {
					s.duringSync = nil
					done := make(chan error)
					go func() { // another queue's request, completing now
						_, err := im.WriteAt(pattern(2, 4096), 8192)
						done <- err
					}()
					if err := <-done; err != nil {
						t.Errorf("in-place write during the sync: %v", err)
					}
				}
			}
			if err := im.Flush(); !errors.Is(err, unix.EIO) {
				t.Fatalf("flush with a failing fdatasync = %v, want EIO", err)
			}
			err = im.Flush()
			st := im.HostIOErrors()
			if writeDuring {
				if err == nil || !st.PayloadLost {
					t.Fatalf("flush after the failure = %v (state %+v): a write that completed during the failed sync was reported durable", err, st)
				}
				return
			}
			if err != nil || st.Open || st.Recovered != 1 {
				t.Fatalf("flush after a metadata-only failure = %v (state %+v), want a recovery point", err, st)
			}
		})
	}
}

// checkEIOLiveMatchesDurable: after a flush that succeeded, the image a
// power loss keeps reads exactly as the live image did. A recovery that
// left the file disagreeing with memory (a failed commit's BAT entry on
// disk but not in memory, say) shows here.
func checkEIOLiveMatchesDurable(t *testing.T, where string, r eioRun) {
	t.Helper()
	if r.atFlush == nil {
		return
	}
	if r.live == nil {
		t.Errorf("%s: the live image could not be read after recovery", where)
		return
	}
	im := checkEIOReopens(t, where, r.atFlush)
	if im == nil {
		return
	}
	defer im.Close()
	got := make([]byte, eioImageSize)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Errorf("%s: read the durable image: %v", where, err)
		return
	}
	if !bytes.Equal(got, r.live) {
		i := 0
		for i < len(got) && got[i] == r.live[i] {
			i++
		}
		t.Errorf("%s: after a successful flush the durable image differs from the live one at virtual offset %#x", where, i)
	}
}

// faultPoints returns the call numbers (1-based) of kind k worth failing
// among the first max calls: every call whose site differs from the call
// before or after it. A run of identical calls (the 256 sector reads of a
// log scan) is failed at its first and last call only; every call site and
// every change from one site to another is still failed.
func (e *eioStorage) faultPoints(k ioKind, max int) []int {
	seq := e.seq[k]
	var out []int
	for i := 0; i < max && i < len(seq); i++ {
		if i == 0 || i == max-1 || seq[i] != seq[i-1] || i+1 < len(seq) && seq[i] != seq[i+1] {
			out = append(out, i+1)
		}
	}
	return out
}
