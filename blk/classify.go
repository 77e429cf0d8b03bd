package blk

import "encoding/binary"

// IsRead reports whether the request whose device-readable buffers are
// readable is an IN or a GET_ID: it changes nothing on the disk, so it
// never waits for an allocation or a sync. A queue runs such requests
// inline and hands the others to goroutines of their own (vhostuser
// worker.go), so a read never queues behind a FLUSH or an allocating
// write. A header too short to hold the type (split after fewer than 4
// bytes, or missing) says false: Handle will judge it.
func IsRead(readable [][]byte) bool {
	if len(readable) == 0 || len(readable[0]) < hdrType+4 {
		return false
	}
	t := binary.LittleEndian.Uint32(readable[0][hdrType:])
	return t == TypeIn || t == TypeGetID
}
