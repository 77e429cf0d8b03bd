package blk

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Request statistics.
//
// A Stats holds one QueueStats per queue, each allocated when its queue's
// handler first counts into it, so an offered queue the front-end never
// starts costs one nil pointer. A handler adds to its own queue's counters
// with atomic adds (no lock, no allocation per request, no cache line
// shared with another queue); readers (Snapshot, from any goroutine) load
// the same atomics, so a snapshot taken while requests run is a set of
// counters each exact at some instant during the call, not one instant
// for all.
//
// Ops, bytes and errors count every request. Latency is timed for a
// sample of the fast requests and for every slow one, each timed request
// weighted by the requests it stands for (statsample.go), so the
// histogram sums to about the request count and its percentiles estimate
// those of every request.

// Op indexes statistics by request type.
type Op int

// Request types as counted; OpOther is an unknown type or a request whose
// header did not parse.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpGetID
	OpDiscard
	OpWriteZeroes
	OpOther
	NumOps
)

var opNames = [NumOps]string{"read", "write", "flush", "get-id", "discard", "write-zeroes", "other"}

func (o Op) String() string {
	if o < 0 || o >= NumOps {
		return "invalid"
	}
	return opNames[o]
}

func opOf(typ uint32) Op {
	switch typ {
	case TypeIn:
		return OpRead
	case TypeOut:
		return OpWrite
	case TypeFlush:
		return OpFlush
	case TypeGetID:
		return OpGetID
	case TypeDiscard:
		return OpDiscard
	case TypeWriteZeroes:
		return OpWriteZeroes
	}
	return OpOther
}

// Latency histogram: a fixed log-linear scale over nanoseconds. Values
// below 8 ns have a bucket each; above, every power of two is split into
// four buckets, so a bucket's width is at most a quarter of its lower
// bound (a percentile read from it is within 25%). NumBuckets covers up to
// 2^64 ns.
const (
	subBits    = 2
	subCount   = 1 << subBits
	linearMax  = 2 * subCount // 8: values below have their own bucket
	NumBuckets = linearMax + (64-subBits-1)*subCount
)

// bucketOf maps a latency in ns to its bucket.
func bucketOf(ns uint64) int {
	if ns < linearMax {
		return int(ns)
	}
	e := bits.Len64(ns) // >= 4
	sub := int(ns>>(e-1-subBits)) & (subCount - 1)
	return linearMax + (e-subBits-2)*subCount + sub
}

// BucketBounds returns the smallest and largest latency in ns that fall
// in bucket i.
func BucketBounds(i int) (lo, hi uint64) {
	if i < linearMax {
		return uint64(i), uint64(i)
	}
	e := (i-linearMax)/subCount + subBits + 2
	sub := uint64((i - linearMax) % subCount)
	shift := uint(e - 1 - subBits)
	lo = (subCount + sub) << shift
	return lo, lo + (1 << shift) - 1
}

// opCounters are one request type's counters on one queue.
type opCounters struct {
	ops, bytes, errors atomic.Uint64
	lat                [NumBuckets]atomic.Uint64
}

// QueueStats are one queue's counters. The zero value is ready; methods
// on a nil *QueueStats do nothing.
type QueueStats struct {
	ops     [NumOps]opCounters
	flushes atomic.Uint64 // Disk.Flush calls: FLUSH requests and write-through
}

// record counts one request; weight is the number of requests its latency
// d stands for (statsample.go), 0 when it was not timed.
func (q *QueueStats) record(op Op, n uint64, failed bool, weight uint64, d time.Duration) {
	c := &q.ops[op]
	c.ops.Add(1)
	if failed {
		c.errors.Add(1)
	} else {
		c.bytes.Add(n)
	}
	if weight == 0 {
		return
	}
	ns := uint64(0)
	if d > 0 {
		ns = uint64(d)
	}
	c.lat[bucketOf(ns)].Add(weight)
}

// Stats are a device's request statistics, one QueueStats per queue.
type Stats struct {
	queues []atomic.Pointer[QueueStats]
}

// NewStats returns statistics for n queues.
func NewStats(n int) *Stats {
	return &Stats{queues: make([]atomic.Pointer[QueueStats], max(n, 0))}
}

// Queue returns queue i's counters, creating them on first use; nil for a
// nil Stats or i out of range (the handler then counts nothing).
func (s *Stats) Queue(i int) *QueueStats {
	if s == nil || i < 0 || i >= len(s.queues) {
		return nil
	}
	if q := s.queues[i].Load(); q != nil {
		return q
	}
	s.queues[i].CompareAndSwap(nil, new(QueueStats))
	return s.queues[i].Load()
}

