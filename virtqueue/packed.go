package virtqueue

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
)

// Packed-ring descriptor flags (VIRTIO 1.2 §2.8.1, §2.8.2); NEXT, WRITE and
// INDIRECT keep their split values (DescFlag*).
const (
	PackedDescFlagAvail = 1 << 7  // VIRTQ_DESC_F_AVAIL
	PackedDescFlagUsed  = 1 << 15 // VIRTQ_DESC_F_USED
)

// Event suppression flags (VIRTIO 1.2 §2.8.10, struct pvirtq_event_suppress
// field flags, bits 0-1).
const (
	EventFlagEnable  = 0 // RING_EVENT_FLAGS_ENABLE: notify
	EventFlagDisable = 1 // RING_EVENT_FLAGS_DISABLE: do not notify
	EventFlagDesc    = 2 // RING_EVENT_FLAGS_DESC: notify at off_wrap (needs EVENT_IDX)
)

// Packed layout: offsets in bytes (VIRTIO 1.2 §2.8.13, struct pvirtq_desc
// and struct pvirtq_event_suppress). Fields are little-endian.
const (
	pdescAddr  = 0  // le64 addr
	pdescLen   = 8  // le32 len
	pdescID    = 12 // le16 id: buffer id
	pdescFlags = 14 // le16 flags

	// EventSuppressSize is sizeof(struct pvirtq_event_suppress): le16
	// desc (offset bits 0-14, wrap bit 15), then le16 flags.
	EventSuppressSize = 4

	eventAlign = 4 // both event suppression areas are 4-aligned (§2.8.10)

	packedWrapBit = 1 << 15 // wrap counter bit of off_wrap and of a vring base half
)

// PackedBase encodes the VHOST_USER_GET/SET_VRING_BASE value of a packed
// ring (vhost-user spec, "Vring descriptor indices for packed virtqueues"):
// bits 0-14 next avail index, bit 15 driver (avail) wrap counter, bits 16-30
// used index, bit 31 device (used) wrap counter. A fresh ring is
// PackedBase(0, true, 0, true).
func PackedBase(availIdx uint16, availWrap bool, usedIdx uint16, usedWrap bool) uint32 {
	return uint32(packedHalf(availIdx, availWrap)) | uint32(packedHalf(usedIdx, usedWrap))<<16
}

func packedHalf(idx uint16, wrap bool) uint16 {
	v := idx &^ packedWrapBit
	if wrap {
		v |= packedWrapBit
	}
	return v
}

// PackedQueue is the device side of one packed virtqueue (VIRTIO 1.2 §2.8).
// See doc.go, "Packed ring layout", for the layout, the barrier sequence
// and the rules it enforces. Like SplitQueue it is owned by one goroutine.
type PackedQueue struct {
	mem        *Memory
	size       uint16
	eventIdx   bool
	noIndirect bool

	desc        []byte // 16*size host bytes: the descriptor ring
	driverEvent []byte // 4 bytes, written by the driver: used-buffer notifications
	deviceEvent []byte // 4 bytes, written by us: driver kicks

	availIdx  uint16 // next ring slot to read
	availWrap bool   // driver wrap counter expected at availIdx
	usedIdx   uint16 // next ring slot to write a used descriptor to
	usedWrap  bool   // device wrap counter at usedIdx

	// usedLin counts used descriptor slots linearly; its lap
	// (usedLin/size) is even exactly when usedWrap is set. It places
	// off_wrap event positions for RING_EVENT_FLAGS_DESC (needEventPacked).
	usedLin        uint64
	signalled      uint64 // usedLin at the last NeedsNotification
	signalledValid bool

	// inUse[id] is the number of ring descriptors of the chain with buffer
	// id in flight, 0 when the id is free; inflightDescs is their sum (at
	// most size, as the ring holds at most size descriptors).
	inUse         []uint16
	inflightDescs uint32

	scratch     []descriptor // the chain being read, at most size entries
	deviceFlags uint32       // device event word as last stored

	broken error
	inf    *packedInflight // nil without an inflight region

	fenceWord uint32
}

