package virtqueue

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// Split-ring inflight region (vhost-user spec, "Inflight I/O tracking";
// vhost-user.md §1.10). One region per queue, laid out back to back in the
// shared buffer the back-end hands out with VHOST_USER_GET_INFLIGHT_FD:
//
//	struct QueueRegionSplit {          // InflightHeaderSize bytes
//	    uint64_t features;             // not used by this back-end
//	    uint16_t version;              // 0: never initialised, 1: in use
//	    uint16_t desc_num;             // queue size
//	    uint16_t last_batch_head;      // head of the last completed batch
//	    uint16_t used_idx;             // used.idx after the last batch
//	    DescStateSplit desc[desc_num]; // InflightDescSize bytes each
//	};
//	struct DescStateSplit {
//	    uint8_t  inflight;             // 1: popped, not completed
//	    uint8_t  padding[5];
//	    uint16_t next;                 // links the last batch
//	    uint64_t counter;              // pop order
//	};
//
// Fields are in the host's byte order in the spec ("machine native"); this
// package writes them little-endian, which is the same on every host the
// daemon targets, and the region is only ever read back by this back-end.
const (
	InflightHeaderSize = 16
	InflightDescSize   = 16
	// InflightAlign is the alignment of each queue's region (libvhost-user
	// and DPDK INFLIGHT_ALIGNMENT), so the layout matches theirs.
	InflightAlign = 64
	// InflightVersion is the only region version defined.
	InflightVersion = 1

	ifVersionOff       = 8
	ifDescNumOff       = 10
	ifLastBatchHeadOff = 12
	ifUsedIdxOff       = 14

	ifdInflightOff = 0
	ifdNextOff     = 6
	ifdCounterOff  = 8
)

// InflightRegionSize is the size of one queue's split inflight region for a
// queue of queueSize entries, padded to InflightAlign. It equals
// libvhost-user's ALIGN_UP(16*queueSize+2, 64) and DPDK's
// ALIGN(16*queueSize+16, 64) for every queue size.
func InflightRegionSize(queueSize uint16) uint64 {
	n := InflightHeaderSize + InflightDescSize*uint64(queueSize)
	return (n + InflightAlign - 1) &^ (InflightAlign - 1)
}

// InflightMinSize is the number of bytes of a queue's region that a queue
// of size entries uses: the header and size descriptor states.
func InflightMinSize(size uint16) uint64 {
	return InflightHeaderSize + InflightDescSize*uint64(size)
}

// inflightRegion tracks the requests of one SplitQueue in its inflight region.
// The region is shared with the front-end, which keeps it across back-end
// crashes; every value read back from it is validated before use, since a
// hostile front-end or a back-end that died mid-update wrote it.
type inflightRegion struct {
	b       []byte   // InflightMinSize(size) bytes
	counter uint64   // next pop counter
	batch   []uint16 // heads added since the last Publish (≤ size)

	// resubmit holds the heads a previous back-end popped and never
	// completed, in pop (counter) order; Next returns them before new
	// avail entries.
	resubmit []uint16
}

func (f *inflightRegion) desc(i uint16) []byte {
	off := InflightHeaderSize + int(i)*InflightDescSize
	return f.b[off : off+InflightDescSize]
}

func (f *inflightRegion) u16(off int) uint16      { return binary.LittleEndian.Uint16(f.b[off:]) }
func (f *inflightRegion) put16(off int, v uint16) { binary.LittleEndian.PutUint16(f.b[off:], v) }

// pop records that head was taken from the avail ring (spec: "Set
// desc[i].counter to the value of global counter; increase global counter
// by 1; set desc[i].inflight to 1").
func (f *inflightRegion) pop(head uint16) {
	d := f.desc(head)
	binary.LittleEndian.PutUint64(d[ifdCounterOff:], f.counter)
	f.counter++
	d[ifdInflightOff] = 1
}

// add links head into the batch being completed, before the used element
// is published (spec: "Set desc[i].next to last_batch_head; set
// last_batch_head to i").
func (f *inflightRegion) add(head uint16) {
	binary.LittleEndian.PutUint16(f.desc(head)[ifdNextOff:], f.u16(ifLastBatchHeadOff))
	f.put16(ifLastBatchHeadOff, head)
	f.batch = append(f.batch, head)
}

