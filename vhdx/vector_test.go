package vhdx

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"testing"
)

// countingVec is osStorage counting its vectored calls, so tests can tell
// how many system calls a request cost.
type countingVec struct {
	osStorage
	readv, writev, reads, writes int
}

func (c *countingVec) ReadvAt(b [][]byte, off int64) (int, error) {
	c.readv++
	return c.osStorage.ReadvAt(b, off)
}

func (c *countingVec) WritevAt(b [][]byte, off int64) (int, error) {
	c.writev++
	return c.osStorage.WritevAt(b, off)
}

func (c *countingVec) ReadAt(p []byte, off int64) (int, error) {
	c.reads++
	return c.osStorage.ReadAt(p, off)
}

func (c *countingVec) WriteAt(p []byte, off int64) (int, error) {
	c.writes++
	return c.osStorage.WriteAt(p, off)
}

// openCounting opens a fresh 64 MiB image with 1 MiB blocks on a
// countingVec.
func openCounting(t testing.TB) (*Image, *countingVec) {
	t.Helper()
	p := createFile(t, CreateOptions{Size: 64 * mib, BlockSize: mib})
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := &countingVec{osStorage: osStorage{f}}
	im, err := openStorage(c, OpenOptions{}, nil)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close(); f.Close() })
	return im, c
}

// split cuts b into segments of the given sizes, cycling through them.
func split(b []byte, sizes ...int) [][]byte {
	var segs [][]byte
	for i := 0; len(b) > 0; i++ {
		n := min(sizes[i%len(sizes)], len(b))
		segs = append(segs, b[:n])
		b = b[n:]
	}
	return segs
}

// Multi-segment requests read and write exactly what byte-at-a-time
// reasoning says, across block boundaries, allocated and unallocated
// blocks and segments that do not end on sector boundaries, and a run of
// pieces back to back in the file costs one preadv/pwritev.
func TestVectoredIOMatchesTheFlatImageAndBatchesRuns(t *testing.T) {
	tests := []struct {
		name       string
		off        int64
		n          int
		sizes      []int
		wantWritev int // pwritev calls for the data, all blocks allocated
	}{
		{"sixteen pages in one block", 0, 64 * kib, []int{4 * kib}, 1},
		{"odd segments, sector-sized total", 3 * kib, 60 * kib, []int{1000, 24, 3072, 4000}, 1},
		{"across two blocks adjacent in the file", mib - 8*kib, 16 * kib, []int{4 * kib}, 1},
		{"one segment straddling blocks", mib - 2*kib, 4 * kib, []int{4 * kib}, 1},
		{"1023 segments", 0, 1023 * 512, []int{512}, 1},
		{"more segments than IOV_MAX", 0, 1500 * 512, []int{512}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			im, c := openCounting(t)
			// Allocate the blocks touched, in order, so they lie back to
			// back in the file; the request then overwrites them.
			first, last := tc.off/mib, (tc.off+int64(tc.n)-1)/mib
			for b := first; b <= last; b++ {
				if _, err := im.WriteAt(make([]byte, 512), b*mib); err != nil {
					t.Fatal(err)
				}
			}
			want := pattern(int64(tc.n), tc.n)
			c.writev, c.readv = 0, 0
			if err := im.WriteVec(split(slices.Clone(want), tc.sizes...), tc.off); err != nil {
				t.Fatal(err)
			}
			if c.writev != tc.wantWritev {
				t.Errorf("%d pwritev calls, want %d", c.writev, tc.wantWritev)
			}
			got := make([]byte, tc.n)
			if err := im.ReadVec(split(got, tc.sizes...), tc.off); err != nil {
				t.Fatal(err)
			}
			if c.readv != tc.wantWritev {
				t.Errorf("%d preadv calls, want %d", c.readv, tc.wantWritev)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("vectored read differs from what the vectored write wrote")
			}
			flat := make([]byte, tc.n)
			if _, err := im.ReadAt(flat, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(flat, want) {
				t.Fatal("ReadAt differs from what the vectored write wrote")
			}
		})
	}
}

// A vectored request over unallocated blocks allocates them piece by piece
// through the usual path, reads holes as zeros, and pieces in blocks that
// are not back to back in the file get a run each.
func TestVectoredIOAllocatesAndSplitsRunsAtFileGaps(t *testing.T) {
	im, c := openCounting(t)
	// Block 2 first, then block 1: in the file block 2 comes before 1.
	for _, b := range []int64{2, 1} {
		if _, err := im.WriteAt(make([]byte, 512), b*mib); err != nil {
			t.Fatal(err)
		}
	}
	// 8 KiB at the end of block 0 (unallocated), all of block 1, 8 KiB
	// at the start of block 2: block 0 is allocated by this write.
	off, n := int64(mib-8*kib), mib+16*kib
	want := pattern(7, n)
	c.writev, c.writes = 0, 0
	if err := im.WriteVec(split(slices.Clone(want), 4*kib), off); err != nil {
		t.Fatal(err)
	}
	// The first page of block 0 allocates it (at the end of the file);
	// then one pwritev each for the rest of block 0, for block 1, and for
	// block 2, which lies before block 1 in the file.
	if c.writev != 3 {
		t.Errorf("%d pwritev calls, want 3", c.writev)
	}
	got := make([]byte, n)
	c.readv = 0
	if err := im.ReadVec(split(got, 4*kib), off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs")
	}
	hole := pattern(1, 8*kib)
	if err := im.ReadVec(split(hole, 512), 10*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hole, make([]byte, 8*kib)) {
		t.Error("an unallocated block did not read as zeros")
	}
}

