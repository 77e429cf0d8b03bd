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
//	func (im *Image) WriteVec(bufs [][]byte, off int64) error
//	func (im *Image) Flush() error // data then metadata durable (fdatasync)
//	func (im *Image) Close() error // flushes, clears the log GUID, unlocks
//	func (im *Image) Size() int64
//	func (im *Image) LogicalSectorSize() uint32
//	func (im *Image) PhysicalSectorSize() uint32
//	func (im *Image) BlockSize() uint32
//	func (im *Image) DiskID() uuid.UUID
//	func (im *Image) Info() Info           // JSON-tagged summary for `vhost-vhdx info`
//	func (im *Image) Counters() Counters   // allocations and journal commits since Open (atomic)
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
// heap: the BAT is read in 1 MiB chunks straight into the entries array,
// holes of a sparse file are not read and zero entries never stored (a
// fresh 64 TiB image opens with a few MiB resident), and overlaps are found
// with a bitmap of the file's MiBs. ChainFiles and Resize's refusal of a
// differencing image read no BAT (openMetadata).
//
// Concurrency. An Image is shared by the queues that serve it:
//
//   - The BAT (Image.bat) is an array of atomics. Readers and writers into
//     sectors already present load entries without a lock. Entries change
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
//     chain concurrently. A read of a range NOT_PRESENT in the upper layers
//     costs one atomic load per layer and no system call until the layer
//     holding the data.
//   - Writes into sectors a differencing image does not hold take Image.mu
//     (serialising bitmap updates, so writers into different sectors of
//     one block are safe together); writes into sectors it holds do not.
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
//
// Errors wrap one of the sentinels in errors.go.
package vhdx
