package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"testing"
)

// Space reuse: a freed range is never handed to another block while an I/O
// that loaded the old BAT entry runs, and a reused block never shows the
// previous owner's data. The interleavings are driven by the hooks.

// pausedIO runs fn in a goroutine and parks it in hookLoaded the first time
// an entry pointing at fileOff is loaded; it returns when the I/O is parked
// and a function that resumes it and waits for it to finish.
func pausedIO(t *testing.T, im *Image, fileOff uint64, fn func() error) (resume func() error) {
	t.Helper()
	parked, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	im.hookLoaded = func(e uint64) {
		if batFileOffset(e) != fileOff {
			return
		}
		once.Do(func() {
			close(parked)
			<-release
		})
	}
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case <-parked:
	case err := <-done:
		t.Fatalf("I/O finished without loading the entry at %#x: %v", fileOff, err)
	}
	return func() error {
		close(release)
		return <-done
	}
}

func blockOffset(im *Image, b uint64) uint64 {
	return batFileOffset(im.bat.load(batIndex(b, im.l.chunkRatio)))
}

// TestFreedRangeIsNotReusedWhileAnIOHoldsItsOldEntry: a read and a write
// each park after loading block 0's entry; block 0 is discarded; a new
// block allocated meanwhile gets fresh space, not block 0's range. Once the
// parked I/O finished, the next allocation reuses the range, zeroed: the
// parked write's late data, which landed in the freed range, does not show.
func TestFreedRangeIsNotReusedWhileAnIOHoldsItsOldEntry(t *testing.T) {
	const bs = 1 * mib
	for _, kind := range []string{"read", "write"} {
		t.Run(kind, func(t *testing.T) {
			s := createMem(t, CreateOptions{Size: 16 * mib, BlockSize: bs})
			im, err := OpenStorage(s, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			old := pattern(1, bs)
			if _, err := im.WriteAt(old, 0); err != nil {
				t.Fatal(err)
			}
			r0 := blockOffset(im, 0)
			buf := make([]byte, 4096)
			late := pattern(9, 4096)
			resume := pausedIO(t, im, r0, func() error {
				if kind == "read" {
					_, err := im.ReadAt(buf, 8192)
					return err
				}
				_, err := im.WriteAt(late, 8192)
				return err
			})
			if err := im.Discard(0, bs); err != nil {
				t.Fatal(err)
			}
			// The flush commits the discard's BAT change, which frees the
			// range; only the parked I/O now stands in the way of reuse.
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			reused := false
			im.beforeReuse = func(uint64) { reused = true }
			newData := pattern(2, 4096)
			if _, err := im.WriteAt(newData, 4*bs); err != nil {
				t.Fatal(err)
			}
			if blockOffset(im, 4) == r0 || reused {
				t.Fatalf("block 4 got block 0's freed range %#x while a %s holding its old entry is in flight", r0, kind)
			}
			if err := resume(); err != nil {
				t.Fatal(err)
			}
			if kind == "read" && !bytes.Equal(buf, old[8192:8192+4096]) && !isZeros(buf) {
				t.Fatal("the parked read returned neither block 0's data nor zeros")
			}
			// Now the range may be reused, and must read zeros around the
			// new data whatever the parked write left there.
			if _, err := im.WriteAt(newData, 7*bs); err != nil {
				t.Fatal(err)
			}
			if blockOffset(im, 7) != r0 || !reused {
				t.Fatalf("block 7 is at %#x; want block 0's freed range %#x reused once no I/O holds it", blockOffset(im, 7), r0)
			}
			got := make([]byte, bs)
			if _, err := im.ReadAt(got, 7*bs); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, bs)
			copy(want, newData)
			if !bytes.Equal(got, want) {
				t.Fatal("reused block shows data other than its own write and zeros")
			}
			if _, err := im.ReadAt(got, 0); err != nil || !isZeros(got) {
				t.Fatalf("discarded block 0 does not read zeros (err %v)", err)
			}
		})
	}
}

