package virtqueue

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
)

// MaxQueueSize is the largest split queue size (VIRTIO 1.2 §2.7: "Queue Size
// ... maximum 32768").
const MaxQueueSize = 32768

// Descriptor flags (VIRTIO 1.2 §2.7.5, struct virtq_desc).
const (
	DescFlagNext     = 1 // VIRTQ_DESC_F_NEXT: the next field is valid
	DescFlagWrite    = 2 // VIRTQ_DESC_F_WRITE: buffer is device-writable
	DescFlagIndirect = 4 // VIRTQ_DESC_F_INDIRECT: buffer is a descriptor table
)

// Ring flags.
const (
	// AvailFlagNoInterrupt is VIRTQ_AVAIL_F_NO_INTERRUPT (VIRTIO 1.2 §2.7.7):
	// without EVENT_IDX the driver asks not to be notified of used buffers.
	AvailFlagNoInterrupt = 1
	// UsedFlagNoNotify is VIRTQ_USED_F_NO_NOTIFY (VIRTIO 1.2 §2.7.10):
	// without EVENT_IDX the device asks not to be kicked.
	UsedFlagNoNotify = 1
)

// Split-ring layout: offsets and sizes in bytes (VIRTIO 1.2 §2.7.5, §2.7.6,
// §2.7.8). Fields are little-endian.
const (
	DescSize = 16 // sizeof(struct virtq_desc)

	descAddr  = 0  // le64 addr: guest-physical buffer address
	descLen   = 8  // le32 len
	descFlags = 12 // le16 flags
	descNext  = 14 // le16 next

	availFlags = 0 // le16 flags
	availIdx   = 2 // le16 idx
	availRing  = 4 // le16 ring[size], then le16 used_event

	usedFlags    = 0 // le16 flags
	usedIdx      = 2 // le16 idx
	usedRing     = 4 // struct virtq_used_elem ring[size], then le16 avail_event
	usedElemSize = 8 // struct virtq_used_elem {le32 id; le32 len}
	usedElemID   = 0
	usedElemLen  = 4

	// Alignment of the three parts (VIRTIO 1.2 §2.7, "Virtqueue Part
	// Alignment" table).
	descAlign  = 16
	availAlign = 2
	usedAlign  = 4

	// maxIndirectLen bounds an indirect table: at most MaxQueueSize
	// descriptors, as rust-vmm virtio-queue and the brief require.
	maxIndirectLen = DescSize * MaxQueueSize
)

// DescTableSize, AvailRingSize and UsedRingSize return the byte sizes of the
// three parts of a split queue of the given size, including the event-index
// fields (VIRTIO 1.2 §2.7).
func DescTableSize(size uint16) uint64 { return DescSize * uint64(size) }

// AvailRingSize returns 6 + 2*size: flags, idx, ring[size], used_event.
func AvailRingSize(size uint16) uint64 { return 6 + 2*uint64(size) }

// UsedRingSize returns 6 + 8*size: flags, idx, ring[size], avail_event.
func UsedRingSize(size uint16) uint64 { return 6 + usedElemSize*uint64(size) }

// QueueConfig describes a split virtqueue as configured by the front-end
// (VHOST_USER_SET_VRING_NUM, _ADDR, _BASE and the negotiated features).
type QueueConfig struct {
	Size                                      uint16 // power of two, 1..32768
	DescUserAddr, AvailUserAddr, UsedUserAddr uint64 // front-end virtual addresses (SET_VRING_ADDR)
	EventIdx                                  bool   // VIRTIO_RING_F_EVENT_IDX negotiated
	NextAvail                                 uint16 // from SET_VRING_BASE

	// Packed selects the packed layout (VIRTIO_F_RING_PACKED, VIRTIO 1.2
	// §2.8; NewQueue, NewPackedQueue). The three addresses are then the
	// descriptor ring, the driver and the device event suppression areas,
	// NextAvail holds the next avail index in bits 0-14 and the driver wrap
	// counter in bit 15, and NextUsed the same for the used side (the two
	// halves of the vhost-user packed vring base, see PackedBase).
	Packed   bool
	NextUsed uint16

	// NoIndirect: VIRTIO_RING_F_INDIRECT_DESC was not negotiated, so an
	// INDIRECT descriptor is a malformed chain (VIRTIO 1.2 §2.7.5.3.1,
	// §2.8.8: the driver MUST NOT set it without the feature).
	NoIndirect bool

	// Inflight is this queue's split inflight region (at least
	// InflightMinSize(Size) bytes), or nil for no tracking. See
	// NewSplitQueue for how it overrides NextAvail.
	Inflight []byte
}