// NewPackedQueue validates cfg (cfg.Packed layout) against VIRTIO 1.2 §2.8
// and mem and returns a queue ready for Next.
//
// Checks: size in 1..MaxQueueSize (a packed ring need not be a power of
// two); descriptor ring 16-aligned, both event areas 4-aligned, in user and
// in host addresses; each part mapped contiguously; both positions of the
// base (cfg.NextAvail, cfg.NextUsed) below size. Chains between the used and
// the avail position would have lost their buffer ids (they live only in
// the ring slots the device overwrites), so without an inflight region the
// two positions must be equal, as after GET_VRING_BASE's drain.
//
// With cfg.Inflight (the packed region, InflightPackedMinSize bytes) a fresh
// region is initialised from the base; a region in use overrides the base:
// the used position comes from the region, the avail position is the used
// position plus every descriptor still in flight, and Next returns those
// chains first, rebuilt from the region's copies of their descriptors (see
// packed_inflight.go).
func NewPackedQueue(mem *Memory, cfg QueueConfig) (*PackedQueue, error) {
	if mem == nil {
		return nil, fmt.Errorf("%w: no memory table", ErrInvalidQueue)
	}
	size := cfg.Size
	if size == 0 || size > MaxQueueSize {
		return nil, fmt.Errorf("%w: packed size %d not in 1..%d", ErrInvalidQueue, size, MaxQueueSize)
	}
	if cfg.DescUserAddr%descAlign != 0 {
		return nil, fmt.Errorf("%w: descriptor ring address %#x is not %d-aligned", ErrInvalidQueue, cfg.DescUserAddr, descAlign)
	}
	if cfg.AvailUserAddr%eventAlign != 0 || cfg.UsedUserAddr%eventAlign != 0 {
		return nil, fmt.Errorf("%w: event suppression areas %#x, %#x are not %d-aligned",
			ErrInvalidQueue, cfg.AvailUserAddr, cfg.UsedUserAddr, eventAlign)
	}
	desc, err := mem.UserSlice(cfg.DescUserAddr, DescTableSize(size))
	if err != nil {
		return nil, fmt.Errorf("%w: descriptor ring: %w", ErrInvalidQueue, err)
	}
	drv, err := mem.UserSlice(cfg.AvailUserAddr, EventSuppressSize)
	if err != nil {
		return nil, fmt.Errorf("%w: driver event suppression area: %w", ErrInvalidQueue, err)
	}
	dev, err := mem.UserSlice(cfg.UsedUserAddr, EventSuppressSize)
	if err != nil {
		return nil, fmt.Errorf("%w: device event suppression area: %w", ErrInvalidQueue, err)
	}
	// The flags|id word of every descriptor and both event words are
	// accessed with 32-bit atomics, so they must be aligned in host memory.
	if h := hostAddr(desc); h%descAlign != 0 {
		return nil, fmt.Errorf("%w: descriptor ring maps to host address %#x, not %d-aligned", ErrInvalidQueue, h, descAlign)
	}
	if hostAddr(drv)%eventAlign != 0 || hostAddr(dev)%eventAlign != 0 {
		return nil, fmt.Errorf("%w: event suppression areas are not %d-aligned in host memory", ErrInvalidQueue, eventAlign)
	}
	availIdx, availWrap := cfg.NextAvail&^packedWrapBit, cfg.NextAvail&packedWrapBit != 0
	usedIdx, usedWrap := cfg.NextUsed&^packedWrapBit, cfg.NextUsed&packedWrapBit != 0
	if availIdx >= size || usedIdx >= size {
		return nil, fmt.Errorf("%w: packed base avail %d, used %d: an index is not below the queue size %d",
			ErrInvalidQueue, availIdx, usedIdx, size)
	}
	q := &PackedQueue{
		mem:         mem,
		size:        size,
		eventIdx:    cfg.EventIdx,
		noIndirect:  cfg.NoIndirect,
		desc:        desc,
		driverEvent: drv,
		deviceEvent: dev,
		availIdx:    availIdx,
		availWrap:   availWrap,
		usedIdx:     usedIdx,
		usedWrap:    usedWrap,
		inUse:       make([]uint16, size),
		scratch:     make([]descriptor, 0, size),
	}
	if cfg.Inflight != nil {
		q.inf = &packedInflight{b: cfg.Inflight}
		st, err := q.inf.recover(size, usedIdx, usedWrap, q.usedSlotWritten)
		if err != nil {
			return nil, err
		}
		if !st.fresh {
			q.usedIdx, q.usedWrap = st.usedIdx, st.usedWrap
			q.availIdx, q.availWrap = q.usedIdx, q.usedWrap
			for _, c := range st.chains {
				q.inUse[c.id] = c.num
				q.inflightDescs += uint32(c.num)
				q.availIdx, q.availWrap = q.advance(q.availIdx, q.availWrap, c.num)
			}
		}
	}
	if q.inflightDescs == 0 && (q.availIdx != q.usedIdx || q.availWrap != q.usedWrap) {
		return nil, fmt.Errorf("%w: packed base avail %d/%t, used %d/%t: chains in flight with no inflight region to recover their buffer ids",
			ErrInvalidQueue, q.availIdx, q.availWrap, q.usedIdx, q.usedWrap)
	}
	q.usedLin = 2*uint64(size) + uint64(q.usedIdx)
	if !q.usedWrap {
		q.usedLin += uint64(size)
	}
	// Kicks enabled until the worker says otherwise (the default state,
	// §2.8.10).
	q.storeDeviceEvent(EventFlagEnable << 16)
	return q, nil
}

