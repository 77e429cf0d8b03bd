package virtqueue

import (
	"fmt"
	"math"
	"slices"
)

// MaxRegions is the largest region table NewMemory accepts. It matches the
// slot count libvhost-user and rust-vmm report for
// VHOST_USER_GET_MAX_MEM_SLOTS (509), so a front-end that respects the value
// the back-end advertises can never hit it.
const MaxRegions = 509

// Region is one guest memory region as described by VHOST_USER_SET_MEM_TABLE
// or VHOST_USER_ADD_MEM_REG, already mapped by the caller.
type Region struct {
	GuestPhysAddr uint64 // guest-physical start address
	UserAddr      uint64 // the front-end's virtual address of the same memory
	Data          []byte // our mapping; len(Data) is the region size
}

// end returns the exclusive end of r in guest-physical space. NewMemory has
// checked that it does not wrap.
func (r *Region) end() uint64 { return r.GuestPhysAddr + uint64(len(r.Data)) }

// userEnd returns the exclusive end of r in front-end user space.
func (r *Region) userEnd() uint64 { return r.UserAddr + uint64(len(r.Data)) }

// Memory translates guest-physical addresses (descriptor addr fields) and
// front-end user addresses (ring addresses from VHOST_USER_SET_VRING_ADDR,
// vhost-user spec "Memory access") to host slices.
//
// A Memory is immutable once built, so any number of goroutines may use it
// concurrently; the vhostuser layer builds a new one on every table change
// and swaps it atomically (vm-memory GuestMemoryAtomic). No method panics,
// whatever address or length it is given.
type Memory struct {
	byGPA  []Region // sorted by GuestPhysAddr, no overlap
	byUser []Region // the same regions sorted by UserAddr, no overlap
}

// NewMemory validates regions and builds a Memory. The slice is copied; the
// Data mappings are shared, not copied. Invariants checked once here and
// relied on by every lookup (vm-memory from_arc_regions): at least one and at
// most MaxRegions regions, every region non-empty, neither address range
// wraps around 2^64, and no two regions overlap in guest-physical space or in
// user space (vhost-user spec: "GPA ranges and user-address ranges of active
// regions never overlap").
func NewMemory(regions []Region) (*Memory, error) {
	if len(regions) == 0 {
		return nil, fmt.Errorf("%w: no regions", ErrInvalidMemory)
	}
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("%w: %d regions, at most %d allowed", ErrInvalidMemory, len(regions), MaxRegions)
	}
	for i := range regions {
		r := &regions[i]
		size := uint64(len(r.Data))
		if size == 0 {
			return nil, fmt.Errorf("%w: region %d at guest address %#x has size 0", ErrInvalidMemory, i, r.GuestPhysAddr)
		}
		if r.GuestPhysAddr > math.MaxUint64-size {
			return nil, fmt.Errorf("%w: region %d: guest address %#x + size %#x wraps", ErrInvalidMemory, i, r.GuestPhysAddr, size)
		}
		if r.UserAddr > math.MaxUint64-size {
			return nil, fmt.Errorf("%w: region %d: user address %#x + size %#x wraps", ErrInvalidMemory, i, r.UserAddr, size)
		}
	}
	m := &Memory{
		byGPA:  slices.Clone(regions),
		byUser: slices.Clone(regions),
	}
	slices.SortFunc(m.byGPA, func(a, b Region) int { return cmpU64(a.GuestPhysAddr, b.GuestPhysAddr) })
	slices.SortFunc(m.byUser, func(a, b Region) int { return cmpU64(a.UserAddr, b.UserAddr) })
	for i := 1; i < len(m.byGPA); i++ {
		prev, cur := &m.byGPA[i-1], &m.byGPA[i]
		if prev.end() > cur.GuestPhysAddr {
			return nil, fmt.Errorf("%w: guest range [%#x, %#x) overlaps [%#x, %#x)",
				ErrInvalidMemory, prev.GuestPhysAddr, prev.end(), cur.GuestPhysAddr, cur.end())
		}
	}
	for i := 1; i < len(m.byUser); i++ {
		prev, cur := &m.byUser[i-1], &m.byUser[i]
		if prev.userEnd() > cur.UserAddr {
			return nil, fmt.Errorf("%w: user range [%#x, %#x) overlaps [%#x, %#x)",
				ErrInvalidMemory, prev.UserAddr, prev.userEnd(), cur.UserAddr, cur.userEnd())
		}
	}
	return m, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Regions returns a copy of the region table, sorted by guest-physical
// address.
func (m *Memory) Regions() []Region { return slices.Clone(m.byGPA) }

// findGPA returns the region containing gpa, or nil. Binary search over the
// sorted, non-overlapping table: the last region starting at or below gpa is
// the only candidate.
func (m *Memory) findGPA(gpa uint64) *Region {
	lo, hi := 0, len(m.byGPA) // invariant: regions [0,lo) start <= gpa, [hi,n) start > gpa
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if m.byGPA[mid].GuestPhysAddr <= gpa {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		return nil
	}
	r := &m.byGPA[lo-1]
	if gpa >= r.end() {
		return nil
	}
	return r
}

