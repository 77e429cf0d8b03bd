package vhostuser

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// Dirty logging for live migration (vhost-user spec "Migration",
// vhost-user.md §1.9). The front-end offers a bitmap with SET_LOG_BASE
// (LOG_SHMFD: a shared memory fd, mmap_size and mmap_offset) and turns
// logging on by acking VHOST_F_LOG_ALL in SET_FEATURES and setting
// VHOST_VRING_F_LOG in each ring's SET_VRING_ADDR flags; QEMU does both on
// running rings when migration starts, and SET_LOG_BASE again whenever guest
// memory grows. While logging is on, every byte the back-end writes into
// guest memory marks its 4 KiB guest-physical page with an atomic OR
// (virtqueue.DirtyLog), after the write:
//   - the device-writable buffers of each completed chain (read data and
//     the status byte; all of them, a superset of what was written), marked
//     before the used entry is published;
//   - the rings' device-written parts, marked at the end of each batch: the
//     split used ring (flags, idx, entries, avail_event: 6+8·size bytes at
//     log_guest_addr when VHOST_VRING_F_LOG is set, else at the
//     guest-physical address of the used ring's user address), or for a
//     packed ring the descriptor ring (used descriptors are written back
//     there) and the device event suppression area.
//
// Marking after the write matters: QEMU reads and clears the bitmap while
// the guest runs, so a mark set before the write could be cleared before
// the page changed. GET_VRING_BASE stops a ring after its batch completed,
// so every mark of a stopped ring is in the bitmap before the reply; QEMU
// syncs the log after stopping the rings.
//
// Cost when off: the worker tests one pointer (session.logging, nil unless
// LOG_ALL is acked and a log is mapped) per chain and per batch
// (BenchmarkWorkerDirtyLog).
//
// Who touches what: the control goroutine maps and replaces the log and
// sets logging, the ring's addr and the log fd under the dispatch lock held
// for writing; workers read them under the read lock. A replaced log is
// unmapped after the swap, when no worker can be inside it. A front-end
// that truncates its log memfd makes the next mark fault: the worker's
// fault handling breaks that queue only.
//
// SET_LOG_FD (optional; QEMU does not send it) takes an eventfd that is
// signalled after a batch marked pages, as the kernel's vhost does with its
// log eventfd.

// MaxLogSize bounds SET_LOG_BASE's mmap_size: 1 GiB of bitmap covers 32 TiB
// of guest-physical address space.
const MaxLogSize = 1 << 30

// logMap is one SET_LOG_BASE mapping.
type logMap struct {
	mapping []byte
	log     *virtqueue.DirtyLog
}

func (lm *logMap) unmap() {
	if lm != nil && lm.mapping != nil {
		_ = unix.Munmap(lm.mapping)
		lm.mapping, lm.log = nil, nil
	}
}

// logState is the session's dirty-log state.
type logState struct {
	logBase *logMap // SET_LOG_BASE; written under mu
	// logging is logBase's bitmap while VHOST_F_LOG_ALL is acked, else
	// nil: what workers test. Written under mu, read under RLock.
	logging *virtqueue.DirtyLog
	logFD   int // SET_LOG_FD eventfd, -1: none; written under mu
}