// Chain is one descriptor chain taken from the available ring, converted to
// host slices. A Chain is reused across calls to Next: its slices keep their
// capacity so a worker reaches a steady state without allocation.
type Chain struct {
	Head     uint16
	Readable [][]byte // device-readable buffers, in order (reused between calls)
	Writable [][]byte // device-writable buffers, in order (reused between calls)
	Err      error    // non-nil: malformed chain; complete Head with used length 0
}

// SplitQueue is the device side of one split virtqueue (VIRTIO 1.2 §2.7).
//
// It is not safe for concurrent use: the caller serialises every call
// (vhostuser's ring owner and completion publishers share one mutex), and
// the control path calls NextAvail only after every chain popped has been
// completed and the worker has stopped (vhost-user spec "Ring states").
// Chains may be completed in any order: a used element carries its head.
type SplitQueue struct {
	mem      *Memory
	size     uint16
	mask     uint16
	eventIdx bool
	noIndir  bool // INDIRECT_DESC not negotiated

	desc  []byte // DescTableSize(size) host bytes
	avail []byte // AvailRingSize(size) host bytes
	used  []byte // UsedRingSize(size) host bytes

	// availIdxWord is the 4-aligned 32-bit word of the avail ring that
	// holds avail.idx, and availIdxShift the bit position of idx in its
	// little-endian value: 16 when the ring is 4-aligned (word = flags|idx),
	// 0 when it is only 2-aligned (word = idx|ring[0]). Either way the word
	// lies inside the avail ring, so one atomic 32-bit load reads avail.idx.
	availIdxWord  []byte
	availIdxShift uint

	nextAvail   uint16 // next avail ring slot to consume
	shadowAvail uint16 // last avail.idx read from the ring

	usedShadow     uint16 // used.idx including elements not yet published
	usedPublished  uint16 // used.idx as last stored to the ring
	usedFlagsValue uint16 // used.flags as we last stored them; only the device writes them
	inflight       uint64 // chains returned by Next and not yet completed

	signalled      uint16 // used.idx at the last NeedsNotification
	signalledValid bool   // false until the first NeedsNotification

	broken error // sticky ring-level error; non-nil means never touch the ring again

	inf *inflightRegion // nil without an inflight region

	// fenceWord is the target of the atomic read-modify-write used as a
	// full barrier (fullFence). Per queue, so workers do not share a cache
	// line.
	fenceWord uint32
}

