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
// Packed rings (VIRTIO_F_RING_PACKED) and the interface a worker uses for
// both layouts:
//
//	type Queue interface { Next; PushUsed; NeedsNotification; EnableNotifications;
//	    DisableNotifications; Size; Err; Resubmits; Base() uint32 }
//	func NewQueue(mem *Memory, cfg QueueConfig) (Queue, error) // cfg.Packed picks the layout
//	func NewPackedQueue(mem *Memory, cfg QueueConfig) (*PackedQueue, error)
//	func PackedBase(availIdx uint16, availWrap bool, usedIdx uint16, usedWrap bool) uint32
//
// The dirty log for live migration (dirtylog.go, dirtylog_unsafe.go):
//
//	type DirtyLog struct{ ... }           // one bit per 4 KiB guest page, atomic OR
//	func NewDirtyLog(bits []byte) *DirtyLog
//	func (l *DirtyLog) MarkGPA(gpa, n uint64)          // bounded by the bitmap
//	func (l *DirtyLog) MarkSlices(m *Memory, bufs [][]byte)
//	func (m *Memory) HostGPA(b []byte) (uint64, bool)  // slice → guest-physical
//	func (m *Memory) UserGPA(uva uint64) (uint64, bool)
//
// Marks may race with each other and with the front-end clearing words:
// the OR is one atomic 32-bit operation on the aligned word holding the
// byte, so no bit set by anyone is lost.
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
// With QueueConfig.NoIndirect (INDIRECT_DESC not negotiated) an INDIRECT
// descriptor is a malformed chain, in both layouts. Not implemented:
// VIRTIO_F_IN_ORDER (never offered, so completions may be pushed in any
// order: the split used element and the packed used descriptor name their
// chain, and a packed completion moves the used position by that chain's
// own descriptor count).
//
// # Packed ring layout (VIRTIO 1.2 §2.8)
//
// SET_VRING_ADDR's three addresses are, for a packed ring, the descriptor
// ring and the driver and device event suppression areas (packed.go):
//
//	descriptor ring, 16-aligned, 16*Q bytes, Q in 1..32768 (any value):
//	    +0  le64 addr   +8 le32 len   +12 le16 id (buffer id)
//	    +14 le16 flags  NEXT 1, WRITE 2, INDIRECT 4, AVAIL 1<<7, USED 1<<15
//	driver event suppression, 4-aligned, written by the driver:
//	    +0 le16 off_wrap (offset bits 0-14, wrap bit 15)  +2 le16 flags
//	device event suppression, 4-aligned, written by the device: same
//	    flags: ENABLE 0, DISABLE 1, DESC 2 (DESC only with EVENT_IDX)
//
// Both sides keep a position and a wrap counter, 1 on a fresh ring. A slot
// is available when AVAIL equals the driver wrap counter and USED does not.
// A chain occupies consecutive slots (NEXT), its buffer id is the id of its
// last descriptor (§2.8.6); the device writes one used descriptor per chain
// at its used position (AVAIL = USED = its wrap counter, len = bytes
// written, id = buffer id) and moves that position by the chain's length.
// GET/SET_VRING_BASE carry both positions and wrap counters (PackedBase).
//
// Barriers: the id|flags halves of a descriptor form the 4-aligned word at
// +12, read with one atomic 32-bit load (acquire) before the plain loads of
// addr and len, and written back with one atomic 32-bit store (release)
// after the plain store of len, so the flags that hand a used descriptor to
// the driver are published last. Each descriptor is read once into a copy.
// The event areas are single 32-bit words, loaded and stored atomically;
// NeedsNotification fences before reading the driver's area and
// EnableNotifications fences between storing ours and re-reading the next
// slot, as in the split ring.
//
// Rules: chain-level violations set Chain.Err exactly as for the split ring
// (the same chainBuilder: buffer count, total length, order, mapping,
// indirect table shape; a packed indirect table is a run of descriptors in
// which only WRITE counts). Ring-level violations break the queue (sticky,
// no further guest memory access): a descriptor after the head of a chain
// not available for the expected wrap counter (flags changed under us,
// wrap counter misuse), a chain of more than Q descriptors, more
// descriptors in flight than the ring holds, a buffer id >= Q or one
// already in flight. Every walk is bounded by Q; a head that is not
// available (wrong wrap counter included) simply means the ring is empty.
//
// Inflight tracking uses the spec's packed region layout with this
// package's algorithm (packed_inflight.go): per chain in flight a copy of
// its ring descriptors (the slots are overwritten by used descriptors while
// the chain is in flight), and a completion protocol whose half-done state
// recovery resolves from the ring. After a crash QEMU resends a stale base;
// the region gives the used position, and the avail position is the used
// position plus every descriptor still in flight.
package virtqueue
