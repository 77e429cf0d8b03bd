package virtqueue

import "math"

// LogPageSize is the granule of the vhost dirty log: one bit per 4 KiB of
// guest-physical memory (vhost-user spec "Migration", VHOST_LOG_PAGE).
const LogPageSize = 4096

// DirtyLog is the front-end's dirty page bitmap (VHOST_USER_SET_LOG_BASE):
// bit page%8 of byte page/8 is set when the device has written guest
// physical page page = gpa/4096. Bits are set with atomic OR because the
// front-end clears them concurrently (QEMU exchanges whole words with
// zero). Any number of goroutines may mark concurrently. Pages beyond the
// bitmap are ignored: the front-end sizes the log for all of guest memory,
// so such a page is not guest RAM it migrates.
type DirtyLog struct {
	bits []byte
}

// NewDirtyLog wraps bits, a shared mapping owned by the caller. It must stay
// mapped while the DirtyLog is in use.
func NewDirtyLog(bits []byte) *DirtyLog { return &DirtyLog{bits: bits} }

// Len is the size of the bitmap in bytes.
func (l *DirtyLog) Len() int { return len(l.bits) }

// MarkGPA marks every page touching the guest-physical range [gpa, gpa+n).
// The walk is bounded by the bitmap size whatever n is.
func (l *DirtyLog) MarkGPA(gpa, n uint64) {
	if n == 0 || len(l.bits) == 0 {
		return
	}
	last := gpa + (n - 1)
	if last < gpa { // wraps: clip at the top of the address space
		last = math.MaxUint64
	}
	first := gpa / LogPageSize
	lastPage := last / LogPageSize
	limit := uint64(len(l.bits)) * 8 // pages the bitmap covers
	if first >= limit {
		return
	}
	if lastPage >= limit {
		lastPage = limit - 1
	}
	for p := first; p <= lastPage; {
		i := p / 8
		// Set every bit of this byte the range covers in one OR.
		hi := min(lastPage, i*8+7)
		mask := byte(0xff>>(7-(hi-p))) << (p % 8)
		atomicOrByte(l.bits, int(i), mask)
		p = hi + 1
	}
}

// MarkSlices marks the pages of bufs, host slices m handed out (a chain's
// Writable buffers). A slice that is not inside m's mappings is skipped: it
// cannot be guest memory of this table.
func (l *DirtyLog) MarkSlices(m *Memory, bufs [][]byte) {
	for _, b := range bufs {
		if gpa, ok := m.HostGPA(b); ok {
			l.MarkGPA(gpa, uint64(len(b)))
		}
	}
}

// UserGPA translates a front-end user address to the guest-physical
// address of the same byte.
func (m *Memory) UserGPA(uva uint64) (uint64, bool) {
	r := m.findUser(uva)
	if r == nil {
		return 0, false
	}
	return r.GuestPhysAddr + (uva - r.UserAddr), true
}