// NewSplitQueue validates cfg against VIRTIO 1.2 §2.7 and mem and returns a
// queue ready for Next. The ring slices are looked up once here; mem must
// stay mapped for the life of the queue (re-create the queue after a memory
// table change, as libvhost-user re-translates its ring pointers).
//
// Checks: size is a power of two in 1..MaxQueueSize; the three user
// addresses have the spec alignment (desc 16, avail 2, used 4); each part is
// mapped contiguously; and the host mappings of the avail and used rings are
// aligned like their user addresses, so the atomic accesses below are
// aligned (they are whenever the mapping preserves page offsets, which every
// vhost-user front-end's mmap does).
//
// The used index is read from the used ring, since after a reconnect it is
// whatever the previous back-end left there (vhost-user spec
// "GET_VRING_BASE": the used index "is in guest memory"). The chains between
// used.idx and cfg.NextAvail count as in flight: they can be completed with
// PushUsed on the new queue, so re-creating a queue with
// NextAvail = old.NextAvail() (after a memory table change) keeps requests
// in progress completable. More than Size of them is rejected.
//
// With cfg.Inflight the queue tracks every chain in that region (vhost-user
// spec, "Inflight I/O tracking", split layout; see inflight.go). A fresh
// region (version 0) is initialised and NextAvail is used as given. A
// region in use is validated and recovered instead: the last published
// batch is cleared, NextAvail becomes used.idx plus the chains still marked
// in flight, and Next returns those chains first, in the order they were
// popped. A region that fails validation, or claims more chains in flight
// than the driver published, is rejected with ErrInvalidInflight.
func NewSplitQueue(mem *Memory, cfg QueueConfig) (*SplitQueue, error) {
	if mem == nil {
		return nil, fmt.Errorf("%w: no memory table", ErrInvalidQueue)
	}
	size := cfg.Size
	if size == 0 || size > MaxQueueSize || size&(size-1) != 0 {
		return nil, fmt.Errorf("%w: size %d is not a power of two in 1..%d", ErrInvalidQueue, size, MaxQueueSize)
	}
	if cfg.DescUserAddr%descAlign != 0 {
		return nil, fmt.Errorf("%w: descriptor table address %#x is not %d-aligned", ErrInvalidQueue, cfg.DescUserAddr, descAlign)
	}
	if cfg.AvailUserAddr%availAlign != 0 {
		return nil, fmt.Errorf("%w: avail ring address %#x is not %d-aligned", ErrInvalidQueue, cfg.AvailUserAddr, availAlign)
	}
	if cfg.UsedUserAddr%usedAlign != 0 {
		return nil, fmt.Errorf("%w: used ring address %#x is not %d-aligned", ErrInvalidQueue, cfg.UsedUserAddr, usedAlign)
	}
	desc, err := mem.UserSlice(cfg.DescUserAddr, DescTableSize(size))
	if err != nil {
		return nil, fmt.Errorf("%w: descriptor table: %w", ErrInvalidQueue, err)
	}
	avail, err := mem.UserSlice(cfg.AvailUserAddr, AvailRingSize(size))
	if err != nil {
		return nil, fmt.Errorf("%w: avail ring: %w", ErrInvalidQueue, err)
	}
	used, err := mem.UserSlice(cfg.UsedUserAddr, UsedRingSize(size))
	if err != nil {
		return nil, fmt.Errorf("%w: used ring: %w", ErrInvalidQueue, err)
	}
	availHost, usedHost := hostAddr(avail), hostAddr(used)
	if availHost%availAlign != 0 {
		return nil, fmt.Errorf("%w: avail ring at user address %#x maps to host address %#x, not %d-aligned",
			ErrInvalidQueue, cfg.AvailUserAddr, availHost, availAlign)
	}
	if usedHost%usedAlign != 0 {
		return nil, fmt.Errorf("%w: used ring at user address %#x maps to host address %#x, not %d-aligned",
			ErrInvalidQueue, cfg.UsedUserAddr, usedHost, usedAlign)
	}
	q := &SplitQueue{
		mem:         mem,
		size:        size,
		mask:        size - 1,
		eventIdx:    cfg.EventIdx,
		noIndir:     cfg.NoIndirect,
		desc:        desc,
		avail:       avail,
		used:        used,
		nextAvail:   cfg.NextAvail,
		shadowAvail: cfg.NextAvail,
	}
	if availHost%4 == 0 {
		q.availIdxWord, q.availIdxShift = avail[availFlags:availFlags+4], 16
	} else {
		q.availIdxWord, q.availIdxShift = avail[availIdx:availIdx+4], 0
	}
	word := atomicLoadLE32(used[usedFlags : usedFlags+4])
	q.usedPublished = uint16(word >> 16)
	q.usedShadow = q.usedPublished
	// Chains between used.idx and NextAvail were taken by a previous
	// queue object or back-end and may still be completed through this
	// one (a queue re-created after a memory table change, or requests
	// resubmitted from the inflight region after a reconnect).
	if cfg.Inflight != nil {
		q.inf = &inflightRegion{b: cfg.Inflight}
		inuse, fresh, err := q.inf.recover(size, q.usedPublished)
		if err != nil {
			return nil, err
		}
		if !fresh {
			// The region, not SET_VRING_BASE, says where the previous
			// back-end stopped: after a crash QEMU sends used.idx as the
			// base (vhost-user.md §1.7), and the inuse requests popped
			// beyond it are resubmitted, not popped again.
			q.nextAvail = q.usedPublished + inuse
			q.shadowAvail = q.nextAvail
			// The driver published at least every chain that was popped.
			if idx := q.loadAvailIdx(); idx-q.nextAvail > size {
				return nil, fmt.Errorf("%w: %d requests in flight past used.idx %d, but avail.idx is %d",
					ErrInvalidInflight, inuse, q.usedPublished, idx)
			}
		}
	}
	inflight := q.nextAvail - q.usedPublished
	if inflight > size {
		return nil, fmt.Errorf("%w: next avail index %d is %d entries past used.idx %d, queue size %d",
			ErrInvalidQueue, q.nextAvail, inflight, q.usedPublished, size)
	}
	q.inflight = uint64(inflight)
	if !cfg.EventIdx {
		// Keep whatever suppression state a previous back-end left;
		// the worker re-arms with EnableNotifications before it sleeps.
		q.usedFlagsValue = uint16(word) & UsedFlagNoNotify
	}
	// With EVENT_IDX the device keeps used.flags 0 (VIRTIO 1.2 §2.7.10.1).
	return q, nil
}

