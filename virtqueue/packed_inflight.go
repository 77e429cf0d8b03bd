package virtqueue

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// Packed-ring inflight region (vhost-user spec, "Inflight I/O tracking",
// packed layout; vhost-user.md §1.10). The structures are the spec's:
//
//	struct QueueRegionPacked {         // InflightPackedHeaderSize bytes
//	    uint64_t features;             // not used
//	    uint16_t version;              // 0: never initialised, 1: in use
//	    uint16_t desc_num;             // queue size
//	    uint16_t free_head;            // not used (see below)
//	    uint16_t old_free_head;        // entry whose completion is in progress
//	    uint16_t used_idx;             // used position after that completion
//	    uint16_t old_used_idx;         // used position before it
//	    uint8_t  used_wrap_counter;
//	    uint8_t  old_used_wrap_counter;
//	    uint8_t  padding[7];
//	    DescStatePacked desc[desc_num];
//	};
//	struct DescStatePacked {           // InflightPackedDescSize bytes
//	    uint8_t  inflight;             // 1 on the first entry of a chain in flight
//	    uint8_t  padding;
//	    uint16_t next;                 // next entry of the same chain
//	    uint16_t last;                 // last entry of the chain (first entry only)
//	    uint16_t num;                  // ring descriptors in the chain (first entry only)
//	    uint64_t counter;              // pop order (first entry only)
//	    uint16_t id;                   // copy of one ring descriptor:
//	    uint16_t flags;                //   id, flags, len, addr
//	    uint32_t len;
//	    uint64_t addr;
//	};
//
// The region is read back only by this back-end (QEMU keeps it opaque), so
// the algorithm is this package's, built on the spec's fields:
//
//   - The entries are a pool. A chain of n ring descriptors popped by Next
//     takes n free entries holding copies of its descriptors (a packed ring
//     slot is overwritten by used descriptors while its chain may still be
//     in flight, so the copies are the only record), linked by next; its
//     first entry gets num, last and counter, and inflight = 1 is written
//     last. A crash before that store loses nothing: the chain is still in
//     the ring past the recovered avail position.
//   - PushUsed: old_free_head = the chain's first entry and used_idx /
//     used_wrap_counter = the position after it (old_used_* still hold the
//     one before); then the used descriptor goes to the ring; then the
//     entry's inflight = 0; then old_used_* = used_*. Between the first and
//     the last step the two positions differ and say a completion is in
//     progress.
//   - Recovery: if a completion was in progress, the ring decides: the slot
//     at old_used_idx has its USED bit equal to old_used_wrap_counter once
//     the used descriptor landed (PackedQueue.usedSlotWritten); then the
//     completion is finished, otherwise rolled back and the chain
//     resubmitted. The free list is rebuilt from the chains in flight, so
//     free_head is not needed. The avail position is the used position plus
//     the descriptors of every chain in flight: each popped chain is either
//     completed (and moved the used position by its size) or in flight.
//
// Fields are little-endian, as in the split region.
const (
	InflightPackedHeaderSize = 32
	InflightPackedDescSize   = 32

	ifpFreeHead    = 12
	ifpOldFreeHead = 14
	ifpUsedIdx     = 16
	ifpOldUsedIdx  = 18
	ifpUsedWrap    = 20
	ifpOldUsedWrap = 21

	ifpeInflight = 0
	ifpeNext     = 2
	ifpeLast     = 4
	ifpeNum      = 6
	ifpeCounter  = 8
	ifpeID       = 16
	ifpeFlags    = 18
	ifpeLen      = 20
	ifpeAddr     = 24
)

// InflightPackedRegionSize is the size of one queue's packed inflight
// region, padded to InflightAlign.
func InflightPackedRegionSize(queueSize uint16) uint64 {
	n := InflightPackedMinSize(queueSize)
	return (n + InflightAlign - 1) &^ (InflightAlign - 1)
}

// InflightPackedMinSize is the number of bytes of a packed region a queue
// of size entries uses.
func InflightPackedMinSize(size uint16) uint64 {
	return InflightPackedHeaderSize + InflightPackedDescSize*uint64(size)
}

// packedInflight tracks the chains of one PackedQueue in its region.
type packedInflight struct {
	b       []byte
	size    uint16
	counter uint64

	free  []uint16 // free entries (a stack)
	first []uint16 // per buffer id in flight: its first entry
	next  []uint16 // per entry: next entry of its chain (our copy, never read back from b)
	num   []uint16 // per buffer id in flight: entries of its chain

	// resubmit holds the buffer ids a previous back-end popped and never
	// completed, in pop order.
	resubmit []uint16
}

func (f *packedInflight) ent(i uint16) []byte {
	off := InflightPackedHeaderSize + int(i)*InflightPackedDescSize
	return f.b[off : off+InflightPackedDescSize]
}

func (f *packedInflight) u16(off int) uint16      { return binary.LittleEndian.Uint16(f.b[off:]) }
func (f *packedInflight) put16(off int, v uint16) { binary.LittleEndian.PutUint16(f.b[off:], v) }

