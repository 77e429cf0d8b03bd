package virtqueue

// This file holds every pointer cast of the package. Each helper first
// re-slices its argument to the exact width it accesses, so Go's bounds check
// runs before the cast (gVisor pipe_unsafe.go), and callers guarantee the
// alignment (NewSplitQueue checks the host addresses of the rings once).
// Under -race, -d=checkptr verifies both again.
//
// Ring fields are little-endian (VIRTIO 1.2 §2.7 "le16"/"le32"); the loads
// and stores here are native, so the results are byte-swapped on a
// big-endian host.

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
	"unsafe"
)

// hostLittleEndian is true on the platforms this daemon targets (amd64,
// arm64); it keeps the helpers correct on big-endian hosts as well.
var hostLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// hostAddr is the host virtual address of b[0], used only for alignment
// checks. b must not be empty.
func hostAddr(b []byte) uintptr {
	return uintptr(unsafe.Pointer(&b[:1][0]))
}

// atomicLoadLE32 loads the 4-aligned little-endian word at b[0:4] with one
// sync/atomic load (sequentially consistent, hence at least acquire).
func atomicLoadLE32(b []byte) uint32 {
	w := b[:4]
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(&w[0])))
	if !hostLittleEndian {
		v = bits.ReverseBytes32(v)
	}
	return v
}

// atomicStoreLE32 stores v as the 4-aligned little-endian word at b[0:4]
// with one sync/atomic store (sequentially consistent, hence at least
// release).
func atomicStoreLE32(b []byte, v uint32) {
	w := b[:4]
	if !hostLittleEndian {
		v = bits.ReverseBytes32(v)
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&w[0])), v)
}

// loadLE16 is a single 16-bit load of the 2-aligned field at b[0:2]. Go has
// no 16-bit atomics; an aligned 16-bit access is single-copy atomic on amd64
// and arm64, so the value is never torn. It carries no ordering of its own:
// callers bracket it with fullFence where the ring protocol needs ordering.
// Going through a pointer (rather than two byte loads) is what makes it one
// access.
func loadLE16(b []byte) uint16 {
	w := b[:2]
	v := *(*uint16)(unsafe.Pointer(&w[0]))
	if !hostLittleEndian {
		v = bits.ReverseBytes16(v)
	}
	return v
}

// storeLE16 is the store counterpart of loadLE16.
func storeLE16(b []byte, v uint16) {
	w := b[:2]
	if !hostLittleEndian {
		v = bits.ReverseBytes16(v)
	}
	*(*uint16)(unsafe.Pointer(&w[0])) = v
}
