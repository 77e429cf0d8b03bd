package virtqueuetest

// Pointer casts of the mock driver: the atomic accesses to the ring index
// words, which must match the device's (virtqueue/ring_unsafe.go) so that
// the race detector sees the same synchronization a real guest provides, and
// the address comparison behind Contains.

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
	"unsafe"
)

var hostLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

func hostAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[:1][0])) }

func loadLE32(b []byte) uint32 {
	w := b[:4]
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(&w[0])))
	if !hostLittleEndian {
		v = bits.ReverseBytes32(v)
	}
	return v
}

func storeLE32(b []byte, v uint32) {
	w := b[:4]
	if !hostLittleEndian {
		v = bits.ReverseBytes32(v)
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&w[0])), v)
}
