package vhdx

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/google/uuid"
)

// crashClock numbers the state-changing operations of several files
// together: power goes out for all of them at once, before operation at;
// or operation failAt alone fails (an I/O error) and later ones run.
type crashClock struct {
	n, at, failAt int
}

// clockedStorage counts its writes, truncates and syncs on a shared
// crashClock and fails them all from the crash on (the faultStorage below
// never sees them, so its crash image is the files at that instant).
type clockedStorage struct {
	*faultStorage
	c *crashClock
}

func (s clockedStorage) tick() error {
	s.c.n++
	if s.c.at > 0 && s.c.n >= s.c.at {
		return errCrashed
	}
	if s.c.n == s.c.failAt {
		return errFault
	}
	return nil
}

func (s clockedStorage) WriteAt(p []byte, off int64) (int, error) {
	if err := s.tick(); err != nil {
		return 0, err
	}
	return s.faultStorage.WriteAt(p, off)
}

func (s clockedStorage) Truncate(n int64) error {
	if err := s.tick(); err != nil {
		return err
	}
	return s.faultStorage.Truncate(n)
}

func (s clockedStorage) Sync() error {
	if err := s.tick(); err != nil {
		return err
	}
	return s.faultStorage.Sync()
}

// mergeCrashRun is one live merge of a memChain's child into its base on
// fault storages sharing a clock, with guest writes (each flushed) before
// the copy, between the copy and the final pass, and after the switch.
type mergeCrashRun struct {
	top, parent *faultStorage
	durable     int  // guest writes flushed
	removed     bool // the top was dropped: the parent alone is the disk
}

// mergeCrashWrites are the guest writes of the run: into a block the child
// holds whole, into a sector a partially present block lacks, into a block
// the child does not hold, and one after the switch (to the parent).
func mergeCrashWrites() []imageWrite {
	return []imageWrite{
		{5*mib + 4096, pattern(201, 4096)},
		{4096 + 512*20, pattern(202, 512)},
		{13 * mib, pattern(203, 8192)},
		{2*mib + 512, pattern(204, 1024)},
	}
}

func (r *mergeCrashRun) run(mc memChain, c *crashClock) error {
	r.top = newFaultStorage(mc.child)
	r.parent = newFaultStorage(mc.base)
	ts := clockedStorage{r.top, c}
	ps := clockedStorage{r.parent, c}
	pro, err := openStorage(ps, OpenOptions{ReadOnly: true}, nil)
	if err != nil {
		return err
	}
	top, err := openStorageWithParent(ts, OpenOptions{}, pro)
	if err != nil {
		pro.Close()
		return err
	}
	m, err := StartLiveMerge(top, LiveMergeOptions{
		reopen: func(old *Image, g uuid.UUID) (*Image, error) {
			old.Close()
			return openStorage(ps, OpenOptions{DataWriteGUID: g}, nil)
		},
		removeTop: func() error { r.removed = true; return nil },
	})
	if err != nil {
		top.Close()
		return err
	}
	work := mergeCrashWrites()
	write := func(w imageWrite) error {
		if _, err := m.WriteAt(w.data, w.off); err != nil {
			return err
		}
		if err := m.Flush(); err != nil {
			return err
		}
		r.durable++
		return nil
	}
	fail := func(err error) error {
		m.Abandon()
		m.Current().Close()
		return err
	}
	if err := write(work[0]); err != nil {
		return fail(err)
	}
	if err := m.Run(context.Background()); err != nil {
		return fail(err)
	}
	for _, w := range work[1:3] {
		if err := write(w); err != nil {
			return fail(err)
		}
	}
	p, err := m.Finish()
	if err != nil {
		return fail(err)
	}
	if err := write(work[3]); err != nil {
		p.Close()
		return err
	}
	return p.Close()
}

