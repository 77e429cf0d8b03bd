package blk

// Interval statistics: what happened between two snapshots.
//
// The daemon keeps only cumulative counters; a client that wants per-
// interval numbers (ctl stats --watch) takes two snapshots with their
// histograms and subtracts. Histogram buckets subtract exactly, so the
// percentiles of an interval are those of the requests in it, not of all
// requests since the start. The histogram travels sparse (non-empty
// buckets only): a few dozen pairs per request type instead of NumBuckets.

// Bucket is one non-empty latency bucket in a snapshot: its index (see
// BucketBounds) and its (weighted) request count.
type Bucket [2]uint64

// IncludeBuckets fills Buckets of every request type of q from its
// histogram, for a reply a client will subtract (Interval).
func (q *QueueSnapshot) IncludeBuckets() {
	for name, o := range q.Ops {
		o.Buckets = []Bucket{}
		for b, v := range o.hist {
			if v != 0 {
				o.Buckets = append(o.Buckets, Bucket{uint64(b), v})
			}
		}
		q.Ops[name] = o
	}
}

// Interval returns cur minus prev: the requests, bytes, errors and flushes
// between the two snapshots of one queue (or of the total), with the
// percentiles of the interval's latencies computed from both snapshots'
// Buckets (without them the percentiles are 0). A counter lower in cur
// than in prev (the daemon restarted) counts from zero. Bucket indices
// come from the peer: out-of-range ones are ignored.
func Interval(cur, prev QueueSnapshot) QueueSnapshot {
	out := QueueSnapshot{Queue: cur.Queue, Flushes: sub(cur.Flushes, prev.Flushes)}
	var ops [NumOps]OpSnapshot
	var seen [NumOps]bool
	for o := Op(0); o < NumOps; o++ {
		c, ok := cur.Ops[o.String()]
		if !ok {
			continue
		}
		p := prev.Ops[o.String()]
		s := &ops[o]
		s.Ops, s.Bytes, s.Errors = sub(c.Ops, p.Ops), sub(c.Bytes, p.Bytes), sub(c.Errors, p.Errors)
		var ph [NumBuckets]uint64
		fillHist(&ph, p.Buckets)
		fillHist(&s.hist, c.Buckets)
		for b := range s.hist {
			s.hist[b] = sub(s.hist[b], ph[b])
		}
		seen[o] = s.Ops != 0
	}
	out.Ops = finish(&ops)
	// finish keeps only types with a timed request; an interval whose
	// requests of a type were all untimed still reports their counts.
	for o := Op(0); o < NumOps; o++ {
		if _, ok := out.Ops[o.String()]; seen[o] && !ok {
			out.Ops[o.String()] = ops[o]
		}
	}
	return out
}

func fillHist(h *[NumBuckets]uint64, bs []Bucket) {
	for _, b := range bs {
		if b[0] < NumBuckets {
			h[b[0]] += b[1]
		}
	}
}

// sub is a - b, or a when b is larger (a counter that restarted).
func sub(a, b uint64) uint64 {
	if b > a {
		return a
	}
	return a - b
}
