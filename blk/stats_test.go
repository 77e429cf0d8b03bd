package blk

import (
	"sync"
	"testing"
)

func TestStatsCountEveryRequestByTypeWithBytesAndErrors(t *testing.T) {
	d := newMemDisk(testDiskSize, 512)
	td := &trimDisk{memDisk: d}
	st := NewStats(4)
	h := NewHandler(td, Options{Serial: "serial", Cache: new(WriteCache)})
	h.CountInto(st.Queue(2))
	status := [][]byte{make([]byte, 1)}
	run := func(readable, writable [][]byte) {
		t.Helper()
		h.Handle(readable, writable)
	}
	run([][]byte{hdr(TypeIn, 0)}, [][]byte{make([]byte, 4096), make([]byte, 1)})
	run([][]byte{hdr(TypeIn, 8)}, [][]byte{make([]byte, 512), make([]byte, 1)})
	run([][]byte{cat(hdr(TypeOut, 0), pattern(1024, 3))}, status)
	run([][]byte{hdr(TypeOut, 1<<40), pattern(512, 1)}, status) // out of range: an error
	run([][]byte{hdr(TypeFlush, 0)}, status)
	run([][]byte{hdr(TypeGetID, 0)}, [][]byte{make([]byte, 20), make([]byte, 1)})
	run([][]byte{hdr(TypeDiscard, 0), seg(8, 16, 0)}, status)
	run([][]byte{hdr(TypeWriteZeroes, 0), seg(0, 2, 0)}, status)
	run([][]byte{hdr(99, 0)}, status)
	h.opts.Cache.SetWriteThrough(true)
	run([][]byte{cat(hdr(TypeOut, 0), pattern(512, 3))}, status) // write-through: one more flush

	queues, total := st.Snapshot()
	if len(queues) != 1 || queues[0].Queue != 2 {
		t.Fatalf("queues %+v, want only queue 2", queues)
	}
	want := map[string]struct{ ops, bytes, errors uint64 }{
		"read":         {2, 4096 + 512, 0},
		"write":        {3, 1024 + 512, 1},
		"flush":        {1, 0, 0},
		"get-id":       {1, 20, 0},
		"discard":      {1, 16 * 512, 0},
		"write-zeroes": {1, 2 * 512, 0},
		"other":        {1, 0, 1},
	}
	for _, snap := range []QueueSnapshot{queues[0], total} {
		if len(snap.Ops) != len(want) {
			t.Errorf("queue %d: types %v, want %d types", snap.Queue, snap.Ops, len(want))
		}
		for name, w := range want {
			got := snap.Ops[name]
			if got.Ops != w.ops || got.Bytes != w.bytes || got.Errors != w.errors {
				t.Errorf("queue %d %s: ops %d bytes %d errors %d, want %d %d %d", snap.Queue, name, got.Ops, got.Bytes, got.Errors, w.ops, w.bytes, w.errors)
			}
			if got.P50 == 0 || got.P50 > got.P99 || got.P99 > got.Max {
				t.Errorf("queue %d %s: percentiles p50 %d p99 %d max %d not ordered", snap.Queue, name, got.P50, got.P99, got.Max)
			}
		}
		if snap.Flushes != 2 {
			t.Errorf("queue %d: %d flushes, want 2 (FLUSH and one write-through)", snap.Queue, snap.Flushes)
		}
	}
}

func TestLatencyBucketsCoverEveryValueInOrder(t *testing.T) {
	prevHi := uint64(0)
	for i := 0; i < NumBuckets; i++ {
		lo, hi := BucketBounds(i)
		if i > 0 && lo != prevHi+1 {
			t.Fatalf("bucket %d starts at %d, previous ended at %d", i, lo, prevHi)
		}
		if hi < lo || (lo >= 8 && (hi-lo+1)*4 > lo) {
			t.Fatalf("bucket %d [%d, %d] wider than a quarter of its start", i, lo, hi)
		}
		for _, v := range []uint64{lo, hi, lo + (hi-lo)/2} {
			if b := bucketOf(v); b != i {
				t.Fatalf("bucketOf(%d) = %d, want %d", v, b, i)
			}
		}
		prevHi = hi
	}
	if prevHi != ^uint64(0) {
		t.Errorf("last bucket ends at %d, want 2^64-1", prevHi)
	}
}

func TestPercentilesComeFromTheHistogram(t *testing.T) {
	var h [NumBuckets]uint64
	// 900 requests at 1000 ns, 90 at 100 µs, 10 at 10 ms.
	h[bucketOf(1000)] = 900
	h[bucketOf(100_000)] = 90
	h[bucketOf(10_000_000)] = 10
	for _, tc := range []struct {
		permille uint64
		around   uint64
	}{{500, 1000}, {900, 1000}, {990, 100_000}, {999, 10_000_000}} {
		got := percentile(&h, 1000, tc.permille)
		if got < tc.around || got > tc.around+tc.around/4 {
			t.Errorf("p%d = %d, want the bucket of %d", tc.permille, got, tc.around)
		}
	}
}

func TestStatsSnapshotWhileQueuesCount(t *testing.T) {
	st := NewStats(3)
	var wg sync.WaitGroup
	const n = 2000
	for q := 0; q < 3; q++ {
		wg.Add(1)
		go func(q int) {
			defer wg.Done()
			h := NewHandler(newMemDisk(testDiskSize, 512), Options{})
			h.CountInto(st.Queue(q))
			w := [][]byte{make([]byte, 512), make([]byte, 1)}
			for i := 0; i < n; i++ {
				h.Handle([][]byte{hdr(TypeIn, 0)}, w)
			}
		}(q)
	}
	var last uint64
	for done := false; !done; {
		_, total := st.Snapshot()
		got := total.Ops["read"].Ops
		if got < last {
			t.Fatalf("total went back from %d to %d", last, got)
		}
		last = got
		done = got == 3*n
	}
	wg.Wait()
}

func TestCountingHandlerDoesNotAllocate(t *testing.T) {
	d := newMemDisk(testDiskSize, 512)
	h := NewHandler(&trimDisk{memDisk: d}, Options{})
	h.CountInto(NewStats(1).Queue(0))
	in := [][]byte{hdr(TypeIn, 8)}
	w := [][]byte{make([]byte, 4096), make([]byte, 1)}
	h.Handle(in, w)
	if a := testing.AllocsPerRun(100, func() { h.Handle(in, w) }); a != 0 {
		t.Errorf("%v allocations per counted Handle", a)
	}
}

// BenchmarkHandleRead4KCounted is BenchmarkHandleRead4K with statistics:
// the difference is the cost of counting (two clock reads, four atomic
// adds).
func BenchmarkHandleRead4KCounted(b *testing.B) {
	d := newMemDisk(1<<20, 512)
	h := NewHandler(d, Options{})
	h.CountInto(NewStats(1).Queue(0))
	readable := [][]byte{hdr(TypeIn, 64)}
	writable := [][]byte{make([]byte, 4096), make([]byte, 1)}
	b.ReportAllocs()
	b.SetBytes(4096)
	for b.Loop() {
		if h.Handle(readable, writable) != 4097 {
			b.Fatal(h.Err())
		}
	}
}
