package vhdx

import (
	"encoding/binary"
	"unsafe"
)

// pageBytes views a BAT page as the little-endian bytes of the on-disk BAT,
// so that loadBAT copies a stored page in one memmove instead of one atomic
// store (a locked XCHG on amd64) per entry. It returns nil where that view
// would not be the on-disk layout (a big-endian host); loadBAT then stores
// entry by entry.
//
// Safe because the page is not yet shared while loadBAT fills it: it is
// published afterwards with an atomic pointer store (batTable.setPage).
// The length is batPageEntries*8 exactly: atomic.Uint64 is one 8-byte word
// (checked).
func pageBytes(pg *batPage) []byte {
	if unsafe.Sizeof(pg[0]) != 8 || binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&pg[0])), batPageEntries*8)
}
