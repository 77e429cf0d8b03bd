package vhostuser

import (
	"fmt"
	"math"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// mappedRegion is one guest memory region as the front-end described it,
// with our mapping of its fd.
type mappedRegion struct {
	wire MemRegion // as received (SET_MEM_TABLE entry or ADD_MEM_REG)
	m    []byte    // the whole mmap()ed range, for munmap
	data []byte    // m[mmap_offset : mmap_offset+size]
}

// guestMem is one memory table: the regions in force and the
// virtqueue.Memory built from them. A table is immutable; SET_MEM_TABLE,
// ADD_MEM_REG and REM_MEM_REG build a new one and swap it in under the
// dispatch lock (session.installMem). Mappings are owned by the table in
// force: a region kept across ADD/REM_MEM_REG is shared by the old and the
// new table and unmapped only when a table without it is installed.
type guestMem struct {
	mem     *virtqueue.Memory // nil when regions is empty
	regions []*mappedRegion
}

// mapRegion maps fd for r. It does not close fd: the caller does, whether
// or not mapping succeeded (the mapping keeps the memory alive, and an open
// memfd would expose guest RAM in procfs, style.md §0 item 12).
func mapRegion(r MemRegion, fd int) (*mappedRegion, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fstat: %v: %w", err, ErrGuestMemory)
	}
	// The parsers guarantee MmapOffset+Size does not wrap. Checking it
	// against the file size avoids mapping pages past EOF, which would
	// SIGBUS on first touch (vm-memory MappingPastEof).
	end := r.MmapOffset + r.Size
	if st.Size < 0 || end > uint64(st.Size) || end > math.MaxInt {
		return nil, fmt.Errorf("mmap_offset+memory_size %d beyond fd size %d: %w", end, st.Size, ErrGuestMemory)
	}
	// Map from offset 0 and skip mmap_offset ourselves, because mmap
	// offsets must be page (or huge page) aligned while mmap_offset need
	// not be (libvhost-user vu_set_mem_table_exec).
	//
	// The length is rounded up to the file's block size: on hugetlbfs
	// (st_blksize = the huge page size) mmap rounds it up itself, but
	// munmap fails with EINVAL unless given the rounded length, which would
	// leak the mapping on every table change. The bytes past end are never
	// reached: data stops at end.
	mapLen := end
	if bs := uint64(st.Blksize); bs > 0 && bs&(bs-1) == 0 && bs <= 1<<30 {
		mapLen = (end + bs - 1) &^ (bs - 1) // end <= MaxInt: no wrap
	}
	if mapLen > math.MaxInt {
		return nil, fmt.Errorf("mapping of %d bytes too large: %w", mapLen, ErrGuestMemory)
	}
	m, err := unix.Mmap(fd, 0, int(mapLen), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %v: %w", mapLen, err, ErrGuestMemory)
	}
	// Keep guest RAM out of core dumps (go-fuse deviceregion.go).
	_ = unix.Madvise(m, unix.MADV_DONTDUMP)
	return &mappedRegion{wire: r, m: m, data: m[r.MmapOffset:end:end]}, nil
}

func (mr *mappedRegion) unmap() {
	if mr != nil && mr.m != nil {
		_ = unix.Munmap(mr.m)
		mr.m, mr.data = nil, nil
	}
}

// newGuestMem builds a table from regions (which it does not map or
// unmap). An empty list gives a table with no memory.
func newGuestMem(regions []*mappedRegion) (*guestMem, error) {
	g := &guestMem{regions: regions}
	if len(regions) == 0 {
		return g, nil
	}
	vr := make([]virtqueue.Region, len(regions))
	for i, r := range regions {
		vr[i] = virtqueue.Region{GuestPhysAddr: r.wire.GuestPhysAddr, UserAddr: r.wire.UserAddr, Data: r.data}
	}
	mem, err := virtqueue.NewMemory(vr)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrGuestMemory)
	}
	g.mem = mem
	return g, nil
}

// mapRegions maps each region's fd and builds a table (SET_MEM_TABLE).
// The fds stay open (see mapRegion).
func mapRegions(regions []MemRegion, fds []int) (*guestMem, error) {
	var mapped []*mappedRegion
	fail := func(err error) (*guestMem, error) {
		for _, r := range mapped {
			r.unmap()
		}
		return nil, err
	}
	for i, r := range regions {
		mr, err := mapRegion(r, fds[i])
		if err != nil {
			return fail(fmt.Errorf("SET_MEM_TABLE: region %d: %w", i, err))
		}
		mapped = append(mapped, mr)
	}
	g, err := newGuestMem(mapped)
	if err != nil {
		return fail(fmt.Errorf("SET_MEM_TABLE: %w", err))
	}
	return g, nil
}

// empty reports whether the table has no memory (none yet, or every region
// removed).
func (g *guestMem) empty() bool { return g == nil || g.mem == nil }

// unmap releases every mapping of the table. Preconditions: no worker can
// reach g.mem any more (the dispatch lock was taken for writing after g
// was replaced) and no table in force shares a region with g.
func (g *guestMem) unmap() {
	if g == nil {
		return
	}
	for _, r := range g.regions {
		r.unmap()
	}
	g.regions = nil
	g.mem = nil
}

// without returns the regions of g that are not in keep, for unmapping
// after a swap.
func (g *guestMem) without(keep *guestMem) []*mappedRegion {
	if g == nil {
		return nil
	}
	var out []*mappedRegion
	for _, r := range g.regions {
		if keep == nil || !slices.Contains(keep.regions, r) {
			out = append(out, r)
		}
	}
	return out
}
