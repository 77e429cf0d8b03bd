// Package blk implements virtio-blk request handling over lists of guest
// buffers. It knows nothing of descriptors or sockets: the caller hands it the
// device-readable and device-writable buffers of one request, the way QEMU's
// block/export/virtio-blk-handler.c takes iovecs.
//
// Contract used by the other packages (owners keep it stable):
//
//	type Disk interface {
//	    ReadVec(bufs [][]byte, off int64) error  // fill bufs from byte offset off
//	    WriteVec(bufs [][]byte, off int64) error // write bufs at byte offset off
//	    Flush() error                            // durable, data then metadata
//	    Size() int64                             // virtual size in bytes
//	    LogicalSectorSize() uint32               // 512 or 4096
//	    PhysicalSectorSize() uint32              // 512 or 4096
//	}
//	// Optional upgrades found by type assertion; DISCARD / WRITE_ZEROES are
//	// offered and executed only when the Disk has them.
//	type Discarder interface{ Discard(off, n int64) error }
//	type WriteZeroer interface{ WriteZeroes(off, n int64, unmap bool) error }
//	type QuickWriter interface{ QuickWrite(off, n int64) bool } // hint: range allocated, no sync (classify.go)
//	func IsRead(readable [][]byte) bool                       // IN or GET_ID
//	func Quick(d Disk, o Options, readable [][]byte) bool     // read, or write-back overwrite the disk calls quick
//	type CachedReader interface {                             // reads that must not wait for the disk (coldread.go)
//	    ReadVecCached(bufs [][]byte, off int64) (bool, error) // false: not all in memory, nothing read
//	    ReadVecCold(bufs [][]byte, off int64) error           // read where waiting is fine
//	}
//	type Options struct {
//	    ReadOnly  bool
//	    Serial    string // GET_ID, at most 20 bytes (longer is truncated)
//	    NumQueues uint16 // 0 means 1
//	    SegMax    uint32 // 0 means DefaultSegMax
//	    SizeMax   uint32 // 0 means DefaultSizeMax
//	    Cache     *WriteCache // non-nil on a writable disk: offer CONFIG_WCE
//	}
//	type WriteCache struct{ ... } // writeback mode, shared by a device's handlers; safe for concurrent use
//	func (c *WriteCache) SetWriteThrough(on bool)
//	func (c *WriteCache) WriteThrough() bool // nil: false
//	func (c *WriteCache) Writeback() uint8   // config byte: 1 write-back, 0 write-through
//	const ConfigWriteback = 32               // offset of the only driver-writable config byte
//	    // write-through: OUT, DISCARD and WRITE_ZEROES call Disk.Flush before the status byte
//	func Features(d Disk, o Options) uint64 // virtio-blk device feature bits to offer (without transport bits)
//	func Config(d Disk, o Options) []byte   // struct virtio_blk_config, little-endian, ConfigSize bytes
//	type Handler struct{ ... }              // one per goroutine running requests; not safe for concurrent use
//	func NewHandler(d Disk, o Options) *Handler
//	func (h *Handler) Handle(readable, writable [][]byte) (written uint32)
//	    // parses, executes, writes the status byte; written counts bytes written
//	    // to the guest including the status byte; 0 when there is no writable
//	    // byte to carry a status (complete the chain with used length 0)
//	func (h *Handler) TryHandle(readable, writable [][]byte) (written uint32, done bool)
//	    // Handle for a ring owner: done false (no status, nothing counted) for a
//	    // read of a CachedReader whose data is not in memory
//	func (h *Handler) HandleCold(readable, writable [][]byte) uint32 // such a read, elsewhere
//	func (h *Handler) Err() error // why the last Handle did not complete OK; for logging
//	func Status(err error) uint8 // the only error -> VIRTIO_BLK_S_* mapping
//
//	// A full host file system (nospace.go; serve --on-enospc).
//	type NoSpacePolicy uint8 // NoSpaceReport (IOERR, the default) or NoSpaceWait
//	func ParseNoSpacePolicy(s string) (NoSpacePolicy, error) // "report", "wait"
//	type NoSpace struct{ ... } // Options.NoSpace: shared by a device's handlers; safe for concurrent use
//	func NewNoSpace(p NoSpacePolicy, notify func(NoSpaceEvent)) *NoSpace // notify: episode start and end
//	func (n *NoSpace) Snapshot() NoSpaceSnapshot // policy, waiting, since, episodes, held, reported
//	func IsNoSpace(err error) bool // the engine's clean, retryable vhdx.ErrNoSpace
//	func (h *Handler) SetStop(stop <-chan struct{}) // closed when the queue stops
//	    // wait: a write, write zeroes, discard or flush failing with ErrNoSpace
//	    // is retried (100 ms doubling to 1 s) inside Handle; when stop closes
//	    // Handle returns 0 with Err() wrapping ErrStopped and writes no status:
//	    // the caller must leave the request in flight (not push it used)
//
//	// Statistics (stats.go): per-queue counters, lock-free.
//	func NewStats(queues int) *Stats
//	func (s *Stats) Queue(i int) *QueueStats // created on first use; nil-safe
//	func (h *Handler) CountInto(q *QueueStats) // before the first Handle
//	func (s *Stats) Snapshot() (queues []QueueSnapshot, total QueueSnapshot)
//	    // ops, bytes and errors per request type (read, write, flush, get-id,
//	    // discard, write-zeroes, other), Disk.Flush calls, latency p50/p90/
//	    // p99/p99.9/max from a fixed log-linear histogram (4 buckets per
//	    // power of two of ns; a percentile is the bucket's upper bound).
//	    // Counts are exact; latency is timed for every slow request and a
//	    // random one in about 16 fast ones, weighted (statsample.go)
//	func (q *QueueSnapshot) IncludeBuckets() // sparse histograms in the reply
//	func Interval(cur, prev QueueSnapshot) QueueSnapshot // counts and percentiles between two snapshots
//
//	// A disk that can be replaced under a running device (diskref.go).
//	func NewDiskRef(d Disk) *DiskRef // forwards every call to the current disk (one atomic load)
//	func (r *DiskRef) Load() Disk
//	func (r *DiskRef) Swap(d Disk) (old Disk, err error) // caller quiesced all requests first;
//	    // ErrSwapMismatch unless sector sizes and Discard/WriteZeroes match
//	func (r *DiskRef) OnSwap(f func(old Disk)) // told of each disk a Swap retired
//
// A counting handler adds to its queue's counters with atomic adds and
// reads the clock twice per request; nothing allocates per request
// (BenchmarkHandleRead4KCounted beside BenchmarkHandleRead4K). Snapshot
// may run on any goroutine while handlers count: each counter is exact at
// some instant of the call.
package blk
