// Package virtqueue gives the device side of a virtio queue access to guest
// memory shared by a vhost-user front-end.
//
// Contract used by the other packages (owners keep it stable):
//
//	type Region struct {
//	    GuestPhysAddr uint64 // guest-physical start address
//	    UserAddr      uint64 // the front-end's virtual address of the same memory
//	    Data          []byte // our mapping; len(Data) is the region size
//	}
//	func NewMemory(regions []Region) (*Memory, error) // validates: non-empty, no overflow, no overlap
//	func (m *Memory) GuestSlices(dst [][]byte, gpa uint64, n uint32) ([][]byte, error) // appends, may span regions
//	func (m *Memory) ReadGuest(p []byte, gpa uint64) error
//	func (m *Memory) WriteGuest(p []byte, gpa uint64) error
//	func (m *Memory) UserSlice(uva uint64, n uint64) ([]byte, error) // contiguous, for ring structures
//
//	type QueueConfig struct {
//	    Size                                      uint16 // power of two, 1..32768
//	    DescUserAddr, AvailUserAddr, UsedUserAddr uint64 // front-end virtual addresses (SET_VRING_ADDR)
//	    EventIdx                                  bool   // VIRTIO_RING_F_EVENT_IDX negotiated
//	    NextAvail                                 uint16 // from SET_VRING_BASE
//	}
//	func NewSplitQueue(mem *Memory, cfg QueueConfig) (*SplitQueue, error)
//	type Chain struct {
//	    Head     uint16
//	    Readable [][]byte // device-readable buffers, in order (reused between calls)
//	    Writable [][]byte // device-writable buffers, in order (reused between calls)
//	    Err      error    // non-nil: malformed chain; complete Head with used length 0
//	}
//	func (q *SplitQueue) Next(c *Chain) (bool, error) // false: ring empty; error: ring broken (sticky)
//	func (q *SplitQueue) PushUsed(head uint16, written uint32) error
//	func (q *SplitQueue) NeedsNotification() bool        // after PushUsed batch; honours EVENT_IDX / NO_INTERRUPT
//	func (q *SplitQueue) EnableNotifications() (bool, error) // re-arm kicks; true if work arrived meanwhile
//	func (q *SplitQueue) DisableNotifications()
//	func (q *SplitQueue) NextAvail() uint16              // for GET_VRING_BASE
//
// The contract above is implemented as written. Additions (all additive):
// Memory.Regions; SplitQueue.AddUsed and Publish (batch completion),
// SplitQueue.Size and Err; constants MaxRegions, MaxQueueSize, DescSize,
// DescFlag*, AvailFlagNoInterrupt, UsedFlagNoNotify; DescTableSize,
// AvailRingSize, UsedRingSize; sentinel errors in errors.go. Package
// virtqueuetest is a driver-side mock for tests of this and other packages.
//
// # Split ring layout (VIRTIO 1.2 §2.7)
//
// Three parts, each contiguous in the front-end's address space (their
// addresses come from VHOST_USER_SET_VRING_ADDR as front-end user addresses
// and are translated with Memory.UserSlice once, in NewSplitQueue). All
// fields little-endian; Q is the queue size, a power of two up to 32768.
//
//	descriptor table, 16-aligned, 16*Q bytes, written by the driver only:
//	    +0  le64 addr   guest-physical address (Memory.GuestSlices)
//	    +8  le32 len
//	    +12 le16 flags  NEXT 1, WRITE 2, INDIRECT 4
//	    +14 le16 next
//	avail ring, 2-aligned, 6+2*Q bytes, written by the driver only:
//	    +0  le16 flags         NO_INTERRUPT 1
//	    +2  le16 idx           free-running, next slot the driver fills
//	    +4  le16 ring[Q]       head indices
//	    +4+2Q le16 used_event  (EVENT_IDX) notify me after this used entry
//	used ring, 4-aligned, 6+8*Q bytes, written by the device only:
//	    +0  le16 flags         NO_NOTIFY 1
//	    +2  le16 idx           free-running, next slot the device fills
//	    +4  {le32 id; le32 len} ring[Q]
//	    +4+8Q le16 avail_event (EVENT_IDX) kick me after this avail entry
//
// Only the index words are accessed concurrently by both sides; everything
// else is ordered by them. Descriptors and ring entries are decoded with
// encoding/binary from named offset constants (split.go), each descriptor
// read exactly once into a local copy, so a driver rewriting the table
// cannot change a descriptor between its check and its use.
//
// # Barrier sequence
//
// Driver publishes (VIRTIO 1.2 §2.7.13): write descriptors, write
// avail.ring[idx%Q], write barrier, store avail.idx, full barrier, read
// avail_event (or used.flags), maybe kick.
//
// Device (this package):
//
//  1. Next: load avail.idx with acquire (atomic 32-bit load), check
//     idx-nextAvail <= Q, then plain loads of ring[] and descriptors.
//  2. AddUsed: plain stores of used.ring[i].id and .len.
//  3. Publish: store used.idx with release (atomic 32-bit store of the
//     flags|idx word), so the element is visible first (§2.7.8.2: set len
//     before updating idx).
//  4. NeedsNotification: full fence, then load used_event (or avail.flags).
//     Without the fence the load could pass the idx store and both sides
//     could decide not to wake the other.
//  5. EnableNotifications: store avail_event = nextAvail (or clear
//     NO_NOTIFY), full fence, reload avail.idx; work that raced with the
//     re-arm is reported as pending rather than lost.
//
// # How the accesses are made in Go
//
// Go's sync/atomic is sequentially consistent (Go memory model, 2022) and
// has no 16-bit operations. So:
//
//   - avail.idx is read with atomic.LoadUint32 on the 4-aligned word that
//     holds it: flags|idx when the avail ring is 4-aligned (the usual case:
//     it follows the 16*Q-byte table), idx|ring[0] when it is only
//     2-aligned. Both words lie inside the avail ring, so the load never
//     touches memory outside the mapped part.
//   - used.flags|used.idx is one aligned word that only the device writes:
//     the queue keeps both halves and stores the word with
//     atomic.StoreUint32, so used.idx is never torn and is published with
//     release semantics. NewSplitQueue also checks that the host mapping of
//     the used ring is 4-aligned, so the atomic is aligned in host memory,
//     not just in the front-end's.
//   - used_event, avail_event and (when the avail ring is only 2-aligned)
//     avail.flags are lone 16-bit fields whose 32-bit neighbour may lie
//     outside the ring. They use a single aligned 16-bit load or store
//     through a pointer (ring_unsafe.go), which is single-copy atomic on
//     amd64 and arm64, bracketed by fullFence where the sequence above needs
//     ordering. used_event and avail_event are hints: a stale value only
//     causes a spurious or a deferred-by-one-iteration notification, which
//     both sides must tolerate (§2.7.7, §2.7.10), and the fence-plus-re-check
//     in EnableNotifications closes the lost-wakeup window.
//   - fullFence is an atomic read-modify-write on a per-queue word:
//     LOCK XADD on amd64, which is a full barrier; LDADDAL on arm64 with LSE
//     atomics, which is fully ordered. Limitation: on arm64 CPUs without LSE,
//     Go falls back to an LDAXR/STLXR loop, which orders the atomic access
//     itself but is not a full DMB for unrelated plain accesses; a small
//     assembly fence (as go-fuse internal/barrier) would close that gap.
//
// The atomic and 16-bit accesses are the only pointer casts of the package
// and live in ring_unsafe.go; each slices first so Go's bounds check runs,
// then casts (gVisor style). The race detector sees the same atomics on the
// mock driver side (virtqueuetest), so driver/device tests are checked for
// missing synchronization.
//
// # Chain validation
//
// Chain-level violations set Chain.Err (wrapping ErrInvalidChain); Head is
// still valid and the caller completes it with used length 0, and the queue
// goes on. Rules, all driver MUSTs of VIRTIO 1.2:
//
//   - A chain in the descriptor table visits at most Q descriptors (TTL):
//     loops are forbidden (§2.7.5.2). next must be < Q.
//   - INDIRECT (§2.7.5.3): table length a non-zero multiple of 16 and at
//     most 16*32768; the whole table must be in guest memory (it may span
//     regions and is read descriptor by descriptor with ReadGuest, avoiding
//     libvhost-user's cross-region indirect-table overflow); no INDIRECT in
//     an indirect table; not INDIRECT together with NEXT; WRITE on the
//     pointer descriptor is ignored (§2.7.5.3.2); direct descriptors
//     followed by one indirect descriptor are accepted. Inside the table
//     the TTL is the table length and next must be < the table length.
//   - At most Q buffer descriptors per chain, counting those in an indirect
//     table ("a driver MUST NOT create a descriptor chain longer than the
//     Queue Size", §2.7.5.3.1).
//   - Total length at most 2^32-1 bytes. The spec forbids more than 2^32
//     (§2.7.5.2); exactly 2^32 is rejected too because the used length and
//     PushUsed's written count are 32-bit.
//   - No device-readable descriptor after a device-writable one (§2.7.4.2).
//   - Every byte of every non-empty buffer is mapped (GuestSlices).
//   - Zero-length descriptors: the spec does not forbid them, so they are
//     accepted. They name no memory, so their address is not translated or
//     checked and they add no slice to Readable/Writable; they still count
//     for the TTL, the buffer limit and the readable-before-writable order.
//     Consumers therefore never see an empty slice.
//   - At most Q+MaxRegions host slices per chain (a buffer crossing regions
//     yields one slice per region), which bounds the growth of the reused
//     Readable/Writable slices; after they have grown once, Next does not
//     allocate.
//
// Ring-level violations make the queue broken (ErrRingBroken, sticky): an
// avail.idx more than Q ahead of NextAvail, or a head index >= Q in the avail
// ring. From then on Next and EnableNotifications return the error,
// PushUsed/AddUsed return it, NeedsNotification says false, and no method
// touches guest memory (libvhost-user dev->broken), so a worker never spins
// on a condition that cannot clear.
//
// Not implemented: packed virtqueues (VIRTIO 1.2 §2.8) are future work, as
// are VIRTIO_F_IN_ORDER batching and checking that INDIRECT_DESC was
// negotiated before accepting an indirect descriptor (the queue does not
// know the feature set; this is accepted as harmless).
package virtqueue