// findUser is findGPA for front-end user addresses.
func (m *Memory) findUser(uva uint64) *Region {
	lo, hi := 0, len(m.byUser)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if m.byUser[mid].UserAddr <= uva {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		return nil
	}
	r := &m.byUser[lo-1]
	if uva >= r.userEnd() {
		return nil
	}
	return r
}

// span returns the host bytes from gpa to the end of the region holding it.
// The result is never empty on success. Its capacity is clipped so that an
// append by a caller can never write into a neighbouring mapping.
func (m *Memory) span(gpa uint64) ([]byte, bool) {
	r := m.findGPA(gpa)
	if r == nil {
		return nil, false
	}
	off := gpa - r.GuestPhysAddr // < len(r.Data), so it fits an int
	return r.Data[off:len(r.Data):len(r.Data)], true
}

// checkRange reports whether [gpa, gpa+n) is entirely backed by regions,
// without building slices. The walk visits at most len(regions) regions
// because each step either finishes or consumes the rest of one region.
func (m *Memory) checkRange(gpa, n uint64) error {
	if n == 0 {
		return nil
	}
	if gpa > math.MaxUint64-n {
		return fmt.Errorf("%w: guest range %#x + %#x wraps", ErrGuestAddress, gpa, n)
	}
	cur, left := gpa, n
	for left > 0 {
		s, ok := m.span(cur)
		if !ok {
			return fmt.Errorf("%w: guest address %#x (in range [%#x, %#x)) is not in any region",
				ErrGuestAddress, cur, gpa, gpa+n)
		}
		take := min(left, uint64(len(s)))
		cur += take
		left -= take
	}
	return nil
}

// GuestSlices appends to dst host slices that together cover the
// guest-physical range [gpa, gpa+n), in order, and returns the extended
// slice. A range that crosses from one region into another region contiguous
// in guest-physical space yields one slice per region (vm-memory
// get_slices). If any byte of the range is unmapped it returns dst unchanged
// (length as passed in) and an error wrapping ErrGuestAddress that names the
// first unmapped address. n == 0 appends nothing and succeeds.
//
// It does not allocate when dst has enough spare capacity. Each appended
// slice has its capacity clipped to its length.
func (m *Memory) GuestSlices(dst [][]byte, gpa uint64, n uint32) ([][]byte, error) {
	if n == 0 {
		return dst, nil
	}
	if gpa > math.MaxUint64-uint64(n) {
		return dst, fmt.Errorf("%w: guest range %#x + %#x wraps", ErrGuestAddress, gpa, n)
	}
	orig := len(dst)
	cur, left := gpa, uint64(n)
	for left > 0 {
		s, ok := m.span(cur)
		if !ok {
			return dst[:orig], fmt.Errorf("%w: guest address %#x (in range [%#x, %#x)) is not in any region",
				ErrGuestAddress, cur, gpa, gpa+uint64(n))
		}
		take := min(left, uint64(len(s)))
		dst = append(dst, s[:take:take])
		cur += take
		left -= take
	}
	return dst, nil
}

// ReadGuest copies len(p) bytes starting at guest-physical address gpa into
// p. The range may span regions. On error nothing useful is in p.
func (m *Memory) ReadGuest(p []byte, gpa uint64) error {
	if err := m.checkRange(gpa, uint64(len(p))); err != nil {
		return err
	}
	cur := gpa
	for len(p) > 0 {
		s, _ := m.span(cur) // checkRange proved every byte mapped
		k := copy(p, s)
		p = p[k:]
		cur += uint64(k)
	}
	return nil
}

// WriteGuest copies p to guest-physical address gpa. The range may span
// regions. The whole range is checked before the first byte is written, so
// an error means guest memory is unchanged.
func (m *Memory) WriteGuest(p []byte, gpa uint64) error {
	if err := m.checkRange(gpa, uint64(len(p))); err != nil {
		return err
	}
	cur := gpa
	for len(p) > 0 {
		s, _ := m.span(cur)
		k := copy(s, p)
		p = p[k:]
		cur += uint64(k)
	}
	return nil
}

// UserSlice returns the host bytes of the front-end user range [uva, uva+n)
// as one slice. Ring structures are addressed this way (vhost-user spec "A
// vring address description") and must lie inside a single region, since
// the queue accesses them as contiguous memory. The capacity of the result is
// clipped to n.
func (m *Memory) UserSlice(uva uint64, n uint64) ([]byte, error) {
	if uva > math.MaxUint64-n {
		return nil, fmt.Errorf("%w: user range %#x + %#x wraps", ErrGuestAddress, uva, n)
	}
	r := m.findUser(uva)
	if r == nil {
		return nil, fmt.Errorf("%w: user address %#x is not in any region", ErrGuestAddress, uva)
	}
	off := uva - r.UserAddr
	if n > uint64(len(r.Data))-off {
		return nil, fmt.Errorf("%w: user range [%#x, %#x) runs past the end of its region at %#x",
			ErrGuestAddress, uva, uva+n, r.userEnd())
	}
	return r.Data[off : off+n : off+n], nil
}