// OpSnapshot is one request type's counters and latency percentiles (ns;
// the upper bound of the bucket holding the percentile, 0 when no
// request was counted).
type OpSnapshot struct {
	Ops    uint64 `json:"ops"`
	Bytes  uint64 `json:"bytes"`
	Errors uint64 `json:"errors"`
	P50    uint64 `json:"p50_ns"`
	P90    uint64 `json:"p90_ns"`
	P99    uint64 `json:"p99_ns"`
	P999   uint64 `json:"p99_9_ns"`
	Max    uint64 `json:"max_ns"` // upper bound of the highest bucket used
	// Buckets is the latency histogram, sparse, when asked for
	// (QueueSnapshot.IncludeBuckets; statsinterval.go).
	Buckets []Bucket `json:"buckets,omitempty"`

	hist [NumBuckets]uint64
}

// QueueSnapshot is one queue's counters (Queue -1 for the total).
type QueueSnapshot struct {
	Queue   int                   `json:"queue"`
	Flushes uint64                `json:"flushes"`
	Ops     map[string]OpSnapshot `json:"ops"` // by Op.String()
}

// Snapshot returns the counters of every queue that counted anything, in
// queue order, and their total.
func (s *Stats) Snapshot() (queues []QueueSnapshot, total QueueSnapshot) {
	var tot [NumOps]OpSnapshot
	total.Queue = -1
	if s == nil {
		total.Ops = finish(&tot)
		return nil, total
	}
	for i := range s.queues {
		q := s.queues[i].Load()
		if q == nil {
			continue
		}
		var ops [NumOps]OpSnapshot
		for o := range ops {
			c := &q.ops[o]
			ops[o].Ops, ops[o].Bytes, ops[o].Errors = c.ops.Load(), c.bytes.Load(), c.errors.Load()
			tot[o].Ops += ops[o].Ops
			tot[o].Bytes += ops[o].Bytes
			tot[o].Errors += ops[o].Errors
			for b := range c.lat {
				v := c.lat[b].Load()
				ops[o].hist[b] = v
				tot[o].hist[b] += v
			}
		}
		f := q.flushes.Load()
		total.Flushes += f
		queues = append(queues, QueueSnapshot{Queue: i, Flushes: f, Ops: finish(&ops)})
	}
	total.Ops = finish(&tot)
	return queues, total
}

// finish computes percentiles and keeps only types that were counted.
func finish(ops *[NumOps]OpSnapshot) map[string]OpSnapshot {
	m := make(map[string]OpSnapshot)
	for o := range ops {
		s := &ops[o]
		var n uint64
		for _, v := range s.hist {
			n += v
		}
		if n == 0 {
			continue
		}
		s.P50, s.P90, s.P99, s.P999 = percentile(&s.hist, n, 500), percentile(&s.hist, n, 900), percentile(&s.hist, n, 990), percentile(&s.hist, n, 999)
		for b := NumBuckets - 1; b >= 0; b-- {
			if s.hist[b] != 0 {
				_, s.Max = BucketBounds(b)
				break
			}
		}
		m[Op(o).String()] = *s
	}
	return m
}

// percentile returns the upper bound of the bucket holding the
// permille-th value of n.
func percentile(h *[NumBuckets]uint64, n uint64, permille uint64) uint64 {
	rank := (n*permille + 999) / 1000 // 1-based, rounded up
	if rank == 0 {
		rank = 1
	}
	var seen uint64
	for b, v := range h {
		seen += v
		if seen >= rank {
			_, hi := BucketBounds(b)
			return hi
		}
	}
	return 0
}

// countingDiscarder and countingZeroer add the bytes of each range they
// pass on to the handler's byte count for the request.
type countingDiscarder struct {
	d Discarder
	n *uint64
}

func (c countingDiscarder) Discard(off, n int64) error {
	*c.n += uint64(n)
	return c.d.Discard(off, n)
}

type countingZeroer struct {
	z WriteZeroer
	n *uint64
}

func (c countingZeroer) WriteZeroes(off, n int64, unmap bool) error {
	*c.n += uint64(n)
	return c.z.WriteZeroes(off, n, unmap)
}

// CountInto makes the handler count every request into q (nil: stop
// counting). Call it before the first Handle.
func (h *Handler) CountInto(q *QueueStats) {
	h.stats = q
	if q == nil {
		return
	}
	if h.discard != nil {
		h.discard = countingDiscarder{h.discard, &h.reqBytes}
	}
	if h.zeroes != nil {
		h.zeroes = countingZeroer{h.zeroes, &h.reqBytes}
	}
}

func (q *QueueStats) countFlush() {
	if q != nil {
		q.flushes.Add(1)
	}
}