// published finishes a batch after used.idx was stored (spec: "Set the
// inflight field of each DescStateSplit entry in the batch to 0; set
// used_idx to the idx value of used ring").
func (f *inflightRegion) published(usedIdx uint16) {
	for _, h := range f.batch {
		f.desc(h)[ifdInflightOff] = 0
	}
	f.batch = f.batch[:0]
	f.put16(ifUsedIdxOff, usedIdx)
}

// recoverInflight initialises a fresh region or recovers the state a
// previous back-end left in it, following the spec's reconnect algorithm:
//
//  1. If used_idx differs from used.idx, the last batch was published but
//     not cleared: walk used.idx-used_idx entries of the list from
//     last_batch_head and clear their inflight flags; set used_idx.
//  2. Resubmit the entries still marked inflight, in counter order.
//
// It returns the number of requests in flight (the next avail index is
// used.idx plus that, as in libvhost-user vu_check_queue_inflights) and
// whether the region was fresh, in which case the caller keeps the next
// avail index from SET_VRING_BASE. Any inconsistency returns an error
// wrapping ErrInvalidInflight and changes nothing.
func (f *inflightRegion) recover(size, usedIdx uint16) (inuse uint16, fresh bool, err error) {
	if uint64(len(f.b)) < InflightMinSize(size) {
		return 0, false, fmt.Errorf("%w: region of %d bytes, queue size %d needs %d",
			ErrInvalidInflight, len(f.b), size, InflightMinSize(size))
	}
	f.b = f.b[:InflightMinSize(size)]
	switch v := f.u16(ifVersionOff); v {
	case 0:
		// Never used: a zeroed region from GET_INFLIGHT_FD, or one whose
		// owner never started this queue. Nothing can be in flight.
		for i := range f.b {
			f.b[i] = 0
		}
		f.put16(ifDescNumOff, size)
		f.put16(ifUsedIdxOff, usedIdx)
		f.put16(ifVersionOff, InflightVersion)
		return 0, true, nil
	case InflightVersion:
	default:
		return 0, false, fmt.Errorf("%w: version %d, want 0 or %d", ErrInvalidInflight, v, InflightVersion)
	}
	if n := f.u16(ifDescNumOff); n != size {
		return 0, false, fmt.Errorf("%w: desc_num %d, queue size %d", ErrInvalidInflight, n, size)
	}
	// Validate everything first, on a private copy of the flags, so a
	// rejected region is left as it was.
	flags := make([]byte, size)
	for i := range flags {
		flags[i] = f.desc(uint16(i))[ifdInflightOff]
		if flags[i] > 1 {
			return 0, false, fmt.Errorf("%w: desc[%d].inflight is %d", ErrInvalidInflight, i, flags[i])
		}
	}
	if batch := usedIdx - f.u16(ifUsedIdxOff); batch != 0 {
		// A batch no larger than the queue: the device completes at most
		// size chains between two used_idx updates.
		if batch > size {
			return 0, false, fmt.Errorf("%w: used.idx %d is %d past used_idx %d, queue size %d",
				ErrInvalidInflight, usedIdx, batch, f.u16(ifUsedIdxOff), size)
		}
		h := f.u16(ifLastBatchHeadOff)
		for k := uint16(0); k < batch; k++ {
			if h >= size {
				return 0, false, fmt.Errorf("%w: last batch entry %d is descriptor %d, queue size %d",
					ErrInvalidInflight, k, h, size)
			}
			flags[h] = 0
			h = binary.LittleEndian.Uint16(f.desc(h)[ifdNextOff:])
		}
	}
	type entry struct {
		head    uint16
		counter uint64
	}
	var pending []entry
	for i, fl := range flags {
		if fl == 1 {
			d := f.desc(uint16(i))
			pending = append(pending, entry{uint16(i), binary.LittleEndian.Uint64(d[ifdCounterOff:])})
		}
	}
	// len(pending) ≤ size ≤ 32768, so it fits inuse.
	slices.SortFunc(pending, func(a, b entry) int {
		if c := cmpU64(a.counter, b.counter); c != 0 {
			return c
		}
		return int(a.head) - int(b.head)
	})
	// Commit: clear the finished batch, record used_idx, queue the rest.
	for i := range flags {
		f.desc(uint16(i))[ifdInflightOff] = flags[i]
	}
	f.put16(ifUsedIdxOff, usedIdx)
	f.resubmit = f.resubmit[:0]
	f.counter = 0
	for _, e := range pending {
		f.resubmit = append(f.resubmit, e.head)
		f.counter = max(f.counter, e.counter+1)
	}
	return uint16(len(pending)), false, nil
}
