package loadgen

import (
	"math/bits"
	"time"
)

// Histogram is a fixed-bucket log-linear latency histogram: values below
// 2^subBits ns are exact, above that each power of two is split into
// 2^subBits equal buckets, so a reported percentile is within 1/2^subBits
// (about 3 %) of the true value. Record never allocates.
type Histogram struct {
	counts [numBuckets]uint64
	n      uint64
	sum    uint64
	max    uint64
}

const (
	subBits    = 5
	subCount   = 1 << subBits
	numBuckets = (64 - subBits + 1) * subCount
)

func bucketOf(v uint64) int {
	if v < subCount {
		return int(v)
	}
	e := bits.Len64(v) - 1 // ≥ subBits
	sub := (v >> uint(e-subBits)) & (subCount - 1)
	return (e-subBits+1)*subCount + int(sub)
}

// bucketRange returns the smallest value of bucket i and its width.
func bucketRange(i int) (low, width uint64) {
	if i < subCount {
		return uint64(i), 1
	}
	e := i/subCount + subBits - 1
	sub := uint64(i % subCount)
	return (subCount + sub) << uint(e-subBits), 1 << uint(e-subBits)
}

// Record adds one latency of ns nanoseconds.
func (h *Histogram) Record(ns uint64) {
	h.counts[bucketOf(ns)]++
	h.n++
	h.sum += ns
	if ns > h.max {
		h.max = ns
	}
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	h.max = max(h.max, o.max)
}

// Count is the number of samples.
func (h *Histogram) Count() uint64 { return h.n }

// Max is the largest sample, exactly.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean is the average sample, exactly.
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / h.n)
}

// Percentile returns the value below or at which a fraction p (0..1) of
// the samples lie: the middle of the bucket holding the ceil(p·n)-th
// sample, never more than Max.
func (h *Histogram) Percentile(p float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(p*float64(h.n) + 0.999999)
	rank = min(max(rank, 1), h.n)
	var cum uint64
	for i, c := range h.counts {
		cum += c
		if cum >= rank {
			low, w := bucketRange(i)
			return time.Duration(min(low+w/2, h.max))
		}
	}
	return time.Duration(h.max)
}
