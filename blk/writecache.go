package blk

import "sync/atomic"

// WriteCache is the device's write cache mode, the `writeback` field of
// virtio_blk_config that a driver may change when VIRTIO_BLK_F_CONFIG_WCE
// is negotiated (VIRTIO 1.2 §5.2.4, §5.2.5). One WriteCache is shared by
// every Handler of a device and by the code that answers config reads and
// writes; its methods are safe for concurrent use.
//
// In write-back mode (the zero value) a completed write is durable only
// after a later FLUSH completes. In write-through mode every write-type
// request (OUT, DISCARD, WRITE_ZEROES) is made durable with Disk.Flush
// before its status is written, so its completion is never published
// earlier (VIRTIO 1.2 §5.2.5 stability rule: writeback 0 throughout).
type WriteCache struct {
	writeThrough atomic.Bool
}

// SetWriteThrough switches the mode. A Handler reads the mode once per
// request, after the write and before the status: a write that read
// "write-back" finished its Disk write before the switch, so a Flush the
// caller issues after switching covers it.
func (c *WriteCache) SetWriteThrough(on bool) { c.writeThrough.Store(on) }

// WriteThrough reports the mode; a nil WriteCache is write-back.
func (c *WriteCache) WriteThrough() bool { return c != nil && c.writeThrough.Load() }

// Writeback is the config byte for the mode: 1 write-back, 0 write-through.
func (c *WriteCache) Writeback() uint8 {
	if c.WriteThrough() {
		return 0
	}
	return 1
}