func b2u8(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// pop records the chain with buffer id made of descs (≤ the free entries:
// Next checked that the descriptors in flight fit the ring).
func (f *packedInflight) pop(id uint16, descs []descriptor) {
	n := len(descs)
	entries := f.free[len(f.free)-n:]
	for k, d := range descs {
		e := f.ent(entries[k])
		e[ifpeInflight] = 0
		nxt := uint16(0)
		if k+1 < n {
			nxt = entries[k+1]
		}
		f.next[entries[k]] = nxt
		binary.LittleEndian.PutUint16(e[ifpeNext:], nxt)
		binary.LittleEndian.PutUint16(e[ifpeID:], d.next) // the descriptor's id field
		binary.LittleEndian.PutUint16(e[ifpeFlags:], d.flags)
		binary.LittleEndian.PutUint32(e[ifpeLen:], d.len)
		binary.LittleEndian.PutUint64(e[ifpeAddr:], d.addr)
	}
	head := f.ent(entries[0])
	binary.LittleEndian.PutUint16(head[ifpeLast:], entries[n-1])
	binary.LittleEndian.PutUint16(head[ifpeNum:], uint16(n))
	binary.LittleEndian.PutUint64(head[ifpeCounter:], f.counter)
	f.counter++
	head[ifpeInflight] = 1 // last: from here on the chain is recorded
	f.first[id] = entries[0]
	f.num[id] = uint16(n)
	f.free = f.free[:len(f.free)-n]
}

// chainDescs appends the recorded descriptors of buffer id to dst.
func (f *packedInflight) chainDescs(dst []descriptor, id uint16) []descriptor {
	e := f.first[id]
	for k := uint16(0); k < f.num[id]; k++ {
		b := f.ent(e)
		dst = append(dst, descriptor{
			addr:  binary.LittleEndian.Uint64(b[ifpeAddr:]),
			len:   binary.LittleEndian.Uint32(b[ifpeLen:]),
			flags: binary.LittleEndian.Uint16(b[ifpeFlags:]),
			next:  binary.LittleEndian.Uint16(b[ifpeID:]),
		})
		e = f.next[e]
	}
	return dst
}

// beginUse marks the completion of buffer id as in progress, the used
// position moving to (usedIdx, usedWrap).
func (f *packedInflight) beginUse(id, usedIdx uint16, usedWrap bool) {
	f.put16(ifpOldFreeHead, f.first[id])
	f.put16(ifpUsedIdx, usedIdx)
	f.b[ifpUsedWrap] = b2u8(usedWrap)
}

// endUse finishes the completion of buffer id after its used descriptor
// was written: clear the chain, free its entries, commit the used position.
func (f *packedInflight) endUse(id uint16) {
	e := f.first[id]
	f.ent(e)[ifpeInflight] = 0
	for k := uint16(0); k < f.num[id]; k++ {
		f.free = append(f.free, e)
		e = f.next[e]
	}
	f.num[id] = 0
	f.put16(ifpOldUsedIdx, f.u16(ifpUsedIdx))
	f.b[ifpOldUsedWrap] = f.b[ifpUsedWrap]
}

// packedChain is one chain found in flight by recover.
type packedChain struct {
	id, first, num uint16
	counter        uint64
}

type packedRecovery struct {
	fresh    bool
	usedIdx  uint16
	usedWrap bool
	chains   []packedChain // in pop order
}

// recover initialises a fresh region with the used position of the vring
// base, or validates and recovers one in use (see the top of this file).
// slotUsed tells whether a ring slot holds a used descriptor of a lap.
// Every inconsistency returns an error wrapping ErrInvalidInflight and
// leaves the region as it was.
func (f *packedInflight) recover(size, baseUsed uint16, baseWrap bool, slotUsed func(uint16, bool) bool) (packedRecovery, error) {
	if uint64(len(f.b)) < InflightPackedMinSize(size) {
		return packedRecovery{}, fmt.Errorf("%w: packed region of %d bytes, queue size %d needs %d",
			ErrInvalidInflight, len(f.b), size, InflightPackedMinSize(size))
	}
	f.b = f.b[:InflightPackedMinSize(size)]
	f.size = size
	f.first = make([]uint16, size)
	f.next = make([]uint16, size)
	f.num = make([]uint16, size)
	f.free = make([]uint16, 0, size)
	switch v := f.u16(ifVersionOff); v {
	case 0:
		clear(f.b)
		f.put16(ifDescNumOff, size)
		f.put16(ifpUsedIdx, baseUsed)
		f.put16(ifpOldUsedIdx, baseUsed)
		f.b[ifpUsedWrap] = b2u8(baseWrap)
		f.b[ifpOldUsedWrap] = b2u8(baseWrap)
		f.put16(ifVersionOff, InflightVersion)
		for i := int(size) - 1; i >= 0; i-- {
			f.free = append(f.free, uint16(i))
		}
		return packedRecovery{fresh: true, usedIdx: baseUsed, usedWrap: baseWrap}, nil
	case InflightVersion:
	default:
		return packedRecovery{}, fmt.Errorf("%w: version %d, want 0 or %d", ErrInvalidInflight, v, InflightVersion)
	}
	if n := f.u16(ifDescNumOff); n != size {
		return packedRecovery{}, fmt.Errorf("%w: desc_num %d, queue size %d", ErrInvalidInflight, n, size)
	}
	pos := func(idxOff, wrapOff int, name string) (uint16, bool, error) {
		idx, w := f.u16(idxOff), f.b[wrapOff]
		if idx >= size || w > 1 {
			return 0, false, fmt.Errorf("%w: %s %d/%d, queue size %d", ErrInvalidInflight, name, idx, w, size)
		}
		return idx, w == 1, nil
	}
	usedIdx, usedWrap, err := pos(ifpUsedIdx, ifpUsedWrap, "used_idx/used_wrap_counter")
	if err != nil {
		return packedRecovery{}, err
	}
	oldIdx, oldWrap, err := pos(ifpOldUsedIdx, ifpOldUsedWrap, "old_used_idx/old_used_wrap_counter")
	if err != nil {
		return packedRecovery{}, err
	}
	// Collect and validate every chain in flight.
	owner := make([]bool, size) // entry belongs to a chain
	idSeen := make([]bool, size)
	var chains []packedChain
	var total uint32
	for i := uint16(0); i < size; i++ {
		fl := f.ent(i)[ifpeInflight]
		if fl > 1 {
			return packedRecovery{}, fmt.Errorf("%w: desc[%d].inflight is %d", ErrInvalidInflight, i, fl)
		}
		if fl == 0 {
			continue
		}
		e := f.ent(i)
		num := binary.LittleEndian.Uint16(e[ifpeNum:])
		if num == 0 || uint32(num) > uint32(size)-total {
			return packedRecovery{}, fmt.Errorf("%w: desc[%d].num is %d, %d entries of %d already in flight",
				ErrInvalidInflight, i, num, total, size)
		}
		total += uint32(num)
		cur, last := i, i
		for k := uint16(0); k < num; k++ {
			if cur >= size || owner[cur] {
				return packedRecovery{}, fmt.Errorf("%w: chain at desc[%d]: entry %d is out of range or shared", ErrInvalidInflight, i, cur)
			}
			owner[cur] = true
			f.next[cur] = binary.LittleEndian.Uint16(f.ent(cur)[ifpeNext:])
			last = cur
			if k+1 < num {
				cur = f.next[cur]
			}
		}
		if binary.LittleEndian.Uint16(e[ifpeLast:]) != last {
			return packedRecovery{}, fmt.Errorf("%w: chain at desc[%d]: last is %d, the links end at %d",
				ErrInvalidInflight, i, binary.LittleEndian.Uint16(e[ifpeLast:]), last)
		}
		id := binary.LittleEndian.Uint16(f.ent(last)[ifpeID:])
		if id >= size || idSeen[id] {
			return packedRecovery{}, fmt.Errorf("%w: chain at desc[%d]: buffer id %d out of range or in flight twice", ErrInvalidInflight, i, id)
		}
		idSeen[id] = true
		chains = append(chains, packedChain{id: id, first: i, num: num, counter: binary.LittleEndian.Uint64(e[ifpeCounter:])})
	}
	// A completion in progress: finish it if its used descriptor reached
	// the ring, otherwise roll the used position back.
	done := -1
	if usedIdx != oldIdx || usedWrap != oldWrap {
		e := f.u16(ifpOldFreeHead)
		landed := slotUsed(oldIdx, oldWrap)
		for k, c := range chains {
			if c.first == e {
				if landed {
					done = k
				}
				break
			}
		}
		if !landed {
			usedIdx, usedWrap = oldIdx, oldWrap
		}
	}
	if done >= 0 {
		chains = slices.Delete(chains, done, done+1)
	}
	slices.SortFunc(chains, func(a, b packedChain) int {
		if c := cmpU64(a.counter, b.counter); c != 0 {
			return c
		}
		return int(a.first) - int(b.first)
	})
	// Commit.
	clear(owner)
	f.resubmit = f.resubmit[:0]
	f.counter = 0
	for _, c := range chains {
		f.first[c.id], f.num[c.id] = c.first, c.num
		e := c.first
		for k := uint16(0); k < c.num; k++ {
			owner[e] = true
			e = f.next[e]
		}
		f.resubmit = append(f.resubmit, c.id)
		f.counter = max(f.counter, c.counter+1)
	}
	for i := int(size) - 1; i >= 0; i-- {
		if owner[i] {
			continue
		}
		f.ent(uint16(i))[ifpeInflight] = 0
		f.free = append(f.free, uint16(i))
	}
	f.put16(ifpFreeHead, 0)
	f.put16(ifpUsedIdx, usedIdx)
	f.put16(ifpOldUsedIdx, usedIdx)
	f.b[ifpUsedWrap] = b2u8(usedWrap)
	f.b[ifpOldUsedWrap] = b2u8(usedWrap)
	return packedRecovery{usedIdx: usedIdx, usedWrap: usedWrap, chains: chains}, nil
}
