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
//	func (im *Image) Extents() ([]Extent, error) // Extent{Offset, Length, FileOffset int64; Data bool}
//	func Check(path string, repair bool) (*CheckReport, error) // for `vhost-vhdx check`
//
// Errors wrap one of the sentinels in errors.go.
package vhdx
