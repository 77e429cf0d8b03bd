package vhdx

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// benchChain builds a 64 GiB base (1 MiB blocks) whose first 64 MiB are
// written, and depth empty children over it; it returns the paths, base
// first.
func benchChain(b *testing.B, depth int) []string {
	b.Helper()
	dir := b.TempDir()
	paths := []string{filepath.Join(dir, "base.vhdx")}
	if err := Create(paths[0], CreateOptions{Size: 64 * gib, BlockSize: mib}); err != nil {
		b.Fatal(err)
	}
	writeImage(b, paths[0], 0, pattern(1, 64*mib))
	for i := 1; i <= depth; i++ {
		p := filepath.Join(dir, fmt.Sprintf("c%d.avhdx", i))
		if err := Create(p, CreateOptions{ParentPath: paths[i-1]}); err != nil {
			b.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

// BenchmarkChainRead4K: 4 KiB reads at pseudo-random offsets of data that
// lives in the base, through the base alone ("flat") and through 8 empty
// children ("depth=8"); the target is depth=8 at ≥ 0.8× flat.
func BenchmarkChainRead4K(b *testing.B) {
	paths := benchChain(b, 8)
	for _, c := range []struct {
		name string
		path string
	}{{"flat", paths[0]}, {"depth=8", paths[8]}} {
		b.Run(c.name, func(b *testing.B) {
			im, err := Open(c.path, OpenOptions{ReadOnly: true})
			if err != nil {
				b.Fatal(err)
			}
			defer im.Close()
			buf := make([]byte, 4*kib)
			b.SetBytes(4 * kib)
			b.ReportAllocs()
			x := uint64(1)
			for b.Loop() {
				x = x*6364136223846793005 + 1442695040888963407
				off := int64(x>>40) % (64 * mib / (4 * kib)) * 4 * kib
				if _, err := im.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkChildFirstWrite: 4 KiB writes into sectors the image does not
// hold yet: a fresh block of a flat image (allocation), a fresh block of a
// child (payload block, bitmap bits and BAT entry through the journal), and
// fresh sectors of a block the child already holds partially (bitmap bits
// only).
func BenchmarkChildFirstWrite(b *testing.B) {
	paths := benchChain(b, 1)
	flat := filepath.Join(b.TempDir(), "flat.vhdx") // writing the base would orphan the child
	if err := Create(flat, CreateOptions{Size: 64 * gib, BlockSize: mib}); err != nil {
		b.Fatal(err)
	}
	buf := pattern(2, 4*kib)
	for _, c := range []struct {
		name  string
		path  string
		off   func(i int64) int64
		limit int64
	}{
		{"flat/newblock", flat, func(i int64) int64 { return 64*mib + i*mib }, 60 * gib / mib},
		{"child/newblock", paths[1], func(i int64) int64 { return 1*gib + i*mib }, 31 * gib / mib},
		{"child/partialblock", paths[1], func(i int64) int64 { return 8*kib*(i%128) + (i/128)*mib }, 1 * gib / (8 * kib)},
	} {
		i := int64(0) // kept across -count runs: every write lands in fresh sectors
		b.Run(c.name, func(b *testing.B) {
			im, err := Open(c.path, OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer im.Close()
			b.SetBytes(4 * kib)
			for b.Loop() {
				if i >= c.limit {
					b.Fatal("benchmark ran past its fresh range")
				}
				if _, err := im.WriteAt(buf, c.off(i)); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
	// Parallel writers (group commit): each case's offsets continue across
	// runs, in a range of the child apart from the sequential cases' (1..32
	// GiB and the first GiB). wholeblock: writes covering a fresh block
	// (NOT_PRESENT → FULLY_PRESENT, no bitmap), as a guest copying large
	// files into a checkpoint issues them.
	for _, c := range []struct {
		name  string
		off   func(i int64) int64
		limit int64
		size  int
		zero  bool // discard the range first: its blocks are ZERO
	}{
		{"child/newblock", func(i int64) int64 { return 32*gib + i*mib }, 12 * gib / mib, 4 * kib, false},
		{"child/wholeblock", func(i int64) int64 { return 44*gib + i*mib }, 12 * gib / mib, mib, false},
		{"child/partialblock", func(i int64) int64 { return 56*gib + 8*kib*(i%128) + (i/128)*mib }, 8 * gib / (8 * kib), 4 * kib, false},
		// zeroblock: 4 KiB writes into blocks the child discarded (ZERO:
		// they read as zeros, not the parent), each making its block
		// FULLY_PRESENT, as a guest writing after a trim does.
		{"child/zeroblock", func(i int64) int64 { return 1*gib + i*mib }, 31 * gib / mib, 4 * kib, true},
	} {
		var next atomic.Int64
		if c.zero {
			next.Store(c.limit / 2) // apart from the sequential child/newblock case's writes
		}
		for _, g := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("%s/G=%d", c.name, g), func(b *testing.B) {
				benchChildParallel(b, paths, g, c.off, &next, c.limit, c.size, c.zero)
			})
		}
	}
}

// benchChildParallel: G goroutines issue 4 KiB first writes into a child
// on the real disk (parallel variants of BenchmarkChildFirstWrite; fresh
// blocks, or fresh sectors of blocks the child holds partially; size bytes
// each; zero: into blocks discarded first), and it reports the fdatasyncs per write that reached the file, as
// BenchmarkAllocatingWrites does for a base image.
func benchChildParallel(b *testing.B, paths []string, goroutines int, off func(i int64) int64, next *atomic.Int64, limit int64, size int, zero bool) {
	parent, err := Open(paths[0], OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(paths[1], os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	cs := &syncCountingStorage{osStorage: osStorage{f}}
	im, err := openStorageWithParent(cs, OpenOptions{NoLock: true}, parent)
	if err != nil {
		b.Fatal(err)
	}
	defer im.Close()
	if first := off(next.Load()); zero {
		if err := im.Discard(first, off(limit)-first); err != nil {
			b.Fatal(err)
		}
	}
	if size > int(im.BlockSize()) || size == mib && im.BlockSize() != mib {
		b.Fatalf("writes of %d bytes are not what the case means in the child's %d-byte blocks", size, im.BlockSize())
	}
	buf := pattern(2, size)
	if _, err := im.WriteAt(buf, off(next.Add(1)-1)); err != nil { // the session's header updates
		b.Fatal(err)
	}
	syncs0 := cs.syncs.Load()
	b.SetBytes(int64(size))
	b.ResetTimer()
	var done atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done.Add(1) <= int64(b.N) {
				i := next.Add(1) - 1
				if i >= limit {
					failed.Store(fmt.Errorf("benchmark ran past its fresh range"))
					return
				}
				if _, err := im.WriteAt(buf, off(i)); err != nil {
					failed.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(cs.syncs.Load()-syncs0)/float64(b.N), "syncs/write")
}

// BenchmarkChainWalk4K is BenchmarkChainRead4K on in-memory storage over a
// cache-resident 256 KiB: no system call or cache miss hides the cost of
// walking the layers, so the difference between flat and depth=8 is the
// chain's own CPU cost (on a loaded machine the file-backed figures are
// dominated by pread noise).
func BenchmarkChainWalk4K(b *testing.B) {
	base := newMemStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: 64 * gib, BlockSize: mib}); err != nil {
		b.Fatal(err)
	}
	im, err := OpenStorage(base, OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(1, 64*mib), 0); err != nil {
		b.Fatal(err)
	}
	im.Close()
	// layers[i] is an open chain of depth i over base.
	open := func(depth int) *Image {
		top, err := OpenStorage(newMemStorage(base.bytes()), OpenOptions{ReadOnly: true})
		if err != nil {
			b.Fatal(err)
		}
		for range depth {
			pl, err := newParentLocator("/c.avhdx", "/p.vhdx", top.l.hdr.dataWriteGUID)
			if err != nil {
				b.Fatal(err)
			}
			cs := newMemStorage(nil)
			if err := createStorage(cs, CreateOptions{}, &childSpec{parent: top, locator: pl}); err != nil {
				b.Fatal(err)
			}
			if top, err = openStorageWithParent(cs, OpenOptions{ReadOnly: true}, top); err != nil {
				b.Fatal(err)
			}
		}
		return top
	}
	for _, depth := range []int{0, 8} {
		name := "flat"
		if depth > 0 {
			name = fmt.Sprintf("depth=%d", depth)
		}
		b.Run(name, func(b *testing.B) {
			im := open(depth)
			defer im.Close()
			buf := make([]byte, 4*kib)
			b.SetBytes(4 * kib)
			b.ReportAllocs()
			x := uint64(1)
			for b.Loop() {
				x = x*6364136223846793005 + 1442695040888963407
				off := int64(x>>40) % 64 * 4 * kib // 256 KiB: the copy stays in cache
				if _, err := im.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