// advance moves a ring position by n slots, flipping the wrap counter each
// time it passes the end (§2.8.1). n ≤ size.
func (q *PackedQueue) advance(idx uint16, wrap bool, n uint16) (uint16, bool) {
	next := uint32(idx) + uint32(n)
	if next >= uint32(q.size) {
		next -= uint32(q.size)
		wrap = !wrap
	}
	return uint16(next), wrap
}

// usedSlotWritten reports whether ring slot idx carries a used descriptor
// written in the lap with wrap counter wrap: its USED bit equals the wrap
// counter. Before the device writes the slot in that lap it holds the
// driver's available descriptor, whose USED bit is the inverse; after it,
// the driver can only rewrite the slot in the next lap, which keeps USED
// equal to it. Used by inflight recovery.
func (q *PackedQueue) usedSlotWritten(idx uint16, wrap bool) bool {
	if idx >= q.size {
		return false
	}
	flags := uint16(atomicLoadLE32(q.desc[int(idx)*DescSize+pdescID:]) >> 16)
	return (flags&PackedDescFlagUsed != 0) == wrap
}

// Resubmits returns how many chains recovered from the inflight region Next
// has still to return.
func (q *PackedQueue) Resubmits() int {
	if q.inf == nil {
		return 0
	}
	return len(q.inf.resubmit)
}

// Size returns the queue size.
func (q *PackedQueue) Size() uint16 { return q.size }

// Base returns the packed VHOST_USER_GET_VRING_BASE value (PackedBase).
func (q *PackedQueue) Base() uint32 {
	return PackedBase(q.availIdx, q.availWrap, q.usedIdx, q.usedWrap)
}

// Err returns the sticky ring-level error, or nil while the queue is
// healthy.
func (q *PackedQueue) Err() error { return q.broken }

func (q *PackedQueue) fullFence() { atomic.AddUint32(&q.fenceWord, 1) }

func (q *PackedQueue) markBroken(err error) error {
	q.broken = err
	return err
}