// Resubmits returns how many chains recovered from the inflight region
// Next has still to return (all of them right after NewSplitQueue).
func (q *SplitQueue) Resubmits() int {
	if q.inf == nil {
		return 0
	}
	return len(q.inf.resubmit)
}

// Size returns the queue size.
func (q *SplitQueue) Size() uint16 { return q.size }

// Base returns NextAvail as the 32-bit VHOST_USER_GET_VRING_BASE value of a
// split ring.
func (q *SplitQueue) Base() uint32 { return uint32(q.nextAvail) }

// NextAvail returns the index of the next avail ring entry the device will
// consume: the value VHOST_USER_GET_VRING_BASE reports (vhost-user spec §
// "GET_VRING_BASE"). It may be below avail.idx.
func (q *SplitQueue) NextAvail() uint16 { return q.nextAvail }

// Err returns the sticky ring-level error, or nil while the queue is
// healthy.
func (q *SplitQueue) Err() error { return q.broken }

// fullFence is a full memory barrier: an atomic read-modify-write, which is
// LOCK XADD on amd64 (a full barrier) and LDADDAL on arm64 with LSE atomics
// (fully ordered). Go offers no standalone fence; see doc.go for the
// reasoning and its limits.
func (q *SplitQueue) fullFence() { atomic.AddUint32(&q.fenceWord, 1) }

// loadAvailIdx reads avail.idx with one atomic 32-bit load (acquire): every
// ring entry and descriptor the driver wrote before publishing this index is
// visible to the plain loads that follow (VIRTIO 1.2 §2.7.13 step "memory
// barrier" before the idx update on the driver side).
func (q *SplitQueue) loadAvailIdx() uint16 {
	return uint16(atomicLoadLE32(q.availIdxWord) >> q.availIdxShift)
}

// loadAvailFlags reads avail.flags. When the avail ring is 4-aligned the
// flags share the atomic word with avail.idx, and reading the word keeps the
// access identical to the one the idx read uses; otherwise the flags are a
// lone 16-bit field read with a single 16-bit load (see doc.go).
func (q *SplitQueue) loadAvailFlags() uint16 {
	if q.availIdxShift == 16 {
		return uint16(atomicLoadLE32(q.availIdxWord))
	}
	return loadLE16(q.avail[availFlags:])
}

