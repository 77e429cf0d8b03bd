package virtqueue

// Pointer arithmetic for the dirty log: the byte-wide atomic OR and the
// host-address to guest-physical translation of a slice.

import (
	"sync/atomic"
	"unsafe"
)

// atomicOrByte ORs mask into b[i] atomically. sync/atomic has no byte
// operations, so it ORs the 4-aligned word holding b[i] with mask shifted
// into place; the other three bytes are ORed with 0, i.e. unchanged. The
// word lies in the same page as b[i] (pages are 4-aligned), so it is mapped
// even when it reaches outside b.
func atomicOrByte(b []byte, i int, mask byte) {
	p := unsafe.Pointer(&b[i])
	off := uintptr(p) & 3
	shift := off * 8
	if !hostLittleEndian {
		shift = (3 - off) * 8
	}
	w := (*uint32)(unsafe.Add(p, -int(off)))
	atomic.OrUint32(w, uint32(mask)<<shift)
}

// HostGPA returns the guest-physical address of b[0] when b lies wholly in
// one region's mapping. The scan is linear in the regions (at most
// MaxRegions); it runs only while dirty logging is on.
func (m *Memory) HostGPA(b []byte) (uint64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	for i := range m.byGPA {
		r := &m.byGPA[i]
		base := uintptr(unsafe.Pointer(unsafe.SliceData(r.Data)))
		if p < base {
			continue
		}
		off := p - base
		if off < uintptr(len(r.Data)) && uintptr(len(b)) <= uintptr(len(r.Data))-off {
			return r.GuestPhysAddr + uint64(off), true
		}
	}
	return 0, false
}