// slotWord loads the id|flags word of ring slot i with one atomic 32-bit
// load (acquire): a descriptor whose flags say available has its addr and
// len visible to the plain loads that follow (§2.8.21: the driver writes
// the flags of the head last, after a write barrier).
func (q *PackedQueue) slotWord(i uint16) (id, flags uint16) {
	w := atomicLoadLE32(q.desc[int(i)*DescSize+pdescID:])
	return uint16(w), uint16(w >> 16)
}

// isAvail is the §2.8.1 availability test for the driver wrap counter wrap:
// AVAIL equal to it and USED different.
func isAvail(flags uint16, wrap bool) bool {
	avail := flags&PackedDescFlagAvail != 0
	used := flags&PackedDescFlagUsed != 0
	return avail == wrap && used != wrap
}

func decodePackedDesc(b []byte, id, flags uint16) descriptor {
	b = b[:DescSize]
	return descriptor{
		addr:  binary.LittleEndian.Uint64(b[pdescAddr:]),
		len:   binary.LittleEndian.Uint32(b[pdescLen:]),
		flags: flags,
		next:  id, // a packed descriptor has no next; the field carries the buffer id
	}
}

// Next takes the next chain from the descriptor ring and fills c; c.Head is
// the chain's buffer id (the id of its last descriptor, §2.8.6), which is
// what PushUsed takes.
//
// It returns (false, nil) when the slot at the avail position is not
// available. A chain-level violation sets c.Err (complete c.Head with
// length 0, the queue goes on). A ring-level violation returns (false, err)
// wrapping ErrRingBroken, now and on every later call: a descriptor of a
// chain after its head not available with the head's wrap counter (flags
// changed under us or wrap misuse), a chain of more than size descriptors,
// more descriptors in flight than the ring holds, a buffer id >= size or
// one that is still in flight.
func (q *PackedQueue) Next(c *Chain) (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.inf != nil && len(q.inf.resubmit) > 0 {
		id := q.inf.resubmit[0]
		q.inf.resubmit = q.inf.resubmit[1:]
		q.scratch = q.inf.chainDescs(q.scratch[:0], id)
		q.build(c, id)
		return true, nil
	}
	_, flags := q.slotWord(q.availIdx)
	if !isAvail(flags, q.availWrap) {
		return false, nil
	}
	descs := q.scratch[:0]
	slot, wrap := q.availIdx, q.availWrap
	for {
		id, fl := q.slotWord(slot)
		if !isAvail(fl, wrap) {
			return false, q.markBroken(fmt.Errorf("%w: chain at slot %d: descriptor at slot %d has flags %#x, not available for wrap counter %t (flags changed under us or wrap counter misuse)",
				ErrRingBroken, q.availIdx, slot, fl, wrap))
		}
		if len(descs) == int(q.size) {
			return false, q.markBroken(fmt.Errorf("%w: chain at slot %d has more than %d descriptors; VIRTIO 1.2 §2.8.18 limits it to the queue size",
				ErrRingBroken, q.availIdx, q.size))
		}
		off := int(slot) * DescSize
		descs = append(descs, decodePackedDesc(q.desc[off:off+DescSize], id, fl))
		slot, wrap = q.advance(slot, wrap, 1)
		if fl&DescFlagNext == 0 {
			break
		}
	}
	n := uint16(len(descs))
	id := descs[n-1].next
	if id >= q.size {
		return false, q.markBroken(fmt.Errorf("%w: chain at slot %d has buffer id %d, queue size %d",
			ErrRingBroken, q.availIdx, id, q.size))
	}
	if q.inUse[id] != 0 {
		return false, q.markBroken(fmt.Errorf("%w: chain at slot %d reuses buffer id %d, which is still in flight",
			ErrRingBroken, q.availIdx, id))
	}
	if q.inflightDescs+uint32(n) > uint32(q.size) {
		return false, q.markBroken(fmt.Errorf("%w: chain at slot %d brings the descriptors in flight to %d, more than the ring's %d",
			ErrRingBroken, q.availIdx, q.inflightDescs+uint32(n), q.size))
	}
	q.availIdx, q.availWrap = slot, wrap
	q.inUse[id] = n
	q.inflightDescs += uint32(n)
	q.scratch = descs
	if q.inf != nil {
		q.inf.pop(id, descs)
	}
	q.build(c, id)
	return true, nil
}