// markBroken records a ring-level error. After this no method touches guest
// memory (libvhost-user dev->broken; openvmm #4045: never spin on an error
// that cannot clear).
func (q *SplitQueue) markBroken(err error) error {
	q.broken = err
	return err
}

// checkAvail validates a freshly loaded avail.idx: the driver cannot have
// more than size chains outstanding (vm-virtio #196, Firecracker #3149).
func (q *SplitQueue) checkAvail(idx uint16) error {
	if n := idx - q.nextAvail; n > q.size {
		return q.markBroken(fmt.Errorf("%w: guest moved avail.idx to %d, %d entries past next %d, queue size %d",
			ErrRingBroken, idx, n, q.nextAvail, q.size))
	}
	return nil
}

// Next takes the next descriptor chain from the available ring and fills c.
//
// It returns (false, nil) when the ring is empty. It returns (true, nil)
// with c filled otherwise; if the chain is malformed c.Err says why, c.Head
// is still valid and the caller must complete it with PushUsed(c.Head, 0) so
// the head is not leaked (Cloud Hypervisor #8401). A ring-level violation
// (avail.idx more than size ahead, head index out of range) returns
// (false, err) with err wrapping ErrRingBroken, and so does every later
// call, without touching guest memory.
func (q *SplitQueue) Next(c *Chain) (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.inf != nil && len(q.inf.resubmit) > 0 {
		// Requests a previous back-end popped and never completed go
		// first, in the order it popped them (vhost-user spec, "Inflight
		// I/O tracking"). They are already counted in flight and still
		// marked in the region.
		head := q.inf.resubmit[0]
		q.inf.resubmit = q.inf.resubmit[1:]
		q.build(c, head)
		return true, nil
	}
	if q.shadowAvail == q.nextAvail {
		idx := q.loadAvailIdx()
		if err := q.checkAvail(idx); err != nil {
			return false, err
		}
		q.shadowAvail = idx
		if idx == q.nextAvail {
			return false, nil
		}
	}
	slot := int(q.nextAvail&q.mask) * 2
	head := binary.LittleEndian.Uint16(q.avail[availRing+slot:])
	if head >= q.size {
		return false, q.markBroken(fmt.Errorf("%w: guest says index %d is available (avail slot %d), queue size %d",
			ErrRingBroken, head, q.nextAvail&q.mask, q.size))
	}
	q.nextAvail++
	q.inflight++
	if q.inf != nil {
		q.inf.pop(head)
	}
	q.build(c, head)
	return true, nil
}

// build walks the chain at head into c; a violation sets c.Err and empties
// the buffers (the resubmitted and the freshly popped chain alike).
func (q *SplitQueue) build(c *Chain, head uint16) {
	c.Head = head
	c.Err = q.walk(c, head)
	if c.Err != nil {
		c.Readable = c.Readable[:0]
		c.Writable = c.Writable[:0]
	}
}

// descriptor is one decoded struct virtq_desc. It is decoded once from guest
// memory into this copy and never re-read, so the driver cannot change it
// between check and use.
type descriptor struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func decodeDesc(b []byte) descriptor {
	b = b[:DescSize]
	return descriptor{
		addr:  binary.LittleEndian.Uint64(b[descAddr:]),
		len:   binary.LittleEndian.Uint32(b[descLen:]),
		flags: binary.LittleEndian.Uint16(b[descFlags:]),
		next:  binary.LittleEndian.Uint16(b[descNext:]),
	}
}

