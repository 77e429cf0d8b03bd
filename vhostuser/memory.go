package vhostuser

import (
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// guestMem is one SET_MEM_TABLE worth of mappings.
type guestMem struct {
	mem  *virtqueue.Memory
	maps [][]byte // whole mmap()ed ranges, for munmap
}

// mapRegions maps each region's fd and builds the virtqueue.Memory. It does
// not close fds: the caller does, whether or not mapping succeeded (the
// mappings keep the memory alive, and an open memfd would expose guest RAM
// in procfs, style.md §0 item 12).
func mapRegions(regions []MemRegion, fds []int) (g *guestMem, err error) {
	g = &guestMem{}
	defer func() {
		if err != nil {
			g.unmap()
			g = nil
		}
	}()
	vr := make([]virtqueue.Region, 0, len(regions))
	for i, r := range regions {
		var st unix.Stat_t
		if err := unix.Fstat(fds[i], &st); err != nil {
			return nil, fmt.Errorf("SET_MEM_TABLE: region %d: fstat: %v: %w", i, err, ErrGuestMemory)
		}
		// ParseMemTable guarantees MmapOffset+Size does not wrap. Checking
		// it against the file size avoids mapping pages past EOF, which
		// would SIGBUS on first touch (vm-memory MappingPastEof).
		end := r.MmapOffset + r.Size
		if st.Size < 0 || end > uint64(st.Size) || end > math.MaxInt {
			return nil, fmt.Errorf("SET_MEM_TABLE: region %d: mmap_offset+memory_size %d beyond fd size %d: %w", i, end, st.Size, ErrGuestMemory)
		}
		// Map from offset 0 and skip mmap_offset ourselves, because mmap
		// offsets must be page (or huge page) aligned while mmap_offset
		// need not be (libvhost-user vu_set_mem_table_exec).
		//
		// The length is rounded up to the file's block size: on hugetlbfs
		// (st_blksize = the huge page size) mmap rounds it up itself, but
		// munmap fails with EINVAL unless given the rounded length, which
		// would leak the mapping on every table change. The bytes past
		// end are never reached: Data stops at end.
		mapLen := end
		if bs := uint64(st.Blksize); bs > 0 && bs&(bs-1) == 0 && bs <= 1<<30 {
			mapLen = (end + bs - 1) &^ (bs - 1) // end <= MaxInt: no wrap
		}
		if mapLen > math.MaxInt {
			return nil, fmt.Errorf("SET_MEM_TABLE: region %d: mapping of %d bytes too large: %w", i, mapLen, ErrGuestMemory)
		}
		data, err := unix.Mmap(fds[i], 0, int(mapLen), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
		if err != nil {
			return nil, fmt.Errorf("SET_MEM_TABLE: region %d: mmap %d bytes: %v: %w", i, mapLen, err, ErrGuestMemory)
		}
		g.maps = append(g.maps, data)
		// Keep guest RAM out of core dumps (go-fuse deviceregion.go).
		_ = unix.Madvise(data, unix.MADV_DONTDUMP)
		vr = append(vr, virtqueue.Region{
			GuestPhysAddr: r.GuestPhysAddr,
			UserAddr:      r.UserAddr,
			Data:          data[r.MmapOffset:end:end],
		})
	}
	mem, err := virtqueue.NewMemory(vr)
	if err != nil {
		return nil, fmt.Errorf("SET_MEM_TABLE: %v: %w", err, ErrGuestMemory)
	}
	g.mem = mem
	return g, nil
}

// unmap releases the mappings. Preconditions: no worker can reach g.mem
// any more (the dispatch lock was taken for writing after g was replaced).
func (g *guestMem) unmap() {
	if g == nil {
		return
	}
	for _, m := range g.maps {
		_ = unix.Munmap(m)
	}
	g.maps = nil
	g.mem = nil
}
