package frontend

import (
	"fmt"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// Packed rings (VIRTIO 1.2 §2.8), driven the way Linux's virtio_ring does:
// descriptors written from the avail position with the driver's wrap
// counter, the first descriptor's flags last (one atomic store of its
// id|flags word); used descriptors read at the used position and skipped by
// the chain's length; the driver event suppression area asks for an
// interrupt at the next used descriptor when EVENT_IDX is negotiated.

// layoutPacked places the descriptor ring and the two event suppression
// areas (SET_VRING_ADDR: desc, avail = driver area, used = device area).
func (q *Queue) layoutPacked(inflight int) (err error) {
	n := int(q.Size)
	q.packed, q.availWrap, q.usedWrap = true, true, true
	q.freeDescs = n
	q.pnum = make([]uint16, n)
	if q.descOff, err = q.f.Alloc(16*n, 4096); err != nil {
		return err
	}
	if q.availOff, err = q.f.Alloc(4, 4); err != nil {
		return err
	}
	if q.usedOff, err = q.f.Alloc(4, 4); err != nil {
		return err
	}
	if err := q.allocSlots(inflight); err != nil {
		return err
	}
	// A stale AVAIL bit in re-used memory would look like a request.
	clear(q.f.Mem[q.descOff : q.descOff+16*n])
	clear(q.f.Mem[q.availOff : q.availOff+4])
	clear(q.f.Mem[q.usedOff : q.usedOff+4])
	if q.f.Features&vhostuser.FeatureEventIdx != 0 {
		q.armUsedEvent()
	}
	return q.openFDs()
}

// Packed reports whether the queue is a packed ring.
func (q *Queue) Packed() bool { return q.packed }

func packedHalf(idx uint16, wrap bool) uint16 {
	if wrap {
		return idx | 1<<15
	}
	return idx
}

// packedBase is the SET_VRING_BASE value for the current positions.
func (q *Queue) packedBase() uint32 {
	q.startBase = virtqueue.PackedBase(q.availIdx, q.availWrap, q.usedPos, q.usedWrap)
	return q.startBase
}

// StartBase is the base the queue was last started with.
func (q *Queue) StartBase() uint32 { return q.startBase }

func availFlags(wrap bool) uint16 {
	if wrap {
		return virtqueue.PackedDescFlagAvail
	}
	return virtqueue.PackedDescFlagUsed
}

// PutPackedDesc writes ring slot i raw (addr, len, then id|flags in one
// atomic store), for hostile tests.
func (q *Queue) PutPackedDesc(i uint16, addr uint64, length uint32, id, flags uint16) {
	off := q.descOff + 16*int(i%q.Size)
	le.PutUint64(q.f.Mem[off:], addr)
	le.PutUint32(q.f.Mem[off+8:], length)
	store32(q.f.Mem, off+12, uint32(id)|uint32(flags)<<16)
}

func (q *Queue) publishPacked(chain []Desc) (uint16, error) {
	if len(chain) == 0 || len(chain) > q.freeDescs || len(q.free) == 0 {
		return 0, fmt.Errorf("%w: %d descriptors wanted, %d free", ErrNoSlot, len(chain), q.freeDescs)
	}
	id := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	q.freeDescs -= len(chain)
	q.pnum[id] = uint16(len(chain))
	first, oldIdx, oldWrap := q.availIdx, q.availIdx, q.availWrap
	var headFlags uint16
	for i, d := range chain {
		var flags uint16
		if d.Write {
			flags |= DescFlagWrite
		}
		if i+1 < len(chain) {
			flags |= DescFlagNext
		}
		flags |= availFlags(q.availWrap)
		if i == 0 {
			headFlags = flags
			off := q.descOff + 16*int(q.availIdx)
			le.PutUint64(q.f.Mem[off:], d.Addr)
			le.PutUint32(q.f.Mem[off+8:], d.Len)
		} else {
			q.PutPackedDesc(q.availIdx, d.Addr, d.Len, id, flags)
		}
		q.availIdx++
		if q.availIdx == q.Size {
			q.availIdx, q.availWrap = 0, !q.availWrap
		}
	}
	// The head's flags last: they hand the whole chain over (§2.8.21).
	store32(q.f.Mem, q.descOff+16*int(first)+12, uint32(id)|uint32(headFlags)<<16)
	if q.needKickPacked(oldIdx, oldWrap, uint16(len(chain))) {
		q.Kick()
	}
	return id, nil
}

// needKickPacked reads the device event suppression area after publishing
// n descriptors from (oldIdx, oldWrap): DISABLE no, DESC (EVENT_IDX) if the
// device's off_wrap is one of the slots just published, otherwise yes.
func (q *Queue) needKickPacked(oldIdx uint16, oldWrap bool, n uint16) bool {
	w := load32(q.f.Mem, q.usedOff)
	offWrap, flags := uint16(w), uint16(w>>16)&3
	switch {
	case flags == virtqueue.EventFlagDisable:
		return false
	case flags == virtqueue.EventFlagDesc && q.f.Features&vhostuser.FeatureEventIdx != 0:
		off, wrap := offWrap&^(1<<15), offWrap&(1<<15) != 0
		for k, idx, wr := uint16(0), oldIdx, oldWrap; k < n; k++ {
			if idx == off && wr == wrap {
				return true
			}
			idx++
			if idx == q.Size {
				idx, wr = 0, !wr
			}
		}
		return false
	default:
		return true
	}
}

// armUsedEvent asks for an interrupt when the device writes the used
// descriptor at our used position (RING_EVENT_FLAGS_DESC).
func (q *Queue) armUsedEvent() {
	store32(q.f.Mem, q.availOff, uint32(packedHalf(q.usedPos, q.usedWrap))|uint32(virtqueue.EventFlagDesc)<<16)
}

func (q *Queue) popUsedPacked() (Used, bool) {
	off := q.descOff + 16*int(q.usedPos)
	w := load32(q.f.Mem, off+12)
	flags := uint16(w >> 16)
	avail, used := flags&virtqueue.PackedDescFlagAvail != 0, flags&virtqueue.PackedDescFlagUsed != 0
	if avail != q.usedWrap || used != q.usedWrap {
		return Used{}, false
	}
	id := uint16(w)
	u := Used{ID: uint32(id), Len: le.Uint32(q.f.Mem[off+8:])}
	n := uint16(1)
	if id < q.Size && q.pnum[id] != 0 {
		n = q.pnum[id]
		q.pnum[id] = 0
		q.freeDescs += int(n)
		q.free = append(q.free, id)
	}
	next := uint32(q.usedPos) + uint32(n)
	if next >= uint32(q.Size) {
		next -= uint32(q.Size)
		q.usedWrap = !q.usedWrap
	}
	q.usedPos = uint16(next)
	if q.f.Features&vhostuser.FeatureEventIdx != 0 {
		q.armUsedEvent()
	}
	return u, true
}
