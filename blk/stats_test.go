package blk

import (
	"sync"
	"testing"
	"time"
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
// the difference is the cost of counting (two atomic adds per request, and
// two clock reads and one more add for the one in about sampleEvery whose
// latency is timed).
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

// slowSectorDisk takes at least slowFor on every read that starts at
// sector slowAt.
type slowSectorDisk struct {
	*memDisk
	slowAt  int64
	slowFor time.Duration
}

func (d *slowSectorDisk) ReadVec(bufs [][]byte, off int64) error {
	if off == d.slowAt*SectorSize {
		time.Sleep(d.slowFor)
	}
	return d.memDisk.ReadVec(bufs, off)
}

// histSum is the weighted request count the histogram of one type holds,
// and the part of it at or above ns.
func histSum(t *testing.T, q *QueueStats, op Op, ns uint64) (all, above uint64) {
	t.Helper()
	for b := range q.ops[op].lat {
		v := q.ops[op].lat[b].Load()
		all += v
		if lo, _ := BucketBounds(b); lo >= ns {
			above += v
		}
	}
	return all, above
}

func TestSampledLatencyKeepsCountsExactAndTimesFewFastRequests(t *testing.T) {
	h := NewHandler(newMemDisk(testDiskSize, 512), Options{})
	q := NewStats(1).Queue(0)
	h.CountInto(q)
	const n = 16000
	timed := 0
	w := [][]byte{make([]byte, 4096), make([]byte, 1)}
	for i := 0; i < n; i++ {
		if h.sampler.left[OpRead] == 0 {
			timed++
		}
		h.Handle([][]byte{hdr(TypeIn, 8)}, w)
	}
	if got := q.ops[OpRead].ops.Load(); got != n {
		t.Fatalf("%d reads counted, want %d", got, n)
	}
	if got := q.ops[OpRead].bytes.Load(); got != n*4096 {
		t.Fatalf("%d bytes counted, want %d", got, n*4096)
	}
	// Fast requests are timed about one in sampleEvery; a loaded machine
	// makes some slow, and each of those is followed by a timed one
	// (TestSamplerTimesOneFastRequestInAboutSampleEvery has the exact
	// rate).
	if timed > n/4 || timed < n/sampleEvery/2 {
		t.Errorf("%d of %d requests timed, want about %d", timed, n, n/sampleEvery)
	}
	// Each timed one stands for the requests since the previous one: the
	// histogram sums to the requests up to the last timed one.
	all, _ := histSum(t, q, OpRead, 0)
	if all > n || all < n-2*sampleEvery {
		t.Errorf("histogram holds %d requests, want %d less at most %d not yet stood for", all, n, 2*sampleEvery)
	}
}

func TestSamplerTimesOneFastRequestInAboutSampleEvery(t *testing.T) {
	var s sampler
	const n = 32000
	timed, weights := 0, uint64(0)
	var gaps [2 * sampleEvery]int
	last := 0
	for i := 0; i < n; i++ {
		for _, op := range []Op{OpRead, OpWrite} { // types sample apart
			w := s.take(op)
			if w == 0 {
				continue
			}
			if op == OpRead {
				timed++
				weights += w
				if timed > 1 {
					gaps[i-last]++
				}
				last = i
			}
			s.timed(op, time.Microsecond)
		}
	}
	if timed < n/sampleEvery*9/10 || timed > n/sampleEvery*11/10 {
		t.Errorf("%d of %d fast reads timed, want about %d", timed, n, n/sampleEvery)
	}
	if weights > n || weights < n-2*sampleEvery {
		t.Errorf("timed reads weigh %d, want the %d reads less at most %d", weights, n, 2*sampleEvery)
	}
	// The distance varies over 1..2N-1, so no period of the workload
	// lines up with it.
	for g := 1; g < 2*sampleEvery; g++ {
		if gaps[g] == 0 {
			t.Errorf("no two timed reads %d apart: gaps %v", g, gaps)
			break
		}
	}
	if gaps[0] != 0 {
		t.Errorf("gaps %v", gaps)
	}
}

func TestSlowRequestsAreEveryOneTimed(t *testing.T) {
	d := &slowSectorDisk{memDisk: newMemDisk(testDiskSize, 512), slowAt: 8, slowFor: 2 * slowNS}
	h := NewHandler(d, Options{})
	q := NewStats(1).Queue(0)
	h.CountInto(q)
	const n = 50
	w := [][]byte{make([]byte, 512), make([]byte, 1)}
	for i := 0; i < n; i++ {
		h.Handle([][]byte{hdr(TypeIn, 8)}, w)
	}
	all, slow := histSum(t, q, OpRead, uint64(slowNS)*3/4)
	if all != n || slow != n {
		t.Errorf("histogram holds %d requests, %d of them slow; want all %d timed and slow", all, slow, n)
	}
	_, total := NewStats(0).Snapshot()
	if len(total.Ops) != 0 {
		t.Errorf("empty stats report %v", total.Ops)
	}
}

// A periodic workload must not alias with the sampling: with one slow read
// in every 16 a fixed one-in-16 sampler would see all slow or none. The
// weighted histogram estimates the slow share.
func TestPeriodicSlowRequestsKeepTheirShareOfTheHistogram(t *testing.T) {
	d := &slowSectorDisk{memDisk: newMemDisk(testDiskSize, 512), slowAt: 16, slowFor: 2 * slowNS}
	h := NewHandler(d, Options{})
	q := NewStats(1).Queue(0)
	h.CountInto(q)
	const period, rounds = 16, 2000
	w := [][]byte{make([]byte, 512), make([]byte, 1)}
	fast := [][]byte{hdr(TypeIn, 0)}
	slowReq := [][]byte{hdr(TypeIn, 16)}
	for r := 0; r < rounds; r++ {
		for i := 0; i < period-1; i++ {
			h.Handle(fast, w)
		}
		h.Handle(slowReq, w)
	}
	all, slow := histSum(t, q, OpRead, uint64(slowNS)*3/4)
	share := float64(slow) / float64(all)
	// True share 1/16 = 6.25%; the estimate's standard deviation here is
	// about 0.6% (some 125 slow requests among the 2000 timed, weights 1..31).
	// Fast reads the loaded machine made slow only add to it.
	if share < 0.03 || share > 0.12 {
		t.Errorf("slow requests are %.1f%% of the histogram (%d of %d), want about 6.25%%", 100*share, slow, all)
	}
}
