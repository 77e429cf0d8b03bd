package vhdx

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batBytes views the BAT entries array as the little-endian bytes of the
// on-disk BAT, so that loadBAT copies a chunk with non-zero entries in one
// memmove instead of one atomic store (a locked XCHG on amd64) per entry.
// It returns nil where that view would not be the on-disk layout (a
// big-endian host); loadBAT then stores entry by entry.
//
// Safe because the array is not yet shared while loadBAT fills it: the
// Image that publishes it is created after loadBAT returns. The length is
// len(a)*8 exactly: atomic.Uint64 is one 8-byte word (checked).
func batBytes(a []atomic.Uint64) []byte {
	if len(a) == 0 || unsafe.Sizeof(a[0]) != 8 || binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&a[0])), len(a)*8)
}

// releaseZeroPages gives back the whole pages inside b, which holds only
// zeros: a private anonymous page dropped with MADV_DONTNEED reads as zeros
// again, so nothing changes but the resident size. loadBAT reads the BAT
// straight into the entries array; a BAT written out as zeros (not sparse)
// must not make the array resident. Advice only: errors are ignored.
func releaseZeroPages(b []byte) { adviseWholePages(b, unix.MADV_DONTNEED) }

// adviseWholePages gives advice for the page-aligned part of b.
func adviseWholePages(b []byte, advice int) {
	page := uintptr(unix.Getpagesize())
	if uintptr(len(b)) < page {
		return
	}
	start := uintptr(unsafe.Pointer(&b[0]))
	first := (start+page-1)&^(page-1) - start
	last := (start+uintptr(len(b)))&^(page-1) - start
	if last > first {
		_ = unix.Madvise(b[first:last], advice)
	}
}