// TestConcurrentDiscardWriteReadKeepEachBlockOwn: goroutines each own a set
// of blocks and write, read, discard and rewrite them at random, so freed
// ranges pass from one goroutine's blocks to another's all the time. Every
// read must match the goroutine's own model: a range reused too early, or
// reused without zeroing, shows another block's data. Run with -race.
func TestConcurrentDiscardWriteReadKeepEachBlockOwn(t *testing.T) {
	const bs, workers, perWorker, rounds = 1 * mib, 4, 4, 150
	s := createMem(t, CreateOptions{Size: workers * perWorker * bs, BlockSize: bs})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			model := make([][]byte, perWorker)
			for i := range model {
				model[i] = make([]byte, bs)
			}
			for r := 0; r < rounds; r++ {
				i := rng.Intn(perWorker)
				base := int64(w*perWorker+i) * bs
				off := int64(rng.Intn(bs/4096)) * 4096
				n := int64(1+rng.Intn(16)) * 4096
				n = min(n, bs-off)
				switch rng.Intn(5) {
				case 4: // flush: commits queued discards, freeing their ranges
					if err := im.Flush(); err != nil {
						errs <- err
						return
					}
				case 0: // write
					d := pattern(int64(w*1000000+r), int(n))
					if _, err := im.WriteAt(d, base+off); err != nil {
						errs <- err
						return
					}
					copy(model[i][off:], d)
				case 1: // discard the whole block
					if err := im.Discard(base, bs); err != nil {
						errs <- err
						return
					}
					clear(model[i])
				case 2: // discard or zero part of it
					var err error
					if rng.Intn(2) == 0 {
						err = im.Discard(base+off, n)
					} else {
						err = im.WriteZeroes(base+off, n, rng.Intn(2) == 0)
					}
					if err != nil {
						errs <- err
						return
					}
					clear(model[i][off : off+n])
				default: // read and compare
					got := make([]byte, bs)
					if _, err := im.ReadAt(got, base); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, model[i]) {
						errs <- fmt.Errorf("worker %d round %d: block %d does not read what this worker wrote", w, r, w*perWorker+i)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if im.space.reusedBytes == 0 {
		t.Fatal("no freed range was ever reused; the test does not exercise reuse")
	}
	assertNoSharedRanges(t, im)
}

// assertNoSharedRanges fails if two BAT entries own overlapping file ranges.
func assertNoSharedRanges(t *testing.T, im *Image) {
	t.Helper()
	owner := map[uint64]uint64{} // 1 MiB unit → entry index
	for i := range im.bat.len() {
		sp, ok := im.ownedRange(i, im.bat.load(i))
		if !ok {
			continue
		}
		for u := sp.start >> unitShift; u < sp.end>>unitShift; u++ {
			if j, dup := owner[u]; dup {
				t.Fatalf("BAT entries %d and %d both own file offset %#x", j, i, u<<unitShift)
			}
			owner[u] = uint64(i)
		}
	}
}

// TestDiscardAndReuseCrashAtEveryBoundary: blocks are discarded (whole and
// partial) and new blocks written into the freed space, each step flushed.
// After a power cut before any operation, in every crash mode, the image
// opens, no two BAT entries own the same range, discarded data is old or
// zero (zero once the discard's flush returned), every block reads either
// its own data or zeros (never another block's), and new writes after the
// recovery, reusing whatever was left free, read zeros around their data.
func TestDiscardAndReuseCrashAtEveryBoundary(t *testing.T) {
	parallelSweep(t)
	const bs = 1 * mib
	start, old := imageWithOldBlocks(t, 16*mib, bs)
	fresh := map[int64][]byte{5: pattern(20, 4096), 6: pattern(21, 4096)}
	type step func(im *Image) error
	steps := []step{
		func(im *Image) error { return im.Discard(1*bs, 2*bs+bs/2) }, // blocks 1, 2 and half of 3
		func(im *Image) error { _, err := im.WriteAt(fresh[5], 5*bs); return err },
		func(im *Image) error { _, err := im.WriteAt(fresh[6], 6*bs); return err },
	}
	runSteps := func(s Storage) (int, error) {
		im, err := OpenStorage(s, OpenOptions{})
		if err != nil {
			return 0, err
		}
		done := 0
		for _, st := range steps {
			if err := st(im); err != nil {
				return done, err
			}
			if err := im.Flush(); err != nil {
				return done, err
			}
			done++
		}
		return done, im.Close()
	}
	ref := newFaultStorage(start)
	if n, err := runSteps(ref); err != nil || n != len(steps) {
		t.Fatalf("reference run: %d steps, %v", n, err)
	}
	total := ref.opCount()
	t.Logf("%d operations", total)

	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(start)
		s.crashAfter(crash)
		durable, err := runSteps(s)
		if err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			where := fmt.Sprintf("crash before op %d of %d (%s), %d steps flushed", crash, total, mode, durable)
			// Room for the blocks allocated after recovery, so growing the
			// file does not copy the whole image each time.
			rs := newMemStorage(slices.Grow(s.crashImage(mode), 4*bs))
			im, err := OpenStorage(rs, OpenOptions{})
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			assertNoSharedRanges(t, im)
			read := blockReader(t, im, bs, where)
			if !sameBytes(read(0), old[0]) {
				t.Fatalf("%s: untouched block 0 changed", where)
			}
			for _, b := range []int64{1, 2} {
				got := read(b)
				if !isZeros(got) && (durable >= 1 || !sameBytes(got, old[b])) {
					t.Fatalf("%s: discarded block %d reads neither zeros nor (before the flush) its old data", where, b)
				}
			}
			got3 := read(3)
			if !sameBytes(got3[bs/2:], old[3][bs/2:]) {
				t.Fatalf("%s: the kept half of block 3 changed", where)
			}
			for i := 0; i < bs/2; i += 512 {
				sec := got3[i : i+512]
				if !isZeros(sec) && (durable >= 1 || !sameBytes(sec, old[3][i:i+512])) {
					t.Fatalf("%s: discarded sector at +%#x of block 3 reads neither zeros nor its old data", where, i)
				}
			}
			for k, b := range []int64{5, 6} {
				got := read(b)
				want := make([]byte, bs)
				copy(want, fresh[b])
				if !sameBytes(got, want) && (durable >= 2+k || !isZeros(got)) {
					t.Fatalf("%s: new block %d reads neither its data with zeros around it nor (before the flush) zeros", where, b)
				}
			}
			// Allocate again after recovery: whatever the crash left free
			// is reused and must read zeros around the new data.
			for _, b := range []int64{8, 9, 10} {
				d := pattern(30+b, 4096)
				if _, err := im.WriteAt(d, b*bs+4096); err != nil {
					t.Fatalf("%s: write after recovery: %v", where, err)
				}
				want := make([]byte, bs)
				copy(want[4096:], d)
				if !sameBytes(read(b), want) {
					t.Fatalf("%s: block %d written after recovery shows stale data", where, b)
				}
			}
			assertNoSharedRanges(t, im)
			if err := im.Close(); err != nil {
				t.Fatalf("%s: close: %v", where, err)
			}
		}
	}
}

