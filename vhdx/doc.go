// Package vhdx reads, writes, creates and checks VHDX images (MS-VHDX 8.0).
// It knows nothing of virtio.
//
// API contract used by blk/, vhostuser/ and cmd/ (owners keep it stable):
//
//	type OpenOptions struct {
//	    ReadOnly bool
//	    NoLock   bool // skip the file lock (inspection tools, tests)
//	    ReplayLogInMemory bool // read-only: replay a pending log in memory instead of refusing
//	}
//	func Open(path string, opts OpenOptions) (*Image, error)
//	func OpenStorage(s Storage, opts OpenOptions) (*Image, error) // no locking; tests, fault injection
//
//	type ImageType int // Dynamic, Fixed, Differencing; String() "dynamic", "fixed", "differencing"
//	type CreateOptions struct {
//	    Size               uint64    // virtual size in bytes, multiple of the logical sector size
//	    Type               ImageType // Dynamic or Fixed
//	    BlockSize          uint32    // 0: default chosen by size
//	    LogSize            uint32    // 0: 1 MiB; otherwise a multiple of 1 MiB
//	    LogicalSectorSize  uint32    // 0: 512
//	    PhysicalSectorSize uint32    // 0: 4096
//	    DiskID             uuid.UUID // zero: random (page 83 identifier)
//	    Creator            string    // file identifier creator string
//	}
//	func Create(path string, opts CreateOptions) error // refuses an existing path
//	func CreateStorage(s Storage, opts CreateOptions) error
//
//	func (im *Image) ReadAt(p []byte, off int64) (int, error)  // sector-aligned off and len(p)
//	func (im *Image) WriteAt(p []byte, off int64) (int, error)
//	func (im *Image) ReadVec(bufs [][]byte, off int64) error   // scatter/gather, zero copy
//	func (im *Image) WriteVec(bufs [][]byte, off int64) error  // (vector.go: one preadv/pwritev per run
//	                                                           // back to back in the file when the Storage
//	                                                           // has ReadvAt/WritevAt, as a file does)
//	func (im *Image) ReadVecCached(bufs [][]byte, off int64) (bool, error) // preadv2(RWF_NOWAIT): false when
//	                                                           // not all in the page cache (cachedread.go)
//	func (im *Image) ReadVecCold(bufs [][]byte, off int64) error // preadv, never the file view
//	func (im *Image) Flush() error // data then metadata durable (fdatasync)
//	func (im *Image) Close() error // flushes, clears the log GUID, unlocks
//	func (im *Image) Size() int64
//	func (im *Image) LogicalSectorSize() uint32
//	func (im *Image) PhysicalSectorSize() uint32
//	func (im *Image) BlockSize() uint32
//	func (im *Image) DiskID() uuid.UUID
//	func (im *Image) Info() Info           // JSON-tagged summary for `vhost-vhdx info`
//	func (im *Image) Counters() Counters   // allocations and journal commits since Open (atomic)
//	func (im *Image) HostIOErrors() HostIOErrors // host I/O error episodes (recover.go)
//	func (im *Image) Extents() ([]Extent, error) // Extent{Offset, Length, FileOffset int64; Data bool; Layer int}
//	func Check(path string, repair bool) (*CheckReport, error) // for `vhost-vhdx check`
//
// Differencing images (chain.go, locator.go, bitmap.go, diffwrite.go,
// rebase.go):
//
//	type OpenOptions struct { ...; DataWriteGUID uuid.UUID } // DataWriteGuid of this session's first data write
//	type CreateOptions struct { ...; ParentPath string }     // make a child of ParentPath
//	func Rebase(childPath, newParentPath string) error        // rewrite locator + linkage, no data touched
//	func (im *Image) Parent() *Image; Path() string; Depth() int
//	func (im *Image) BackingChain() []Info                   // top first; Info.ParentPath, Info.ParentLinkage
//	func (im *Image) SetParentLinkage(linkage, linkage2 uuid.UUID) error
//	func (im *Image) LayerExtents() ([]Extent, error)        // this file only; Extent.Layer
//
// Merging and inspecting chains (commit.go, chainfiles.go):
//
//	func Commit(childPath string, progress func(done, total int64)) error // child's layer into its parent, crash safe
//	func ChainFiles(path string) ([]string, error)           // the layers' files by locator, links not validated
//
// Commit opens its own Images (the child alone and its parent read-write,
// both with exclusive locks) and shares nothing with other callers.
//
// Live merge of an open chain's top into its parent (livemerge.go,
// livemerge_recover.go):
//
//	type LiveMergeOptions struct { Rate int64 }                      // bytes/s, 0 unbounded
//	func StartLiveMerge(top *Image, o LiveMergeOptions) (*LiveMerge, error) // top's I/O quiesced by the caller
//	func (m *LiveMerge) Run(ctx context.Context) error              // background copy; nil: Finish may follow
//	func (m *LiveMerge) Finish() (*Image, error)                    // final pass, top removed; the parent is the top
//	func (m *LiveMerge) Abandon() *Image                            // stop; the chain is served as it is
//	func (m *LiveMerge) Progress() MergeProgress                    // State, Done, Total, Recopied, DirtyBlocks, Rate
//	func (m *LiveMerge) Top(), Parent(), Current() *Image
//	// *LiveMerge is a blk.Disk with Discard and WriteZeroes: during a merge
//	// every I/O of the top goes through it (it marks the blocks written).
//
// A read-write Open of a child whose parent_linkage2 is set (an interrupted
// merge or commit) first replays its parent's log, so the chain opens again
// after a crash mid-merge, and then, if the parent's DataWriteGuid is
// parent_linkage2, makes it parent_linkage (linkage2 dropped).
//
// Thin provisioning (discard.go, space.go, epoch.go, prealloc.go,
// resize.go, compact.go, hostalloc.go):
//
//	func (im *Image) Discard(off, n int64) error                  // blk.Discarder
//	func (im *Image) WriteZeroes(off, n int64, unmap bool) error  // blk.WriteZeroer
//	type CreateOptions struct { ...; Preallocation Preallocation } // PreallocDefault/Off/Falloc/Full
//	func ParsePreallocation(s string) (Preallocation, error)        // "off", "falloc", "full"
//	func Resize(path string, newSize uint64, shrink bool) error     // offline
//	func Compact(path string, progress CompactProgress) (*CompactReport, error) // offline
//	Info.HostAllocatedBytes                                         // st_blocks*512, -1 unknown
//
// Opening (batload.go) costs O(BAT) time and nothing per entry on the
// heap: the BAT is read in 1 MiB chunks through one buffer, holes of a
// sparse file are not read, and a 4 KiB page of entries that are all
// NOT_PRESENT or all PAYLOAD_BLOCK_ZERO is not stored (battable.go), so a
// fresh 64 TiB image, ours or qemu-img's, opens with a few MiB resident.
// Overlaps are found with a bitmap of the file's MiBs. ChainFiles and
// Resize's refusal of a differencing image read no BAT (openMetadata).
//
// Concurrency. An Image is shared by the queues that serve it:
//
//   - The BAT (Image.bat) is a table of pages of atomics (battable.go); a
//     page is stored, with a compare-and-swap, on its first change.
//     Readers and writers into sectors already present load entries
//     without a lock. Entries change
//     only under Image.mu (allocation, bitmap updates), after the journal
//     commit that makes the change durable, and are published in an order
//     that keeps readers consistent: sector bitmap pages, then the bitmap
//     entry, then the payload entry.
//   - The sector bitmap cache (bitmapCache, one per differencing image) has
//     its own mutex, held only for a lookup (and the 4 KiB read of a
//     missed page); data I/O happens after it is released. Writers replace
//     a page's contents under it after their journal commit, while holding
//     Image.mu, so the bits readers see never run ahead of durable data.
//     Bounded: at most bitmapCachePages 4 KiB pages per image, LRU.
//   - Parent layers are Images opened read-only, owned by the child (Close
//     closes them) and never written; any number of readers walk down the
//     chain concurrently. The one exception is a live merge: the top's
//     parent is reopened read-write (exclusive lock) while I/O is quiesced,
//     and then written by the merge's single copier goroutine only in
//     sectors the top holds, which readers never read from the parent;
//     the parent's own Image rules (below) keep its allocations safe. The
//     LiveMerge's RWMutex is held for reading by each I/O through it and
//     for writing by Finish and Abandon, so no I/O is in flight when the
//     top is removed and the parent becomes the top. A read of a range NOT_PRESENT in the upper layers
//     costs one atomic load per layer and no system call until the layer
//     holding the data.
//   - First writes into blocks of a base image are group-committed
//     (groupcommit.go): each reserves its range under Image.mu, writes its
//     payload without it and joins the open batch; one member leads the
//     batch, commits its BAT sectors in one journal entry with Image.mu
//     released, and publishes the entries under Image.mu. While a leader
//     commits, every other journal user waits (lockJournal), so the journal
//     and the BAT snapshot it writes have one owner at a time.
//   - First writes into sectors a differencing image does not hold use the
//     same batches (diffgroup.go). Under Image.mu a member records its
//     sectors and reserves what its block lacks (a payload block, the
//     chunk's bitmap block) in the open batch — once per batch, shared by
//     the members that need it — and it writes its payload without the
//     lock, into sectors whose bits are clear (readers still get the
//     parent there). The batch (allocBatch.diff), its reservations
//     (allocGroup.pendPay, pendSB) and the members' records are under
//     Image.mu; only the leader reads them to build the entry, after every
//     member's payload write has returned (allocBatch.diff.writing), and
//     builds each bitmap page from its published contents. Writes that make
//     a block FULLY_PRESENT — covering the block, or into a block that
//     reads as zeros (ZERO, UNDEFINED, UNMAPPED) — are members of the same
//     batches (allocBatch.diff.full, allocGroup.pendFull): the first
//     reserves a fresh block (or keeps a PARTIALLY_PRESENT block's range),
//     later writes into that block in the same open batch write into it
//     too. A block is reserved by one batch at a time, for one kind of
//     change: a write that finds its block (or bitmap block) reserved by a
//     batch already taken by a leader, or by the open batch for the other
//     kind (a fresh block for a bitmap, where it would make the block
//     FULLY_PRESENT), waits for that batch and looks again. (Bitmap
//     members in a block the image holds partially reserve nothing: a
//     write making that block FULLY_PRESENT may be in the next batch while
//     theirs commits; its entry comes later and covers their data, synced
//     before it.) WriteVec gathers a first write's segments, so it joins
//     once per block. No writer
//     holds Image.mu across an fdatasync. Writes into sectors the image
//     holds, and reads, take no lock and never wait for a sync.
//   - Concurrent Syncs (Flush, journal commits) share one fdatasync that
//     started after the last of them arrived (syncGroup in syncLatch).
//   - Discard and WriteZeroes zero parts of blocks lock-free (hole punch or
//     ZERO_RANGE into the loaded entry's range) and take Image.mu only to
//     commit a batch of whole-block BAT changes; the ranges those blocks
//     owned become free (space.go, under Image.mu).
//   - Freed file space is reused by later allocations, so an entry loaded
//     without a lock may point to a range that is no longer its block's.
//     Every data I/O registers in an epoch for its duration (epoch.go: two
//     atomic counters, nobody waits); a freed range is handed out only when
//     every I/O that began before the free has finished, and it is punched
//     when handed out, so a late write of such an I/O never shows in the
//     new block. Close (which must not race with I/O) cuts a free tail off
//     the file after LogGuid is cleared.
//   - The file view (fileview.go): reads of up to 4 KiB of allocated
//     payload (ReadVec's runs, each layer's payload reads) are copied out
//     of a read-only MAP_SHARED mapping of the file instead of a pread. The first reader maps it (sync.Once); readers
//     only load the slice; Close unmaps it. A page past the file's end or
//     one the disk cannot read faults (SIGBUS); the copy recovers that
//     fault (debug.SetPanicOnFault) and the run is read again with preadv,
//     which reports the error as it always did.
//
// Durability order. virtio-blk promises durability at FLUSH only (and after
// every write in write-through mode, where a Flush follows it); a SIGKILL of
// the daemon must still never lose an acknowledged write, and a power cut
// never a flushed one nor leave torn metadata. The rules:
//
//  1. A write is acknowledged once its data has been written to the file
//     and, for a first write into a block, the journal entry holding the
//     block's BAT entry is durable and the entry is published in memory.
//     After a SIGKILL the data is in the page cache and the entry in the
//     log, which the next open replays (§2.3.3).
//  2. Before a journal entry becomes durable, what it depends on is: the
//     zeroing of a reused range (space.go), the file growth up to its
//     FlushedFileOffset (§2.3.1.1: the size "stable on the host disk"), and
//     the in-place updates of the previous entry. So a durable BAT entry
//     never points to another block's old data. Every commit syncs first,
//     except an allocation batch (journal.commitBatch) that reuses no
//     range: its FlushedFileOffset is the size made durable by the
//     previous batch's entry sync, and it holds the previous batch's BAT
//     sectors again (rule 4). A differencing image's commits always sync
//     first, which also makes the payload of every member of a batch
//     durable before the entry that sets its sectors' bitmap bits or
//     makes its block FULLY_PRESENT.
//  3. The entry itself is flushed before any of its updates is written in
//     place (§2.3: metadata changes reach their final location only after
//     their log entry is on stable storage).
//  4. In-place writes of an allocation batch (a base image's, or a
//     differencing image's: bitmap pages and BAT sectors, diffgroup.go)
//     are not synced on their own (commitBatch): the entry stays the
//     newest in the log, its own tail (§2.3.2), so a power cut replays it
//     (§2.3.3) and rewrites those sectors whole, repairing a torn one. The
//     next entry then either follows a sync or holds the same sectors
//     again with their current contents: torn, the previous entry is still
//     the newest valid one; whole, it restores them itself. Its own sync
//     makes the earlier in-place writes durable. A bridge entry
//     (journal.go) holds nothing, so a sync precedes it. Flush and Close
//     sync too.
//  5. Flush returns after an fdatasync that started after Flush was called
//     (syncGroup), after committing queued trims (discard.go): every write
//     acknowledged before it, its data, its journal entry and the deferred
//     in-place updates, is then durable.
//  6. A base image's payload need not be durable before its batch entry:
//     a power cut before the next Flush may lose it, and the block then
//     reads zeros there, which is what it read before (an unallocated
//     block of a base image, or a reused range, zeroed per rule 2). A
//     differencing image's sectors show the parent until their bits are
//     set, or until the entry that makes their block FULLY_PRESENT (a
//     ZERO block shows zeros until then), so their data must be durable
//     before that entry: its batches (diffgroup.go) run every member's
//     payload write, then one sync, the entry, its sync, the deferred
//     in-place writes, and publish (bitmap pages, bitmap entries, payload
//     entries) before any member is acknowledged. A power cut then leaves
//     each sector's bit clear (the parent) or set over durable data, and
//     each block made whole in its old state or FULLY_PRESENT over
//     durable data, never showing zeros where the parent had data.
//  7. Every member of a failed batch gets the error and its entries stay
//     unpublished, and the space it reserved is given back when no entry
//     can name it (nospace.go). A differencing batch's member whose own
//     payload write failed leaves the batch before its entry is built: it
//     alone gets its error, its bits are not set (or its block is not made
//     FULLY_PRESENT, and a fresh block nobody else wrote is given back),
//     the others commit. What a failed fdatasync or journal commit means for later
//     ones is in "Host I/O errors" below.
//
// Host I/O errors (EIO from the file: storage.go syncLatch, logrecover.go,
// recover.go). The rules, in the order they apply:
//
//  1. A failed read or write of guest data fails that request (the guest
//     sees VIRTIO_BLK_S_IOERR, blk.Status) and changes nothing else: no
//     state is latched, the next request runs as usual. A failed write
//     leaves its range undefined (old or new data), as on any disk.
//  2. A failed fdatasync fails the call that issued it (a guest Flush, a
//     journal commit, a header update). Linux then marks the dirty pages
//     clean, so writes completed before it may never reach the disk while
//     the next fdatasync succeeds (QEMU's file-posix therefore fails every
//     later flush; PostgreSQL panics). What happens next depends on what
//     was at risk, which the latch knows: did guest data written in place
//     (into blocks the guest can read back) complete since the last sync
//     began, or during the failed one?
//  3. If so, that data cannot be re-created: every later Flush (and every
//     sync, so every allocation) fails, saying so, until the image is
//     reopened (the daemon restarted). A successful flush after it would
//     tell the guest that lost writes are durable. Data the guest saw
//     flushed before the failure is durable; only writes acknowledged since
//     the last successful flush may be lost, which virtio allows.
//  4. If not, only metadata was at risk (the journal's entry and in-place
//     updates, a header copy; data in a block not yet published in the BAT
//     belongs to the request that failed). An episode opens: the next Flush
//     fails unless it reaches a recovery point first, and it tries: the
//     journal's failed commit is compensated (rule 5), both headers are
//     written again from memory (§2.2.2.1 order) and a sync succeeds with
//     no failure since the recovery began. Then that Flush succeeds and so
//     do later ones, without a reopen. Internal syncs go on meanwhile: the
//     log and the two-copy header update keep the file consistent by
//     themselves.
//  5. A journal commit that fails after it may have written the file (the
//     entry, the apply, either sync) leaves the journal pending; memory
//     keeps the metadata from before the commit. The next commit, Flush or
//     Close first reads the log back: its newest valid entry must be the
//     last one this journal wrote, or the failed entry itself. It then
//     commits a compensating entry holding the failed commit's targets as
//     they were before it (read just before the apply), which makes the
//     failed entry obsolete. A failure during this is pending again, with
//     the original contents; an I/O error while reading the log back is
//     retried at the next attempt.
//  6. Recovery is not safe, and the journal goes offline, when the log does
//     not read back as this process left it, or a failed commit zeroed
//     ranges (zero descriptors) whose old contents were not kept. Every
//     allocation and Flush then fails with ErrCorrupt and the message "stop
//     using it and run `vhost-vhdx check --repair IMAGE`"; in-place writes
//     still work but can never be flushed. Close keeps LogGuid, so the next
//     open (or check --repair) replays the log: the image shows the
//     metadata of the last commit that reached the log, which is either the
//     one before the failure or the failed one, never a mix.
//
// Image.HostIOErrors reports the episodes (how many, recovered, lost,
// journal offline) for the control socket.
//
// Concurrency of the latch: its state is under syncLatch.mu, which
// serialises every fdatasync; dirty is an atomic flag set by lock-free data
// writers after their pwrite and cleared by each sync as it starts.
// Recovery runs under Image.mu, like every journal commit.
//
// Errors wrap one of the sentinels in errors.go; errors from the file
// (EIO, ENOSPC) are wrapped with context and keep their errno.
package vhdx
