package virtqueue

import (
	"fmt"
	"math"
)

// Queue is what a worker needs from a virtqueue of either layout: split
// (SplitQueue, VIRTIO 1.2 §2.7) or packed (PackedQueue, §2.8). Both keep the
// same contract: Next hands out chains converted to host slices (zero copy),
// PushUsed (or AddUsed and Publish) completes them in any order, a chain-level violation is reported in Chain.Err
// and the queue goes on, a ring-level violation makes the queue broken for
// good (sticky, no further guest memory access). A Queue is not safe for
// concurrent use: its caller serialises every method call (vhostuser holds
// one mutex per queue for that; the chains themselves may be executed
// concurrently, since a Chain's slices point into guest memory, not into
// the Queue).
type Queue interface {
	// Next takes the next chain; false when the ring is empty.
	Next(c *Chain) (bool, error)
	// PushUsed completes the chain Next returned with c.Head.
	PushUsed(head uint16, written uint32) error
	// AddUsed completes a chain Next returned, in any order relative to
	// the other chains in flight, without necessarily making it visible;
	// Publish makes every AddUsed so far visible. A batch of completions
	// is AddUsed per chain, one Publish, one NeedsNotification.
	AddUsed(head uint16, written uint32) error
	Publish()
	// NeedsNotification reports whether the driver wants a used-buffer
	// notification for what was completed since the last call.
	NeedsNotification() bool
	// EnableNotifications re-arms driver kicks and reports whether work
	// arrived meanwhile.
	EnableNotifications() (bool, error)
	// DisableNotifications asks the driver not to kick while we drain.
	DisableNotifications()
	// Size is the queue size.
	Size() uint16
	// Err is the sticky ring-level error, nil while healthy.
	Err() error
	// Resubmits is how many chains recovered from the inflight region
	// Next has still to return.
	Resubmits() int
	// Base is the value VHOST_USER_GET_VRING_BASE reports: the next avail
	// index for a split ring, the packed encoding of both positions and
	// wrap counters for a packed ring (see PackedBase).
	Base() uint32
}

// NewQueue builds the queue cfg describes: a PackedQueue when cfg.Packed,
// a SplitQueue otherwise.
func NewQueue(mem *Memory, cfg QueueConfig) (Queue, error) {
	// A nil pointer in a non-nil interface must not escape on error.
	if cfg.Packed {
		q, err := NewPackedQueue(mem, cfg)
		if err != nil {
			return nil, err
		}
		return q, nil
	}
	q, err := NewSplitQueue(mem, cfg)
	if err != nil {
		return nil, err
	}
	return q, nil
}

// chainBuilder converts the buffers of one descriptor chain into host slices
// and enforces the chain rules both layouts share (doc.go, "Chain
// validation"): at most limit buffers, at most 2^32-1 bytes, no readable
// buffer after a writable one, every byte mapped, a bounded number of host
// segments, and the shape of an indirect descriptor. The walk itself (how
// the next descriptor is found) belongs to the layout.
type chainBuilder struct {
	mem       *Memory
	c         *Chain
	head      uint16 // names the chain in errors (split head, packed buffer id or slot)
	limit     uint32 // buffers allowed: the queue size
	maxSegs   int
	total     uint64
	buffers   uint32
	seenWrite bool
	// noIndirect: INDIRECT_DESC was not negotiated.
	noIndirect bool
}

func newChainBuilder(mem *Memory, c *Chain, head, size uint16, noIndirect bool) chainBuilder {
	c.Readable = c.Readable[:0]
	c.Writable = c.Writable[:0]
	return chainBuilder{
		noIndirect: noIndirect,
		mem:        mem,
		c:          c,
		head:       head,
		limit:      uint32(size),
		// One slice per descriptor plus one per region boundary is the
		// most a sane driver needs; this bounds the growth of c's slices.
		maxSegs: int(size) + MaxRegions,
	}
}

