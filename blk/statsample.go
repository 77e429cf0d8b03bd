package blk

import (
	"encoding/binary"
	"sync/atomic"
	"time"
)

// Latency sampling: which requests a counting Handler times.
//
// Every request is counted exactly (ops, bytes, errors); only its latency
// may be left out. Timing a request costs two clock reads, and with a 4K
// read from the page cache taking well under a microsecond that was most
// of the cost of counting (BenchmarkHandleRead4KCounted). The choices:
//
//   - Reusing the previous completion's timestamp as the next start needs
//     requests that run back to back: it would charge the idle time
//     between two batches to the first request of the next one, and with
//     requests completing out of order inside a queue there is no
//     "previous" at all.
//   - CLOCK_MONOTONIC_COARSE ticks every 1-4 ms, coarser than the
//     latencies the histogram is for (µs); and unix.ClockGettime is a real
//     system call (about 250 ns here), dearer than the vDSO clock Go uses.
//   - Sampling, chosen: a fast request is timed about one time in
//     sampleEvery, at a random distance from the previous timed one so a
//     periodic workload (a FLUSH every 16 writes) cannot alias with it, and
//     its histogram bucket gets the weight of the requests it stands for,
//     so the histogram still sums to the request count and its
//     percentiles are estimates of all requests, not of the timed ones. A
//     request that took slowNS or more is followed by a timed one: where
//     requests are slow (a flush, an allocating write, a cold read) two
//     clock reads are noise, every one is timed, and a low request rate
//     still gives per-interval percentiles. Each request type samples on
//     its own, so a rare type is not drowned by a frequent one.
//
// The clock is the runtime's monotonic one read through time.Since of a
// fixed instant: one vDSO call, where time.Now reads the wall clock too.
const (
	sampleEvery = 16
	slowNS      = 16 * time.Microsecond // two clock reads are under 0.5% of it
)

// epoch is the fixed instant monotonic measures from.
var epoch = time.Now()

// monotonic reads the monotonic clock (relative to epoch).
func monotonic() time.Duration { return time.Since(epoch) }

// sampler decides which requests are timed, per request type. One per
// Handler; not safe for concurrent use (a Handler is not).
type sampler struct {
	left   [NumOps]uint32 // requests of the type to skip before the next timed one
	weight [NumOps]uint32 // requests the next timed one stands for; 0 reads as 1
	rng    uint32         // xorshift32 state, never 0
}

// seeds differ per Handler so that queues do not sample in step.
var seeds atomic.Uint32

// take reports the weight of the coming request of slot's type if it is
// to be timed, and 0 if not.
func (s *sampler) take(slot Op) uint64 {
	if s.left[slot] > 0 {
		s.left[slot]--
		return 0
	}
	return uint64(max(s.weight[slot], 1))
}

// timed picks the next request of slot's type to time, given that this
// one took d.
func (s *sampler) timed(slot Op, d time.Duration) {
	gap := uint32(1)
	if d < slowNS {
		gap = 1 + s.next()%(2*sampleEvery-1) // 1..2N-1: N on average
	}
	s.left[slot], s.weight[slot] = gap-1, gap
}

// next is one step of Marsaglia's xorshift32: no statistical strength is
// needed, only spacing that does not repeat with a short period.
func (s *sampler) next() uint32 {
	x := s.rng
	if x == 0 {
		x = 0x9e3779b9 ^ seeds.Add(0x6a09e667)
		if x == 0 {
			x = 1
		}
	}
	x ^= x << 13
	x ^= x >> 17
	x ^= x << 5
	s.rng = x
	return x
}

// peekOp reads the request type from the header for the sampling
// decision, before execute parses the request properly. A header split
// before its type field samples as OpOther; the request is still counted
// under the type execute finds.
func peekOp(readable [][]byte) Op {
	if len(readable) == 0 || len(readable[0]) < hdrType+4 {
		return OpOther
	}
	return opOf(binary.LittleEndian.Uint32(readable[0][hdrType:]))
}