// TestLiveMergeCrashAtEveryStorageBoundaryReadsTheSame: power lost before
// each write, truncate or sync of either file of a live merge (with each
// pending operation dropped, kept, torn, or some of them kept) leaves files
// that open, as a restarted daemon opens them, as a valid chain (or, once
// the child was dropped, the parent alone) reading every flushed write:
// each sector reads as after the flushed writes or the one in flight.
// The parent's log, when the crash left one, is replayed by the same code
// a read-write open of the child runs (replayLinkedParent). The same for
// an I/O error at each operation.
func TestLiveMergeCrashAtEveryStorageBoundaryReadsTheSame(t *testing.T) {
	parallelSweep(t)
	o := CreateOptions{Size: 16 * mib, BlockSize: mib}
	mc := newMemChain(t, o, []imageWrite{{0, pattern(1, 12*mib)}})
	// The child's own data, written before the merge.
	{
		cs := newMemStorage(bytes.Clone(mc.child))
		im, err := mc.openChild(t, cs, false)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range childWorkload() {
			if _, err := im.WriteAt(w.data, w.off); err != nil {
				t.Fatal(err)
			}
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		mc.child = cs.bytes()
	}
	states := [][]byte{}
	{
		im, err := mc.openChild(t, newMemStorage(bytes.Clone(mc.child)), true)
		if err != nil {
			t.Fatal(err)
		}
		states = append(states, readAll(t, im))
		im.Close()
	}
	for _, w := range mergeCrashWrites() {
		s := bytes.Clone(states[len(states)-1])
		copy(s[w.off:], w.data)
		states = append(states, s)
	}

	var ref mergeCrashRun
	c := &crashClock{}
	if err := ref.run(mc, c); err != nil || !ref.removed || ref.durable != len(states)-1 {
		t.Fatalf("reference run: %v (removed %v, %d writes)", err, ref.removed, ref.durable)
	}
	total := c.n
	t.Logf("%d operations", total)
	replayed, sawChain, sawParent := false, false, false
	got := make([]byte, len(states[0]))
	verify := func(where string, r *mergeCrashRun, pimg, timg []byte) {
		t.Helper()
		replayed = replayed || imageHasActiveLog(t, pimg)
		ps := newMemStorage(pimg)
		var im *Image
		var err error
		if r.removed {
			sawParent = true
			im, err = openStorage(ps, OpenOptions{}, nil) // serve PARENT
		} else {
			sawChain = true
			im, err = reopenMergedChain(ps, newMemStorage(timg))
		}
		if err != nil {
			t.Fatalf("%s: reopen: %v", where, err)
		}
		if _, err := im.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: read: %v", where, err)
		}
		assertOldOrNewSectors(t, where, got, states[r.durable], states[min(r.durable+1, len(states)-1)])
		if err := im.Close(); err != nil {
			t.Fatalf("%s: close after reopen: %v", where, err)
		}
	}
	for crash := 1; crash <= total+1; crash++ {
		var r mergeCrashRun
		if err := r.run(mc, &crashClock{at: crash}); err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: the run's error %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			if mode != crashDrop && len(r.parent.pending) == 0 && len(r.top.pending) == 0 {
				break // nothing pending: every mode leaves the same files
			}
			where := fmt.Sprintf("crash before op %d of %d (%s), %d writes flushed, child removed %v", crash, total, mode, r.durable, r.removed)
			verify(where, &r, r.parent.crashImage(mode), r.top.crashImage(mode))
		}
	}
	if !replayed || !sawChain || !sawParent {
		t.Errorf("crash points left a parent log %v, a chain %v, the parent alone %v: want all", replayed, sawChain, sawParent)
	}

	// An I/O error at each operation instead: the merge (or the guest
	// write) fails with it, the files are closed as the daemon would, and
	// they open as above reading every write that succeeded.
	for fail := 1; fail <= total; fail++ {
		var r mergeCrashRun
		if err := r.run(mc, &crashClock{failAt: fail}); err != nil && !errors.Is(err, errFault) {
			t.Fatalf("failure at op %d: the run's error %v is not the injected one", fail, err)
		}
		verify(fmt.Sprintf("I/O error at op %d of %d, %d writes flushed, child removed %v", fail, total, r.durable, r.removed),
			&r, r.parent.current(), r.top.current())
	}
}

// reopenMergedChain opens the child on ts over the parent on ps read-write
// as Open does after a crash: the parent's log replayed first if the child
// is linked to it through parent_linkage2, then the parent read-only, and
// the linkage settled.
func reopenMergedChain(ps, ts Storage) (*Image, error) {
	probe, err := openStorage(ts, OpenOptions{ReadOnly: true, ReplayLogInMemory: true}, nil)
	if err != nil {
		return nil, err
	}
	pl := probe.l.locator
	probe.Close()
	if pl.linkage2 != uuid.Nil {
		replayLinkedParent(pl, func(o OpenOptions) (*Image, error) { return openStorage(ps, o, nil) })
	}
	p, err := openStorage(ps, OpenOptions{ReadOnly: true}, nil)
	if err != nil {
		return nil, err
	}
	im, err := openStorageWithParent(ts, OpenOptions{}, p)
	if err != nil {
		p.Close()
		return nil, err
	}
	if err := im.settleInterruptedLinkage(); err != nil {
		im.Close()
		return nil, err
	}
	return im, nil
}
