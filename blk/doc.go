// Package blk implements virtio-blk request handling over lists of guest
// buffers. It knows nothing of descriptors or sockets: the caller hands it the
// device-readable and device-writable buffers of one request.
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
//	type Options struct {
//	    ReadOnly  bool
//	    Serial    string // GET_ID, at most 20 bytes
//	    NumQueues uint16
//	    SegMax    uint32
//	    SizeMax   uint32
//	}
//	func Features(o Options) uint64 // virtio-blk device feature bits to offer (without transport bits)
//	func Config(d Disk, o Options) []byte // struct virtio_blk_config, little-endian
//	type Handler struct{ ... }         // one per queue worker; not safe for concurrent use
//	func NewHandler(d Disk, o Options) *Handler
//	func (h *Handler) Handle(readable, writable [][]byte) (written uint32)
//	    // parses, executes, writes the status byte; written counts bytes written to the guest
//	func Status(err error) uint8 // the only error -> VIRTIO_BLK_S_* mapping
package blk