// walk follows the chain starting at head and converts its buffers into
// c.Readable and c.Writable. Every rule it enforces is a driver MUST from
// VIRTIO 1.2; a violation returns an error wrapping ErrInvalidChain and
// leaves the queue usable. See doc.go, "Chain validation".
func (q *SplitQueue) walk(c *Chain, head uint16) error {
	var (
		b        = newChainBuilder(q.mem, c, head, q.size, q.noIndir)
		idx      = head
		ttl      = uint32(q.size) // descriptors left before we call it a loop
		tableLen = uint32(q.size) // entries in the table being walked
		inTable  = false          // walking an indirect table
		tableGPA uint64           // guest-physical address of that table
		raw      [DescSize]byte
	)
	for {
		if ttl == 0 {
			return fmt.Errorf("%w: head %d: chain has more than %d descriptors (loop?); VIRTIO 1.2 §2.7.5.2 forbids loops",
				ErrInvalidChain, head, tableLen)
		}
		ttl--
		var d descriptor
		if inTable {
			if err := q.mem.ReadGuest(raw[:], tableGPA+uint64(idx)*DescSize); err != nil {
				return fmt.Errorf("%w: head %d: indirect descriptor %d: %w", ErrInvalidChain, head, idx, err)
			}
			d = decodeDesc(raw[:])
		} else {
			off := int(idx) * DescSize
			d = decodeDesc(q.desc[off : off+DescSize])
		}

		if d.flags&DescFlagIndirect != 0 {
			n, err := b.indirect(d.addr, d.len, d.flags&DescFlagNext != 0, inTable, uint32(idx))
			if err != nil {
				return err
			}
			// VIRTIO 1.2 §2.7.5.3.2: the device ignores WRITE on this
			// descriptor and walks the table from entry 0.
			inTable, tableGPA = true, d.addr
			tableLen = n
			ttl = tableLen
			idx = 0
			continue
		}
		if err := b.buffer(d.addr, d.len, d.flags&DescFlagWrite != 0, uint32(idx)); err != nil {
			return err
		}
		if d.flags&DescFlagNext == 0 {
			return nil
		}
		if uint32(d.next) >= tableLen {
			return fmt.Errorf("%w: head %d: descriptor %d says next is %d, table has %d entries",
				ErrInvalidChain, head, idx, d.next, tableLen)
		}
		idx = d.next
	}
}

// AddUsed writes the used element {head, written} into the next used ring
// slot without publishing it: the driver cannot see it until Publish (or a
// PushUsed) stores used.idx. Use it to complete a batch with a single index
// update.
func (q *SplitQueue) AddUsed(head uint16, written uint32) error {
	if q.broken != nil {
		return q.broken
	}
	if head >= q.size {
		return fmt.Errorf("%w: head %d, queue size %d", ErrInvalidUsed, head, q.size)
	}
	if q.inflight == 0 {
		return fmt.Errorf("%w: head %d completed but no chain is in flight", ErrInvalidUsed, head)
	}
	q.inflight--
	if q.inf != nil {
		q.inf.add(head)
	}
	off := usedRing + int(q.usedShadow&q.mask)*usedElemSize
	e := q.used[off : off+usedElemSize]
	// VIRTIO 1.2 §2.7.8.2: the device MUST set len prior to updating the
	// used idx. These plain stores are ordered before the idx store in
	// Publish because that store is a sequentially consistent atomic.
	binary.LittleEndian.PutUint32(e[usedElemID:], uint32(head))
	binary.LittleEndian.PutUint32(e[usedElemLen:], written)
	q.usedShadow++
	return nil
}

// Publish makes every element added by AddUsed visible to the driver by
// storing used.idx with release semantics (one atomic 32-bit store of the
// aligned flags|idx word; only the device writes either half). Call
// NeedsNotification afterwards to decide whether to signal the call fd.
func (q *SplitQueue) Publish() {
	if q.broken != nil || q.usedPublished == q.usedShadow {
		return
	}
	q.usedPublished = q.usedShadow
	q.storeUsedWord()
	if q.inf != nil {
		q.inf.published(q.usedPublished)
	}
}

func (q *SplitQueue) storeUsedWord() {
	atomicStoreLE32(q.used[usedFlags:usedFlags+4], uint32(q.usedFlagsValue)|uint32(q.usedPublished)<<16)
}