// build converts q.scratch, the ring descriptors of the chain with buffer
// id, into c; a violation sets c.Err and empties the buffers.
func (q *PackedQueue) build(c *Chain, id uint16) {
	c.Head = id
	c.Err = q.walk(c, id)
	if c.Err != nil {
		c.Readable = c.Readable[:0]
		c.Writable = c.Writable[:0]
	}
}

// walk applies the shared chain rules (chainBuilder) to the chain's ring
// descriptors and, for an INDIRECT one, to its table: descriptors laid out
// one after another, WRITE the only flag that counts (§2.8.8), read one by
// one with ReadGuest like the split walk does.
func (q *PackedQueue) walk(c *Chain, id uint16) error {
	b := newChainBuilder(q.mem, c, id, q.size, q.noIndirect)
	var raw [DescSize]byte
	for i, d := range q.scratch {
		if d.flags&DescFlagIndirect == 0 {
			if err := b.buffer(d.addr, d.len, d.flags&DescFlagWrite != 0, uint32(i)); err != nil {
				return err
			}
			continue
		}
		n, err := b.indirect(d.addr, d.len, d.flags&DescFlagNext != 0, false, uint32(i))
		if err != nil {
			return err
		}
		for j := uint32(0); j < n; j++ {
			if err := q.mem.ReadGuest(raw[:], d.addr+uint64(j)*DescSize); err != nil {
				return fmt.Errorf("%w: buffer %d: indirect descriptor %d: %w", ErrInvalidChain, id, j, err)
			}
			fl := binary.LittleEndian.Uint16(raw[pdescFlags:])
			td := decodePackedDesc(raw[:], 0, fl)
			if fl&DescFlagIndirect != 0 {
				if _, err := b.indirect(td.addr, td.len, false, true, j); err != nil {
					return err
				}
			}
			if err := b.buffer(td.addr, td.len, fl&DescFlagWrite != 0, j); err != nil {
				return err
			}
		}
	}
	return nil
}

// PushUsed completes the chain with buffer id with written bytes: it writes
// one used descriptor at the used position (len first, then id and flags
// in one atomic 32-bit store, so the flags that hand it to the driver are
// published with release semantics, §2.8.21) and moves the used position
// past the chain's descriptors (§2.8.7: the driver skips the same number).
// An id that is not in flight is ErrInvalidUsed.
func (q *PackedQueue) PushUsed(id uint16, written uint32) error {
	if q.broken != nil {
		return q.broken
	}
	if id >= q.size || q.inUse[id] == 0 {
		return fmt.Errorf("%w: buffer id %d is not in flight (queue size %d)", ErrInvalidUsed, id, q.size)
	}
	n := q.inUse[id]
	nextIdx, nextWrap := q.advance(q.usedIdx, q.usedWrap, n)
	if q.inf != nil {
		q.inf.beginUse(id, nextIdx, nextWrap)
	}
	off := int(q.usedIdx) * DescSize
	binary.LittleEndian.PutUint32(q.desc[off+pdescLen:], written)
	var flags uint16
	if q.usedWrap {
		flags = PackedDescFlagAvail | PackedDescFlagUsed
	}
	if written > 0 {
		flags |= DescFlagWrite
	}
	atomicStoreLE32(q.desc[off+pdescID:], uint32(id)|uint32(flags)<<16)
	q.usedIdx, q.usedWrap = nextIdx, nextWrap
	q.usedLin += uint64(n)
	q.inUse[id] = 0
	q.inflightDescs -= uint32(n)
	if q.inf != nil {
		q.inf.endUse(id)
	}
	return nil
}

