// Package vhostuser is the vhost-user back-end: it speaks the vhost-user
// protocol (QEMU docs/interop/vhost-user.rst) on a unix socket, maps the
// front-end's guest memory, and runs one worker goroutine per started
// virtqueue that hands virtio-blk requests to blk.Handler.
//
// # API
//
//	type Options struct {
//	    Disk      blk.Disk    // served storage, safe for concurrent use
//	    Blk       blk.Options // Blk.NumQueues defaults to NumQueues
//	    NumQueues int         // 1..MaxQueues; 0 means MaxQueues (256)
//	    Events    Events      // nil: NopEvents
//	    Notifier  *ConfigNotifier // optional: announce config changes
//	    Gate      *RingGate       // optional: one disk on several sockets
//	    Monitor   *Monitor        // optional: connection state for a control socket
//	    Stats     *blk.Stats      // optional: per-queue request statistics
//	}
//	type RingGate struct{ ... } // handoff.go
//	func NewRingGate() *RingGate
//	func (g *RingGate) Owner() uint64 // connection whose rings run, 0: none
//	func (g *RingGate) Waiting() int  // connections waiting to start a ring
//	func (m *Monitor) Status() DeviceStatus // connected, features (bits and names), queues; Frontends: one per socket
//	func (m *Monitor) Quiesce(f func() error) error // f runs with no request in progress on any queue of any connection
//	type Events interface {
//	    ConnOpened(id uint64)
//	    ConnClosed(id uint64, err error)               // nil err: orderly end
//	    QueueBroken(conn uint64, queue int, err error) // once per queue start
//	    RequestFailed(conn uint64, queue int, err error)
//	}
//	type RecoveryEvents interface { // optional, by type assertion on Events
//	    QueueRecovered(conn uint64, queue int, n int) // n requests redone from the inflight region
//	}
//	func Listen(path string) (*net.UnixListener, error) // replaces a stale socket only
//	func FromFD(fd int) (*net.UnixListener, error)      // --fd N; takes ownership
//	type CacheEvents interface { // optional, by type assertion on Events
//	    WriteCacheChanged(conn uint64, writeThrough bool)
//	}
//	type ConfigNotifier struct{ ... } // Options.Notifier
//	func (n *ConfigNotifier) NotifyConfigChange(ctx context.Context) error
//	var ErrNoBackendChannel, ErrBackendRequestFailed error
//	func Serve(ctx context.Context, ln *net.UnixListener, opts Options) error
//	func ServeConn(ctx context.Context, c *net.UnixConn, opts Options) error
//
// Serve handles one front-end at a time and accepts the next when a
// connection ends for any reason, so QEMU's reconnect=1 works after a
// protocol error. Cancelling ctx ends Serve, even while a reply write is
// blocked by a front-end that does not read: workers finish their
// in-flight requests, memory is unmapped, fds are closed, ln is closed.
//
// The wire format is exported too (Header, VringState, VringAddr,
// MemRegion, ConfigMsg with Append*/Parse* functions, request and feature
// constants) for the test front-end in vhostuser/frontend.
//
// # Offered features
//
// Virtio: VERSION_1 (required in SET_FEATURES), RING_EVENT_IDX,
// RING_INDIRECT_DESC, RING_PACKED, VHOST_USER_F_PROTOCOL_FEATURES,
// VHOST_F_LOG_ALL (the only bit SET_FEATURES may change while rings run), plus
// blk.Features (with CONFIG_WCE on a writable disk). Ring features are
// honoured only when SET_FEATURES acked them: without INDIRECT_DESC a chain
// holding an indirect descriptor is malformed (completed with length 0,
// RequestFailed with virtqueue.ErrInvalidChain); without EVENT_IDX the
// driver's flags suppress notifications (avail.flags NO_INTERRUPT and
// used.flags NO_NOTIFY for split rings, the event suppression areas'
// ENABLE/DISABLE for packed ones) and no event index is read or written.
//
// When RING_PACKED is acked every ring is packed (virtqueue.PackedQueue):
// SET_VRING_ADDR's avail and used addresses are the driver and device event
// suppression areas (4 bytes each), SET/GET_VRING_BASE carry 32 bits (bits
// 0-14 next avail index, 15 driver wrap counter, 16-30 used index, 31
// device wrap counter; the indices are checked against the ring size when
// the ring starts), and inflight regions use the packed layout
// (virtqueue/packed_inflight.go: 32-byte header and entries, padded to 64),
// sized from the features acked before GET_INFLIGHT_FD as QEMU sends them.
//
// Protocol: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, CONFIG,
// INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS, STATUS; never a bit >= 20, whose meaning has moved between
// spec revisions.
//
// # Memory slots and dirty logging
//
// memslots.go: ADD_MEM_REG / REM_MEM_REG build a new immutable table
// (GET_MAX_MEM_SLOTS = MaxMemSlots = 509) and install it like
// SET_MEM_TABLE, under the dispatch lock held for writing, so no worker is
// inside a batch; a removed region is unmapped before the reply. Removing a
// region a started ring lies in, or one never added, is refused (non-zero
// REPLY_ACK, session kept); overlaps, bad fds and a 510th region end the
// connection. dirtylog.go: SET_LOG_BASE maps the bitmap (reply u64 0),
// LOG_ALL in SET_FEATURES turns marking on, SET_VRING_ADDR on a started
// ring may change only its flags and log address; workers mark each
// completed chain's writable buffers and the ring's device-written parts
// after writing them (cost when off: one nil test per chain and batch).
//
// # One disk on several sockets
//
// handoff.go: Serve calls sharing Options.Gate run the rings of one
// connection at a time. A connection owns the gate from its first
// SET_VRING_KICK until none of its rings is started (GET_VRING_BASE,
// RESET_DEVICE, disconnect); another connection's SET_VRING_KICK waits
// meanwhile (the control goroutine blocks; ctx cancellation ends the wait).
// QEMU's migration source stops all its rings before the destination
// starts any, so a one-host migration never waits.
//
// # Inflight tracking (reconnect after a back-end crash)
//
// GET_INFLIGHT_FD creates a memfd of num_queues regions of the split
// layout (virtqueue/inflight.go: 16-byte header, 16 bytes per
// descriptor, each region padded to 64 bytes as libvhost-user and DPDK
// do), seals it against growing and shrinking, sends it with mmap_offset 0
// and keeps nothing. SET_INFLIGHT_FD (QEMU re-sends the same fd on every
// reconnect) is refused while a ring runs, and is mapped only after
// num_queues (1..queues offered), queue_size (1..32768), mmap_size (≥ the
// regions), mmap_offset+mmap_size (inside the file, no wrap) and the
// F_SEAL_SHRINK seal (so the mapping can never SIGBUS) check out. A ring
// that starts while a buffer is set tracks its requests in its region:
// marked with a counter when popped, linked into last_batch_head before
// used.idx is published, cleared after. If the region was in use, the
// ring first validates and recovers it (spec reconnect algorithm); the
// next avail index becomes used.idx plus the requests still marked, so
// SET_VRING_BASE = used.idx (what QEMU sends when GET_VRING_BASE failed)
// is fine, and those requests are redone, one at a time in counter order, before any
// new avail entry. A region no spec-following back-end could have left
// (unknown version, wrong desc_num, flags other than 0/1, a last batch
// longer than the ring or leaving it, more in flight than published) ends
// the connection with virtqueue.ErrInvalidInflight.
//
// # Message handling
//
// One table (msgTable) describes every accepted request: name, exact
// payload size or a variable-size validator, fd rule, required protocol
// feature, explicit reply. The reader checks the header against it before
// reading the payload (payload ≤ 4096 bytes, so no allocation is sized by
// the peer), then the payload and the fd count, all before dispatch.
// Received fds are closed on every error path. Any malformed, unknown or
// out-of-state request ends the connection and the session's resources are
// released; only a refused SET_CONFIG keeps the session (non-zero
// REPLY_ACK status). Replies carry flags VERSION|REPLY exactly; REPLY_ACK
// acks are sent only when negotiated and requested with NEED_REPLY.
//
// # Config space and the write cache
//
// GET_CONFIG builds virtio_blk_config when asked, so capacity is the
// disk's size at that moment and writeback the current cache mode.
// SET_CONFIG may change only `writeback` (0 or 1, flags 0, CONFIG_WCE
// negotiated, every other byte as it is); anything else is refused
// without ending the session. The mode is a blk.WriteCache shared by every
// connection of one Serve (QEMU does not repeat SET_CONFIG after a
// reconnect): the control goroutine switches it, workers read it once per
// write request, after the write and before the status. Switching to
// write-through flushes the disk before the reply, so a write that read
// "write-back" is covered by that flush; from then on every OUT, DISCARD
// and WRITE_ZEROES is flushed before its completion is published.
//
// # Back-end request channel
//
// With BACKEND_REQ negotiated QEMU sends SET_BACKEND_REQ_FD, one end of a
// unix stream socketpair (anything else ends the connection; a second one
// replaces the first, which is closed). ConfigNotifier.NotifyConfigChange
// sends BACKEND_CONFIG_CHANGE_MSG on it, with NEED_REPLY when REPLY_ACK was
// negotiated, and waits for the ack. It runs on the caller's goroutine,
// never the control goroutine, because QEMU acks only after re-reading the
// config with GET_CONFIG on the main socket, which the control goroutine
// answers meanwhile. Who touches what: the control goroutine sets the
// channel (an atomic pointer) and closes it on replacement and at
// teardown; notifiers serialise on the channel's own mutex for one
// request and its ack; the notifier's current session is set and cleared
// under its mutex by the connection goroutine. Closing never takes the
// channel mutex, so a notifier stuck on a silent front-end is released by
// teardown or by its ctx; any failure on the channel (or a cancelled wait)
// closes it, so a late ack is never taken for the next request's.
//
// # Monitor and statistics
//
// Monitor.Status may be called from any goroutine. The connection
// goroutine publishes an immutable snapshot of the negotiated features
// and the rings it knows after each message (one atomic pointer store;
// status.go); Status reads that and the rings' enabled and broken atomics,
// never state the connection goroutine owns. With Options.Stats each
// worker's handler counts into Stats.Queue(its index) (blk/stats.go):
// atomic adds on the worker's own counters, nothing shared between queues.
//
// One Monitor may serve several sockets (Serve calls sharing Options):
// it keeps every connection being served with its socket, and Status
// reports each in Frontends, its top-level fields describing the active
// one (the RingGate's owner, else the last to connect).
//
// Monitor.Quiesce(f) takes Monitor.mu, drains the request gate of every
// session being served (drain.go: no queue pops another chain, and every
// request already popped has completed and had its used entry published),
// then takes each one's dispatch lock for writing and runs f; control
// messages wait too, until f returns. It is how the daemon swaps the disk under a running guest
// (blk.DiskRef, serve's checkpoint). Lock order: Monitor.mu before
// session.mu, sessions in attach order; the connection goroutine takes
// Monitor.mu (attach, detach) only while holding no session lock, and no
// goroutine but Quiesce holds two session locks.
//
// # Ring state machine (vhost-user spec "Ring states", vhost-user.md §1.6-1.7)
//
//	stopped ──SET_VRING_KICK──▶ started ──GET_VRING_BASE──▶ stopped
//	(needs memory, NUM, ADDR)   │  worker goroutine runs       (reply: next avail)
//	                            └─SET_VRING_KICK again: restart with the new fd
//
//	disabled ──SET_VRING_ENABLE 1──▶ enabled ──SET_VRING_ENABLE 0──▶ disabled
//	(SET_FEATURES without PROTOCOL_FEATURES enables every ring)
//
// A started ring is processed as soon as it starts, without waiting for a
// first kick; it is processed only while enabled. SET_VRING_NUM/ADDR/BASE
// are refused on a started ring. RESET_DEVICE and RESET_OWNER stop every
// ring and forget ring and feature state, keeping memory and protocol
// features.
//
// # Workers and locking
//
// NumQueues queues are offered (GET_QUEUE_NUM and the config's
// num_queues), by default MaxQueues = 256, the most SET_VRING_KICK's 8-bit
// index can address, so QEMU's default of one queue per vCPU (at most
// VIRTIO_QUEUE_MAX = 1024) works unless the guest has more than 256 vCPUs.
// A ring's state is created the first time a message names it, and its
// worker starts at SET_VRING_KICK: a queue the front-end never sets up
// costs one nil pointer. The per-queue worker set (ring.w) is read and
// written only by the control goroutine; workers never start or stop one
// another.
//
// Each started ring has one owner goroutine, which pops chains and runs
// the quick ones itself (blk.Quick: reads, and overwrites of allocated
// blocks in write-back mode), publishing them in runs of 16 so the
// front-end refills the ring while it goes on, and up to 32 executor
// goroutines for every other request (worker.go), so requests of one queue
// run in parallel (at most 64 in flight) and nothing quick waits behind a
// FLUSH or an allocating write. Nor behind a read of data on the disk: the
// owner runs reads with blk.Handler.TryHandle, and a read whose data is not
// in the page cache goes to an executor (request.cold), which reads it
// with HandleCold (blk coldread.go). With Options.PollWindow the owner, having found the
// ring empty, keeps looking at it for that long before it sleeps
// (pollRing: adaptive polling; on a VM whose idle vCPUs halt, each sleep
// costs a wake-up through the hypervisor), unless a request of the queue
// is at an executor (worker.atExecutors, derived from the executors
// started and those idle): then the next request mostly waits for that one. The kick eventfd is made
// non-blocking and wrapped with os.NewFile, so a parked Read costs no
// thread and Close unblocks it. SET_VRING_KICK, _CALL and
// _ERR accept only an eventfd, a pipe or a socket (fdkind.go: fstat's file
// type, and for anonymous inodes the /proc/self/fd link, which must be
// "anon_inode:[eventfd]"); anything else ends the connection with
// ErrInvalidMessage. A file or device such as /dev/zero reads without
// blocking and a timerfd or signalfd becomes readable with no front-end
// write, so as kick fds they would make the worker spin; as call fds a
// regular file would grow with every completion. The control path's own wake-up write to the kick fd
// (SET_VRING_ENABLE 1) never waits for the fd to become writable.
//
// Who touches what, and when:
//
//   - The ring (virtqueue.Queue: avail, descriptors, used ring, inflight
//     region) is touched only under the worker's qmu, with the dispatch
//     lock held for reading. The owner takes both to pop a batch (disable
//     notifications; Next up to 64 chains or until no request slot is
//     free; re-enable notifications and look again); a publisher takes
//     both to complete. The inflight region is thus updated in the order
//     the ring is: marked at Next, linked into the batch at AddUsed,
//     cleared after the used index is stored, for whatever order the
//     requests finish in.
//   - The request slots (min(64, queue size) per ring, each a reused
//     virtqueue.Chain) form a free list guarded by qmu: the owner takes
//     one per chain popped, the publisher returns it. A slot between the
//     two belongs to the one executor that runs it; an executor owns its
//     blk.Handler (not safe for concurrent use; the handlers of a queue
//     count into its blk.QueueStats with atomics).
//   - Completions: an executor appends its request to the worker's
//     completed list (doneMu) and, if qmu is free, publishes every
//     completion waiting there with AddUsed each, one Publish (one used
//     index store) and at most one call notification (NeedsNotification,
//     so EVENT_IDX and the suppression flags are honoured per batch). If
//     qmu is held, the holder publishes it before letting go (worker.unlockQ
//     re-checks after unlocking, so none is stranded). VIRTIO_F_IN_ORDER is
//     never offered: split used entries carry their head, packed used
//     descriptors their buffer id, and move the used position by the
//     completed chain's own length (virtqueue.PackedQueue.AddUsed).
//   - Guest memory: no lock is held while a request does I/O. The
//     session's request gate (drain.go) counts requests from pop to
//     publication; SET_MEM_TABLE, ADD/REM_MEM_REG and Monitor.Quiesce
//     drain it (no pop admitted, wait for the count to reach 0) before
//     taking the dispatch lock for writing, so the table a request's
//     slices point into is swapped and unmapped only when none is in
//     flight. Call and err fds, ring addresses and the dirty log are read
//     by publishers under the dispatch read lock, so SET_VRING_CALL waits
//     at most for a batch of pops or publishes, never for I/O.
//   - Stopping (GET_VRING_BASE, SET_VRING_KICK again, RESET_OWNER,
//     RESET_DEVICE, close): the owner pops nothing more and returns only
//     once every slot is back, i.e. every request popped has completed and
//     been published; then its executors end. GET_VRING_BASE therefore
//     reports a base with nothing in flight.
//   - Write-through mode is per request, inside blk.Handler: the flush
//     runs before the status is written and the request is handed to the
//     publisher (no write is quick in write-through mode, so that is
//     always on an executor).
//   - Requests recovered from the inflight region run one at a time in
//     their pop order, before any new request (see "Inflight tracking").
//
// The session goroutine handles control messages one at a time. The
// session's dispatch RWMutex is held for writing by the control path when it
// changes anything the ring owner or a publisher reads (memory table, a
// ring's queue, call/err fds, log state) and for reading by them while
// they pop or publish. There is no lock shared between sessions, and none
// between queues on the request path beyond that read lock.
//
// A request held for host space (serve --on-enospc wait, blk/nospace.go)
// keeps its worker inside the batch, and so the read lock: until space is
// back, control messages that need the write lock (SET_MEM_TABLE) and
// Monitor.Quiesce (a checkpoint, a resize) wait.
// Stopping the ring closes the worker's stop channel, which the handler
// watches: the held request is abandoned without a status and is not
// pushed to the used ring, so it stays in flight (and in the inflight
// region when the front-end set one up).
//
// A malformed descriptor chain is completed with used length 0 and reported
// through RequestFailed; the queue goes on. A ring-level error (guest broke
// the ring, or a SIGBUS from guest memory — workers run with
// debug.SetPanicOnFault and recover only runtime errors carrying a fault
// address) marks the queue broken: it is reported once through QueueBroken
// and the err eventfd, and the worker idles until the ring is stopped or
// reset.
//
// # Resources per connection
//
// Nothing is sized by a length the front-end or the guest sends without a
// cap. Per connection: one fixed message buffer (12 + 4096 bytes) and
// control buffer for 8 fds; a slot per offered queue (Options.NumQueues,
// fixed at Serve) and ring state for each ring a message named; per started ring one owner goroutine, up to 32 executor goroutines (started on demand, ended with the ring), its kick fd and
// at most one call and one err fd (a new one closes the old); at most one
// back-end channel socket (likewise), one dirty log mapping (≤ MaxLogSize,
// 1 GiB, replaced on each SET_LOG_BASE) and one log fd; per ring
// up to 64 reused descriptor-chain buffers (one per request slot) of at
// most queue size + 509 slices each (≤ 32768 + 509, about 800 KiB, only if
// the guest really sends such chains) and, with inflight tracking, a resubmit list and a batch list of
// at most queue size entries. Mappings: the guest memory regions (≤ 8
// from SET_MEM_TABLE, ≤ MaxMemSlots with ADD_MEM_REG; a region is unmapped
// when a table without it is installed) and the inflight buffer (≤ num_queues ×
// 512 KiB + a page, unmapped when replaced); both are the front-end's
// shared memory, not the daemon's heap. GET_INFLIGHT_FD keeps nothing.
// All of it is released when the connection ends, which
// TestThousandConnectionsOfEveryKindLeakNoFDsOrGoroutines and
// TestChurningFrontEndKeepsFDsAndHeapBounded check.
//
// # Not implemented
//
// Postcopy migration, device state transfer (DEVICE_STATE), the
// cross-host lock handoff (README "Live migration"), back-end
// requests other than CONFIG_CHANGE_MSG (the daemon's resize command
// calls NotifyConfigChange after growing the image), polling mode
// (SET_VRING_KICK with the no-fd flag is refused).
package vhostuser