// PushUsed completes head with written bytes and publishes it at once:
// AddUsed followed by Publish. It also publishes any earlier AddUsed
// elements.
func (q *SplitQueue) PushUsed(head uint16, written uint32) error {
	if err := q.AddUsed(head, written); err != nil {
		return err
	}
	q.Publish()
	return nil
}

// needEvent is vring_need_event from VIRTIO 1.2 §2.7.10 (and Linux
// include/uapi/linux/virtio_ring.h): notify if the driver's event index lies
// in the window of indices published since the last notification,
// (old, new]. All arithmetic is modulo 2^16: new-event-1 is the distance
// from the entry after event to new, and it is smaller than new-old exactly
// when event is one of old..new-1.
func needEvent(event, newIdx, oldIdx uint16) bool {
	return newIdx-event-1 < newIdx-oldIdx
}

// NeedsNotification reports whether the driver wants a used-buffer
// notification (a write to the call fd) for what has been published since
// the last call. Call it after Publish/PushUsed.
//
// With EVENT_IDX it applies needEvent to used_event (VIRTIO 1.2 §2.7.7)
// after a full fence, because the used.idx store must be visible to the
// driver before we read its used_event, or we could both miss a wakeup.
// The first call always says yes (libvhost-user signalled_used_valid).
// Without EVENT_IDX it honours VIRTQ_AVAIL_F_NO_INTERRUPT.
// A broken queue never asks for a notification.
func (q *SplitQueue) NeedsNotification() bool {
	if q.broken != nil {
		return false
	}
	q.fullFence()
	if !q.eventIdx {
		return q.loadAvailFlags()&AvailFlagNoInterrupt == 0
	}
	event := loadLE16(q.avail[availRing+2*int(q.size):])
	old, valid := q.signalled, q.signalledValid
	q.signalled, q.signalledValid = q.usedPublished, true
	if !valid {
		return true
	}
	return needEvent(event, q.usedPublished, old)
}

// EnableNotifications asks the driver to kick us again and then re-checks
// the avail ring. It returns true if work arrived meanwhile; the caller then
// keeps draining (and may call DisableNotifications first) before it sleeps
// on the kick fd. The loop is: drain, enable, if pending disable and drain
// again (Cloud Hypervisor handle_event, rust-vmm enable_notification).
//
// With EVENT_IDX it writes avail_event = NextAvail, so the driver kicks as
// soon as it publishes past what we consumed (VIRTIO 1.2 §2.7.10);
// otherwise it clears VIRTQ_USED_F_NO_NOTIFY. Then a full fence orders that
// store before the re-read of avail.idx: without it the driver could
// publish, read the old suppression state and skip the kick while we read
// the old avail.idx and go to sleep.
func (q *SplitQueue) EnableNotifications() (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.eventIdx {
		storeLE16(q.used[usedRing+usedElemSize*int(q.size):], q.nextAvail)
	} else if q.usedFlagsValue&UsedFlagNoNotify != 0 {
		q.usedFlagsValue &^= UsedFlagNoNotify
		q.storeUsedWord()
	}
	q.fullFence()
	idx := q.loadAvailIdx()
	if err := q.checkAvail(idx); err != nil {
		return false, err
	}
	q.shadowAvail = idx
	return idx != q.nextAvail, nil
}

// DisableNotifications asks the driver not to kick while we are draining.
// Without EVENT_IDX it sets VIRTQ_USED_F_NO_NOTIFY. With EVENT_IDX there is
// nothing to do: the driver kicks once when it crosses avail_event and
// avail_event is not moved again until EnableNotifications. The request is
// only a hint (VIRTIO 1.2 §2.7.10: the driver may still notify), so no
// fence is needed.
func (q *SplitQueue) DisableNotifications() {
	if q.broken != nil || q.eventIdx || q.usedFlagsValue&UsedFlagNoNotify != 0 {
		return
	}
	q.usedFlagsValue |= UsedFlagNoNotify
	q.storeUsedWord()
}