// buffer adds one buffer descriptor (not INDIRECT); idx names it in errors.
func (b *chainBuilder) buffer(addr uint64, length uint32, write bool, idx uint32) error {
	b.buffers++
	if b.buffers > b.limit {
		return fmt.Errorf("%w: head %d: chain has more than %d buffers; VIRTIO 1.2 §2.7.5.3.1 limits a chain to the queue size",
			ErrInvalidChain, b.head, b.limit)
	}
	b.total += uint64(length)
	if b.total > math.MaxUint32 {
		// The spec's limit is 2^32 bytes (VIRTIO 1.2 §2.7.5.2); one byte
		// less keeps every length representable in the le32 used length
		// and in PushUsed's written argument.
		return fmt.Errorf("%w: head %d: chain is longer than %d bytes at descriptor %d; VIRTIO 1.2 §2.7.5.2",
			ErrInvalidChain, b.head, uint64(math.MaxUint32), idx)
	}
	if write {
		b.seenWrite = true
	} else if b.seenWrite {
		return fmt.Errorf("%w: head %d: device-readable descriptor %d follows a device-writable one; VIRTIO 1.2 §2.7.4.2",
			ErrInvalidChain, b.head, idx)
	}
	// A zero-length descriptor is legal but names no bytes: its address is
	// not translated and it adds no slice (doc.go).
	if length == 0 {
		return nil
	}
	var err error
	if write {
		b.c.Writable, err = b.mem.GuestSlices(b.c.Writable, addr, length)
	} else {
		b.c.Readable, err = b.mem.GuestSlices(b.c.Readable, addr, length)
	}
	if err != nil {
		return fmt.Errorf("%w: head %d: descriptor %d [%#x, +%#x): %w", ErrInvalidChain, b.head, idx, addr, length, err)
	}
	if len(b.c.Readable)+len(b.c.Writable) > b.maxSegs {
		return fmt.Errorf("%w: head %d: chain maps to more than %d host segments", ErrInvalidChain, b.head, b.maxSegs)
	}
	return nil
}

// indirect validates an INDIRECT descriptor (VIRTIO 1.2 §2.7.5.3, §2.8.8)
// found at idx and returns the number of descriptors in its table: no
// INDIRECT inside a table, not together with NEXT, a length that is a
// non-zero multiple of 16 up to 16*32768, and a table wholly in guest
// memory. WRITE on the pointer descriptor is ignored (§2.7.5.3.2).
func (b *chainBuilder) indirect(addr uint64, length uint32, hasNext, inTable bool, idx uint32) (uint32, error) {
	if b.noIndirect {
		return 0, fmt.Errorf("%w: head %d: descriptor %d is INDIRECT but VIRTIO_RING_F_INDIRECT_DESC was not negotiated",
			ErrInvalidChain, b.head, idx)
	}
	if inTable {
		return 0, fmt.Errorf("%w: head %d: indirect descriptor %d points to another table; VIRTIO 1.2 §2.7.5.3.1 forbids nesting",
			ErrInvalidChain, b.head, idx)
	}
	if hasNext {
		return 0, fmt.Errorf("%w: head %d: descriptor %d has both INDIRECT and NEXT; VIRTIO 1.2 §2.7.5.3.1 forbids it",
			ErrInvalidChain, b.head, idx)
	}
	if length == 0 || length%DescSize != 0 || length > maxIndirectLen {
		return 0, fmt.Errorf("%w: head %d: descriptor %d: indirect table length %d is not a non-zero multiple of %d up to %d",
			ErrInvalidChain, b.head, idx, length, DescSize, maxIndirectLen)
	}
	if err := b.mem.checkRange(addr, uint64(length)); err != nil {
		return 0, fmt.Errorf("%w: head %d: descriptor %d: indirect table: %w", ErrInvalidChain, b.head, idx, err)
	}
	return length / DescSize, nil
}