// advanceIov continues a short transfer where it stopped.
func TestAdvanceIovDropsExactlyTheTransferredBytes(t *testing.T) {
	tests := []struct {
		lens []int
		n    int
		want []int
	}{
		{[]int{4, 4, 4}, 0, []int{4, 4, 4}},
		{[]int{4, 4, 4}, 4, []int{4, 4}},
		{[]int{4, 4, 4}, 5, []int{3, 4}},
		{[]int{4, 4, 4}, 12, nil},
		{[]int{4, 0, 4}, 4, []int{4}},
	}
	for _, tc := range tests {
		var bufs [][]byte
		for _, l := range tc.lens {
			bufs = append(bufs, make([]byte, l))
		}
		var got []int
		for _, b := range advanceIov(bufs, tc.n) {
			got = append(got, len(b))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("advanceIov(%v, %d) leaves %v, want %v", tc.lens, tc.n, got, tc.want)
		}
	}
}

// A Storage without the vectored upgrade (the fault-injecting test
// storage) still sees every piece as its own WriteAt.
func TestStorageWithoutVectorsSeesEveryPiece(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 64 * mib, BlockSize: mib})
	if vectorOf(s) != nil {
		t.Fatal("memStorage claims vectored I/O")
	}
	im, err := openStorage(s, OpenOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	want := pattern(3, 16*kib)
	if err := im.WriteVec(split(slices.Clone(want), 4*kib), 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v, equal %t", err, bytes.Equal(got, want))
	}
}

// BenchmarkVectoredIO: a 128 KiB request of 4 KiB segments (32 segments,
// how Linux hands a large request to virtio-blk) into allocated blocks,
// with preadv/pwritev (vectored=true) and one pread/pwrite per segment
// (vectored=false, the fallback). Reports system calls per op.
func BenchmarkVectoredIO(b *testing.B) {
	for _, op := range []string{"read", "write"} {
		for _, vec := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/vectored=%t", op, vec), func(b *testing.B) {
				im, c := openCounting(b)
				if _, err := im.WriteAt(pattern(1, 8*mib), 0); err != nil {
					b.Fatal(err)
				}
				if !vec {
					im.s = struct{ Storage }{c} // hides the upgrade
				}
				buf := make([]byte, 128*kib)
				segs := split(buf, 4*kib)
				c.reads, c.writes, c.readv, c.writev = 0, 0, 0, 0
				b.SetBytes(int64(len(buf)))
				b.ReportAllocs()
				i := int64(0)
				for b.Loop() {
					off := (i * 128 * kib) % (8 * mib)
					var err error
					if op == "read" {
						err = im.ReadVec(segs, off)
					} else {
						err = im.WriteVec(segs, off)
					}
					if err != nil {
						b.Fatal(err)
					}
					i++
				}
				b.ReportMetric(float64(c.reads+c.writes+c.readv+c.writev)/float64(b.N), "syscalls/op")
			})
		}
	}
}

// TestVectoredIOOfManySegmentsAllocatesNothing: a 32-segment request (Linux
// guests' 128 KiB reads) reaches the file in one preadv/pwritev whose iovec
// array is pooled, so the steady state allocates nothing per request. The
// race detector's sync.Pool drops items at random, so it counts only
// without it.
func TestVectoredIOOfManySegmentsAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	im, c := openCounting(t)
	data := pattern(3, 128*kib)
	if err := im.WriteVec(split(data, 4*kib), 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	segs, wsegs := split(got, 4*kib), split(data, 4*kib)
	c.readv, c.writev = 0, 0
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"read", func() error { return im.ReadVec(segs, 0) }},
		{"write", func() error { return im.WriteVec(wsegs, 0) }},
	} {
		if err := op.do(); err != nil { // warm the pools
			t.Fatal(err)
		}
		allocs := testing.AllocsPerRun(50, func() {
			if err := op.do(); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s of 32 segments: %.1f allocations per call, want 0", op.name, allocs)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the vectored read does not return what the vectored write wrote")
	}
	if c.readv == 0 || c.writev == 0 {
		t.Fatalf("preadv %d, pwritev %d calls: the vectored path was not taken", c.readv, c.writev)
	}
}
