package frontend

import (
	"sync/atomic"
	"unsafe"
)

// The driver and device share ring index words across processes (or, in
// tests, across two mappings of one memfd). They are accessed with 32-bit
// atomics on the aligned word that contains them: Go has no 16-bit atomics
// and its atomics are sequentially consistent, which gives the barriers of
// VIRTIO 1.2 §2.7.13 (publish buffer, then idx; read idx, then entries).

// word32 returns the aligned 32-bit word at b[off:off+4]. off must be a
// multiple of 4 and b's base 4-aligned (mmap returns page-aligned memory).
func word32(b []byte, off int) *uint32 {
	w := b[off : off+4 : off+4] // bounds check before the cast
	return (*uint32)(unsafe.Pointer(&w[0]))
}

func load32(b []byte, off int) uint32 { return atomic.LoadUint32(word32(b, off)) }

func store32(b []byte, off int, v uint32) { atomic.StoreUint32(word32(b, off), v) }

// load16 atomically reads the little-endian u16 at off (2-aligned).
func load16(b []byte, off int) uint16 {
	return uint16(load32(b, off&^3) >> (8 * (off & 2)))
}

// store16 atomically replaces the little-endian u16 at off (2-aligned),
// leaving the other half of its word unchanged. Only the driver writes
// these words, so the CAS loop ends after one pass unless preempted.
func store16(b []byte, off int, v uint16) {
	p := word32(b, off&^3)
	shift := 8 * uint(off&2)
	for {
		old := atomic.LoadUint32(p)
		nw := old&^(0xffff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(p, old, nw) {
			return
		}
	}
}