// mapLog validates and maps a SET_LOG_BASE fd. The fd stays open (the
// dispatcher closes it; the mapping keeps the memory).
func mapLog(l LogMsg, fd int) (*logMap, error) {
	const name = "SET_LOG_BASE"
	if l.MmapSize == 0 || l.MmapSize > MaxLogSize {
		return nil, fmt.Errorf("%s: mmap_size %d not in 1..%d: %w", name, l.MmapSize, MaxLogSize, ErrInvalidMessage)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%s: fstat: %v: %w", name, err, ErrInvalidMessage)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s: fd is not a memory file (mode %#o): %w", name, st.Mode, ErrInvalidMessage)
	}
	// Overflow-safe: MmapSize ≤ 1 GiB, and the offset is compared with
	// what is left of the file (CVE-2020-10722 was this sum wrapping).
	if st.Size < 0 || l.MmapOffset > uint64(st.Size) || l.MmapSize > uint64(st.Size)-l.MmapOffset {
		return nil, fmt.Errorf("%s: mmap_offset %d + mmap_size %d beyond fd size %d: %w", name, l.MmapOffset, l.MmapSize, st.Size, ErrInvalidMessage)
	}
	page := uint64(unix.Getpagesize())
	start := l.MmapOffset &^ (page - 1)
	skip := l.MmapOffset - start
	length := skip + l.MmapSize // < page + 1 GiB
	m, err := unix.Mmap(fd, int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s: mmap %d bytes at %d: %v: %w", name, length, start, err, ErrInvalidMessage)
	}
	return &logMap{mapping: m, log: virtqueue.NewDirtyLog(m[skip:length:length])}, nil
}

// updateLogging recomputes logging. Preconditions: mu held for writing.
func (s *session) updateLogging() {
	s.logging = nil
	if s.acked&FeatureLogAll != 0 && s.logBase != nil {
		s.logging = s.logBase.log
	}
}

// setLogBase handles SET_LOG_BASE; the reply is a u64 0 (libvhost-user
// vu_set_log_base_exec; QEMU waits for it before going on).
func (s *session) setLogBase(m *message) ([]byte, error) {
	l, _ := ParseLog(m.payload)
	lm, err := mapLog(l, m.fds[0])
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	old := s.logBase
	s.logBase = lm
	s.updateLogging()
	s.mu.Unlock()
	old.unmap()
	return le.AppendUint64(nil, 0), nil
}

// setLogFD handles SET_LOG_FD.
func (s *session) setLogFD(m *message) error {
	if err := checkNotifyFD(m.fds[0], "log"); err != nil {
		return fmt.Errorf("SET_LOG_FD: %w", err)
	}
	fd := m.takeFD(0)
	_ = unix.SetNonblock(fd, true)
	s.mu.Lock()
	old := s.logFD
	s.logFD = fd
	s.mu.Unlock()
	if old >= 0 {
		unix.Close(old)
	}
	return nil
}

// closeLog releases the log mapping and fd at teardown. Preconditions: no
// worker runs.
func (s *session) closeLog() {
	s.mu.Lock()
	lm, fd := s.logBase, s.logFD
	s.logBase, s.logging, s.logFD = nil, nil, -1
	s.mu.Unlock()
	lm.unmap()
	if fd >= 0 {
		unix.Close(fd)
	}
}

// logChain marks the pages of c's device-writable buffers. Preconditions:
// mu held for reading, logging non-nil.
func (w *worker) logChain(l *virtqueue.DirtyLog, c *virtqueue.Chain) {
	l.MarkSlices(w.s.mem.mem, c.Writable)
}

// logRing marks the ring's device-written parts and signals the log fd.
// Preconditions: mu held for reading, logging non-nil.
func (w *worker) logRing(l *virtqueue.DirtyLog, packed bool) {
	mem, a, n := w.s.mem.mem, w.r.addr, uint64(w.r.num)
	gpaOf := func(uva uint64) (uint64, bool) { return mem.UserGPA(uva) }
	if packed {
		if g, ok := gpaOf(a.Desc); ok {
			l.MarkGPA(g, virtqueue.DescSize*n)
		}
		if a.Flags&vringFlagLog != 0 {
			l.MarkGPA(a.Log, virtqueue.EventSuppressSize)
		} else if g, ok := gpaOf(a.Used); ok {
			l.MarkGPA(g, virtqueue.EventSuppressSize)
		}
	} else {
		if a.Flags&vringFlagLog != 0 {
			l.MarkGPA(a.Log, 6+8*n)
		} else if g, ok := gpaOf(a.Used); ok {
			l.MarkGPA(g, 6+8*n)
		}
	}
	w.signal(w.s.logFD)
}
