package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

// Power-loss tests for writes into a differencing image: the bitmap and BAT
// updates of a first write into sectors the child does not hold.

// memChain is a base image in memory and a child created over it.
type memChain struct {
	base  []byte
	child []byte
}

func newMemChain(t testing.TB, o CreateOptions, baseData []imageWrite) memChain {
	t.Helper()
	bs := createMem(t, o)
	im, err := OpenStorage(bs, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range baseData {
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	parent := openMemBase(t, bs.bytes())
	defer parent.Close()
	pl, err := newParentLocator("/vm/child.avhdx", "/vm/base.vhdx", parent.l.hdr.dataWriteGUID)
	if err != nil {
		t.Fatal(err)
	}
	cs := newMemStorage(nil)
	if err := createStorage(cs, CreateOptions{}, &childSpec{parent: parent, locator: pl}); err != nil {
		t.Fatal(err)
	}
	return memChain{base: bs.bytes(), child: cs.bytes()}
}

func openMemBase(t testing.TB, b []byte) *Image {
	t.Helper()
	im, err := OpenStorage(newMemStorage(bytes.Clone(b)), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// openChild opens the child on s over the base. The base bytes are shared,
// not copied (crash tests open thousands of chains): the parent is opened
// read-only, and the engine refuses writes to a read-only image.
func (mc memChain) openChild(t testing.TB, s Storage, ro bool) (*Image, error) {
	t.Helper()
	p, err := OpenStorage(newMemStorage(mc.base), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	im, err := openStorageWithParent(s, OpenOptions{ReadOnly: ro}, p)
	if err != nil {
		p.Close()
	}
	return im, err
}

// childWorkload covers each path of a differencing write: a first sector
// (new payload and bitmap block), another sector of that block (bits
// only), a run across two blocks (one new, one partial), a whole new block
// (FULLY_PRESENT), a partial block made whole, a rewrite of sectors already
// present (no metadata), and a block of a chunk whose bitmap exists.
func childWorkload() []imageWrite {
	return []imageWrite{
		{512, pattern(11, 512)},
		{4096, pattern(12, 1024)},
		{mib - 1024, pattern(13, 4096)},
		{5 * mib, pattern(14, mib)},
		{mib, pattern(15, mib)},
		{512, pattern(16, 512)},
		{9*mib + 512*7, pattern(17, 512)},
	}
}

func TestChildCrashAtEveryBoundaryReadsOldOrNewSectors(t *testing.T) {
	parallelSweep(t)
	o := CreateOptions{Size: 16 * mib, BlockSize: mib}
	mc := newMemChain(t, o, []imageWrite{{0, pattern(1, 12*mib)}})
	work := childWorkload()

	// states[i]: the disk as the chain reads it after i writes.
	states := [][]byte{append(pattern(1, 12*mib), make([]byte, 4*mib)...)}
	for _, w := range work {
		s := bytes.Clone(states[len(states)-1])
		copy(s[w.off:], w.data)
		states = append(states, s)
	}

	run := func(s Storage) (int, error) {
		im, err := mc.openChild(t, s, false)
		if err != nil {
			return 0, fmt.Errorf("open: %w", err)
		}
		durable := 0
		for _, w := range work {
			if _, err := im.WriteAt(w.data, w.off); err != nil {
				im.Close()
				return durable, fmt.Errorf("write at %#x: %w", w.off, err)
			}
			if err := im.Flush(); err != nil {
				im.Close()
				return durable, fmt.Errorf("flush: %w", err)
			}
			durable++
		}
		return durable, im.Close()
	}
	ref := newFaultStorage(mc.child)
	if n, err := run(ref); err != nil || n != len(work) {
		t.Fatalf("reference run: %d writes, %v", n, err)
	}
	total := ref.opCount()
	replayed := false
	got := make([]byte, len(states[0]))
	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(mc.child)
		s.crashAfter(crash)
		durable, err := run(s)
		if err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: workload error %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			where := fmt.Sprintf("crash before op %d of %d (%s), %d writes flushed", crash, total, mode, durable)
			img := s.crashImage(mode)
			replayed = replayed || imageHasActiveLog(t, img)
			rs := newMemStorage(img)
			im, err := mc.openChild(t, rs, false)
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatalf("%s: read: %v", where, err)
			}
			assertOldOrNewSectors(t, where, got, states[durable], states[min(durable+1, len(states)-1)])
			if err := im.Close(); err != nil {
				t.Fatalf("%s: close after reopen: %v", where, err)
			}
			// The recovered child validates read-only too.
			im, err = mc.openChild(t, rs, true)
			if err != nil {
				t.Fatalf("%s: read-only open after recovery: %v", where, err)
			}
			im.Close()
		}
	}
	if !replayed {
		t.Error("no crash point left a log to replay")
	}
}
