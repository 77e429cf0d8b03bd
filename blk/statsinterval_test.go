package blk

import (
	"encoding/json"
	"testing"
)

// roundTrip is a snapshot with its buckets as a client receives it.
func roundTrip(t testing.TB, q QueueSnapshot) QueueSnapshot {
	t.Helper()
	q.IncludeBuckets()
	b, err := json.Marshal(q)
	if err != nil {
		t.Fatal(err)
	}
	var out QueueSnapshot
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestIntervalPercentilesAreThoseOfTheIntervalNotSinceStart(t *testing.T) {
	d := &slowSectorDisk{memDisk: newMemDisk(testDiskSize, 512), slowAt: 16, slowFor: 2 * slowNS}
	h := NewHandler(d, Options{})
	st := NewStats(1)
	h.CountInto(st.Queue(0))
	w := [][]byte{make([]byte, 512), make([]byte, 1)}
	for i := 0; i < 2000; i++ {
		h.Handle([][]byte{hdr(TypeIn, 0)}, w)
	}
	h.Handle([][]byte{hdr(TypeFlush, 0)}, [][]byte{make([]byte, 1)})
	_, t0 := st.Snapshot()
	prev := roundTrip(t, t0)
	for i := 0; i < 40; i++ {
		h.Handle([][]byte{hdr(TypeIn, 16)}, w)
	}
	_, t1 := st.Snapshot()
	cur := roundTrip(t, t1)

	if t1.Ops["read"].P50 >= uint64(slowNS) {
		t.Fatalf("cumulative read p50 %d: the fast reads should dominate it", t1.Ops["read"].P50)
	}
	iv := Interval(cur, prev)
	r := iv.Ops["read"]
	if r.Ops != 40 || r.Bytes != 40*512 || r.Errors != 0 {
		t.Errorf("interval reads: ops %d bytes %d errors %d, want 40 %d 0", r.Ops, r.Bytes, r.Errors, 40*512)
	}
	if r.P50 < uint64(slowNS) || r.P99 < r.P50 {
		t.Errorf("interval read p50 %d p99 %d, want both at least %d (only slow reads in it)", r.P50, r.P99, slowNS)
	}
	if _, ok := iv.Ops["flush"]; ok {
		t.Errorf("interval reports %v flushes, there were none in it", iv.Ops["flush"])
	}
	// Without buckets (an older daemon) the counts still subtract.
	t1.Ops["read"] = OpSnapshot{Ops: t1.Ops["read"].Ops}
	if got := Interval(t1, t0).Ops["read"]; got.Ops != 40 || got.P50 != 0 {
		t.Errorf("interval without buckets: %+v, want 40 ops and no percentiles", got)
	}
}

func TestIntervalOfARestartedCounterCountsFromZero(t *testing.T) {
	prev := QueueSnapshot{Flushes: 9, Ops: map[string]OpSnapshot{"write": {Ops: 100, Bytes: 1 << 20, Buckets: []Bucket{{40, 100}}}}}
	cur := QueueSnapshot{Flushes: 2, Ops: map[string]OpSnapshot{"write": {Ops: 3, Bytes: 1536, Buckets: []Bucket{{40, 3}, {NumBuckets, 7}, {^uint64(0), 1}}}}}
	iv := Interval(cur, prev)
	w := iv.Ops["write"]
	if iv.Flushes != 2 || w.Ops != 3 || w.Bytes != 1536 {
		t.Errorf("interval after restart: flushes %d, write %+v", iv.Flushes, w)
	}
	if _, hi := BucketBounds(40); w.P50 != hi || w.Max != hi {
		t.Errorf("p50 %d max %d, want bucket 40's bound %d (out-of-range buckets ignored)", w.P50, w.Max, hi)
	}
}

// FuzzIntervalOfPeerSnapshots: snapshots decoded from a peer never make
// Interval panic, and its percentiles stay ordered.
func FuzzIntervalOfPeerSnapshots(f *testing.F) {
	f.Add([]byte(`{"ops":{"read":{"ops":5,"buckets":[[40,5]]}}}`), []byte(`{"ops":{"read":{"ops":2,"buckets":[[40,1],[300,1]]}}}`))
	f.Add([]byte(`{"flushes":1}`), []byte(`{"ops":{"other":{"buckets":[[18446744073709551615,1]]}}}`))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		var cur, prev QueueSnapshot
		if json.Unmarshal(a, &cur) != nil || json.Unmarshal(b, &prev) != nil {
			return
		}
		for name, o := range Interval(cur, prev).Ops {
			if o.P50 > o.P90 || o.P90 > o.P99 || o.P99 > o.P999 || o.P999 > o.Max {
				t.Fatalf("%s: percentiles out of order: %+v", name, o)
			}
		}
	})
}