// AddUsed is PushUsed: a packed ring has no used index to hold back, each
// used descriptor is handed to the driver by its own flags store. Chains
// may complete in any order (VIRTIO 1.2 §2.8.7: without VIRTIO_F_IN_ORDER,
// which this device never offers, the device writes used descriptors in
// completion order with their buffer ids, and the driver finds the chain
// by id); PushUsed moves the used position by the completed chain's own
// length, recorded by Next.
func (q *PackedQueue) AddUsed(id uint16, written uint32) error { return q.PushUsed(id, written) }

// Publish does nothing: AddUsed already published (see AddUsed).
func (q *PackedQueue) Publish() {}

// NeedsNotification reports whether the driver wants a used-buffer
// notification for what PushUsed wrote since the last call (§2.8.10): after
// a full fence (so our used flags are visible before we read its
// suppression state) it reads the driver event suppression area. DISABLE:
// no. DESC, with EVENT_IDX negotiated: yes if the used descriptor at
// off_wrap was written since the last call. Anything else (ENABLE, the
// reserved value 3, DESC without EVENT_IDX, an offset out of range): yes,
// since a spurious notification is harmless and a missed one hangs the
// driver. The first call always says yes.
func (q *PackedQueue) NeedsNotification() bool {
	if q.broken != nil {
		return false
	}
	q.fullFence()
	w := atomicLoadLE32(q.driverEvent)
	offWrap, flags := uint16(w), uint16(w>>16)&3
	old, valid := q.signalled, q.signalledValid
	q.signalled, q.signalledValid = q.usedLin, true
	switch {
	case flags == EventFlagDisable:
		return false
	case flags == EventFlagDesc && q.eventIdx && valid:
		return q.needEventPacked(offWrap, old)
	default:
		return true
	}
}

// needEventPacked reports whether the event position off_wrap lies in
// [old, usedLin), the used slots written since the last notification. An
// off_wrap with the current used wrap counter is in the current lap; with
// the other one it is taken as the previous lap (a position in the next
// lap has not been reached, and read as the previous lap it only ever
// causes a spurious notification).
func (q *PackedQueue) needEventPacked(offWrap uint16, old uint64) bool {
	off := offWrap &^ packedWrapBit
	if off >= q.size {
		return true
	}
	lapBase := q.usedLin - uint64(q.usedIdx)
	event := lapBase + uint64(off)
	if (offWrap&packedWrapBit != 0) != q.usedWrap {
		event -= uint64(q.size) // usedLin ≥ 2*size, so no underflow
	}
	return event >= old && event < q.usedLin
}

func (q *PackedQueue) storeDeviceEvent(w uint32) {
	q.deviceFlags = w
	atomicStoreLE32(q.deviceEvent, w)
}

// EnableNotifications asks the driver to kick again, then re-checks the
// ring (§2.8.10). With EVENT_IDX it asks for a kick when the descriptor at
// our avail position is made available (RING_EVENT_FLAGS_DESC with
// off_wrap = avail position and wrap counter), otherwise it sets ENABLE. A
// full fence orders that store before the re-read of the slot's flags, so
// a chain the driver made available meanwhile is reported as pending
// instead of lost.
func (q *PackedQueue) EnableNotifications() (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	var w uint32 = EventFlagEnable << 16
	if q.eventIdx {
		w = uint32(packedHalf(q.availIdx, q.availWrap)) | EventFlagDesc<<16
	}
	if w != q.deviceFlags {
		q.storeDeviceEvent(w)
	}
	q.fullFence()
	if q.inf != nil && len(q.inf.resubmit) > 0 {
		return true, nil
	}
	_, flags := q.slotWord(q.availIdx)
	return isAvail(flags, q.availWrap), nil
}

// DisableNotifications asks the driver not to kick while we drain
// (RING_EVENT_FLAGS_DISABLE). A hint, so no fence.
func (q *PackedQueue) DisableNotifications() {
	if q.broken != nil || q.deviceFlags == EventFlagDisable<<16 {
		return
	}
	q.storeDeviceEvent(EventFlagDisable << 16)
}
