package virtqueue

import "errors"

// Sentinel errors. Every error the package returns wraps one of these (test
// with errors.Is) plus a message naming the violated invariant and the guest
// address or index involved, in the style of libvhost-user ("guest says index
// 300 is available, queue size 256").
var (
	// ErrInvalidMemory: a region table handed to NewMemory is unusable
	// (empty, too many regions, a zero-sized region, an address range
	// that wraps, or two regions overlapping in either address space).
	ErrInvalidMemory = errors.New("virtqueue: invalid memory region table")

	// ErrGuestAddress: a guest-physical or front-end user address range is
	// not (completely) backed by a memory region.
	ErrGuestAddress = errors.New("virtqueue: address not mapped")

	// ErrInvalidQueue: a QueueConfig is unusable (size, alignment, rings not
	// mapped).
	ErrInvalidQueue = errors.New("virtqueue: invalid queue configuration")

	// ErrInvalidChain: one descriptor chain is malformed. Only Chain.Err
	// carries it; the queue stays usable and the head must be completed
	// with used length 0.
	ErrInvalidChain = errors.New("virtqueue: invalid descriptor chain")

	// ErrRingBroken: the driver violated a ring-level invariant (avail.idx
	// moved by more than the queue size, a head index out of range). The
	// queue is unusable until it is re-created; the error is sticky.
	ErrRingBroken = errors.New("virtqueue: ring broken")

	// ErrInvalidUsed: the caller tried to complete a head that is out of
	// range or more chains than it took with Next.
	ErrInvalidUsed = errors.New("virtqueue: invalid used element")

	// ErrInvalidInflight: a queue's inflight region (vhost-user "Inflight
	// I/O tracking") holds values no back-end following the spec could
	// have left there: an unknown version, a size that is not the queue's,
	// a flag other than 0 or 1, a last batch that does not fit the queue.
	ErrInvalidInflight = errors.New("virtqueue: invalid inflight region")
)