// zeroRange models a hole punch (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE) as one
// operation: zeros over the part of the range inside the file, pending until
// the next Sync like any write (and torn or dropped by a crash the same way).
func (f *faultStorage) zeroRange(off, n int64) error {
	f.mu.Lock()
	size := int64(len(f.cur))
	f.mu.Unlock()
	if off >= size {
		return nil
	}
	_, err := f.WriteAt(make([]byte, min(n, size-off)), off)
	return err
}

// isZeros reports whether b is all zeros, with one memory comparison (a
// byte loop is slow under -race): every byte equals its predecessor and the
// first is zero.
func isZeros(b []byte) bool {
	return len(b) == 0 || b[0] == 0 && sameBytes(b[1:], b[:len(b)-1])
}

// TestUnflushedDiscardNeverFreesARangeTheDiskStillReferences: a discard's
// BAT change waits for a flush, so until then the file still maps the
// discarded block to its range. An allocation in between (here the first
// one, which builds the free set) must not take that range: the image as
// it is on disk at that moment opens with no two entries sharing a range.
// After the flush the range is reused.
func TestUnflushedDiscardNeverFreesARangeTheDiskStillReferences(t *testing.T) {
	const bs = 1 * mib
	s := createMem(t, CreateOptions{Size: 2 * gib, BlockSize: bs})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	// A new session: its first allocation builds the free set.
	im, err = OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	r0 := blockOffset(im, 0)
	if err := im.Discard(0, bs); err != nil {
		t.Fatal(err)
	}
	// Block 1000's entry lies in another BAT sector than block 0's, so its
	// commit does not carry block 0's change along.
	if _, err := im.WriteAt(pattern(2, 4096), 1000*bs); err != nil {
		t.Fatal(err)
	}
	if blockOffset(im, 1000) == r0 {
		t.Fatalf("block 1000 got %#x, which the unflushed discard's block still owns on disk", r0)
	}
	onDisk, err := OpenStorage(newMemStorage(s.bytes()), OpenOptions{ReadOnly: true, ReplayLogInMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	assertNoSharedRanges(t, onDisk)
	onDisk.Close()
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(3, 4096), 1500*bs); err != nil {
		t.Fatal(err)
	}
	if blockOffset(im, 1500) != r0 {
		t.Fatalf("block 1500 is at %#x; want the range %#x freed by the flushed discard", blockOffset(im, 1500), r0)
	}
}
