package vhostuser

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// Inflight I/O tracking (vhost-user spec "Inflight I/O tracking",
// vhost-user.md §1.10). The back-end allocates a shared buffer with
// GET_INFLIGHT_FD: num_queues regions of virtqueue.InflightRegionSize
// (queue_size) bytes, one per queue, back to back from offset 0 of a
// sealed memfd. The front-end keeps the fd and hands it back with
// SET_INFLIGHT_FD on every (re)connection; the queues record in it which
// requests are in flight, so a back-end restarted after a crash finds and
// resubmits them (virtqueue/inflight.go has the split layout and the
// algorithms).

// inflightMap is the buffer mapped from SET_INFLIGHT_FD.
type inflightMap struct {
	mapping    []byte // the whole mmap()ed range, for munmap
	data       []byte // numQueues*regionSize bytes from mmap_offset
	numQueues  uint16
	queueSize  uint16
	regionSize uint64
	packed     bool // regions in the packed layout (VIRTIO_F_RING_PACKED acked)
}

// inflightRegionSize is one queue's region size in the layout the rings
// use: QEMU acks the features before GET_INFLIGHT_FD (vhost-user.md §1.10,
// vhost_dev_prepare_inflight) precisely so the back-end can size it.
func inflightRegionSize(queueSize uint16, packed bool) uint64 {
	if packed {
		return virtqueue.InflightPackedRegionSize(queueSize)
	}
	return virtqueue.InflightRegionSize(queueSize)
}

// checkInflightGeometry validates num_queues and queue_size of a GET or
// SET_INFLIGHT_FD request and returns the bytes the regions need.
func checkInflightGeometry(name string, m InflightMsg, maxQueues int, packed bool) (uint64, error) {
	if m.NumQueues == 0 || int(m.NumQueues) > maxQueues {
		return 0, fmt.Errorf("%s: num_queues %d not in 1..%d: %w", name, m.NumQueues, maxQueues, ErrInvalidMessage)
	}
	if m.QueueSize == 0 || m.QueueSize > MaxQueueSize {
		return 0, fmt.Errorf("%s: queue_size %d not in 1..%d: %w", name, m.QueueSize, MaxQueueSize, ErrInvalidMessage)
	}
	// ≤ 65535 × 1048640 bytes: no overflow.
	return uint64(m.NumQueues) * inflightRegionSize(m.QueueSize, packed), nil
}

// newInflightFD creates a zeroed buffer for the geometry in req and returns
// its fd and the reply payload. The memfd is sealed against growing and
// shrinking (libvhost-user vu_get_inflight_fd), so no later mapping of it
// can fault. The caller sends and then closes the fd; the back-end keeps
// nothing, so repeated requests leak nothing (CVE-2020-10726).
func newInflightFD(req InflightMsg, maxQueues int, packed bool) (int, InflightMsg, error) {
	size, err := checkInflightGeometry("GET_INFLIGHT_FD", req, maxQueues, packed)
	if err != nil {
		return -1, InflightMsg{}, err
	}
	fd, err := unix.MemfdCreate("vhost-vhdx-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, InflightMsg{}, fmt.Errorf("GET_INFLIGHT_FD: memfd_create: %v: %w", err, ErrUnsupported)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return -1, InflightMsg{}, fmt.Errorf("GET_INFLIGHT_FD: ftruncate %d: %v: %w", size, err, ErrUnsupported)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return -1, InflightMsg{}, fmt.Errorf("GET_INFLIGHT_FD: sealing: %v: %w", err, ErrUnsupported)
	}
	return fd, InflightMsg{MmapSize: size, MmapOffset: 0, NumQueues: req.NumQueues, QueueSize: req.QueueSize}, nil
}

// mapInflight validates a SET_INFLIGHT_FD request against its fd and maps
// the regions. Everything is checked before mapping: the geometry, that
// mmap_size covers the regions, that [mmap_offset, mmap_offset+mmap_size)
// lies inside the file without wrapping, and that the file is sealed
// against shrinking, so touching the mapping can never raise SIGBUS. Only
// the regions are mapped, from the page holding mmap_offset. The caller
// closes fd.
func mapInflight(m InflightMsg, fd int, maxQueues int, packed bool) (*inflightMap, error) {
	const name = "SET_INFLIGHT_FD"
	need, err := checkInflightGeometry(name, m, maxQueues, packed)
	if err != nil {
		return nil, err
	}
	if m.MmapSize < need {
		return nil, fmt.Errorf("%s: mmap_size %d < %d for %d queues of %d: %w", name, m.MmapSize, need, m.NumQueues, m.QueueSize, ErrInvalidMessage)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%s: fstat: %v: %w", name, err, ErrInvalidMessage)
	}
	if st.Size < 0 || m.MmapOffset > uint64(st.Size) || m.MmapSize > uint64(st.Size)-m.MmapOffset {
		return nil, fmt.Errorf("%s: mmap_offset %d + mmap_size %d beyond fd size %d: %w", name, m.MmapOffset, m.MmapSize, st.Size, ErrInvalidMessage)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		return nil, fmt.Errorf("%s: fd is not a memfd sealed against shrinking (seals %#x, %v); GET_INFLIGHT_FD hands out only sealed ones: %w",
			name, seals, err, ErrInvalidMessage)
	}
	page := uint64(unix.Getpagesize())
	start := m.MmapOffset &^ (page - 1)
	skip := m.MmapOffset - start
	length := skip + need // ≤ page + 128 MiB; start ≤ st.Size fits int64
	mapping, err := unix.Mmap(fd, int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s: mmap %d bytes at %d: %v: %w", name, length, start, err, ErrInvalidMessage)
	}
	return &inflightMap{
		mapping:    mapping,
		data:       mapping[skip:length:length],
		numQueues:  m.NumQueues,
		queueSize:  m.QueueSize,
		regionSize: inflightRegionSize(m.QueueSize, packed),
		packed:     packed,
	}, nil
}

// queue returns ring idx's region for a ring of num entries, or nil if the
// front-end did not size the buffer for that ring (it tracks only the
// queues it uses).
func (im *inflightMap) queue(idx int, num uint16, packed bool) ([]byte, error) {
	if im == nil || idx >= int(im.numQueues) {
		return nil, nil
	}
	if num > im.queueSize {
		return nil, fmt.Errorf("ring size %d > inflight queue_size %d: %w", num, im.queueSize, ErrInvalidMessage)
	}
	if packed != im.packed {
		return nil, fmt.Errorf("inflight buffer laid out for packed=%t rings, ring is packed=%t: %w", im.packed, packed, ErrState)
	}
	off := uint64(idx) * im.regionSize
	if packed {
		return im.data[off : off+virtqueue.InflightPackedMinSize(num)], nil
	}
	return im.data[off : off+virtqueue.InflightMinSize(num)], nil
}

func (im *inflightMap) unmap() {
	if im == nil || im.mapping == nil {
		return
	}
	_ = unix.Munmap(im.mapping)
	im.mapping, im.data = nil, nil
}
