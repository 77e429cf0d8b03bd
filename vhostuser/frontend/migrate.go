package frontend

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// GetMaxMemSlots sends GET_MAX_MEM_SLOTS.
func (f *Frontend) GetMaxMemSlots() (uint64, error) { return f.callU64(vhostuser.ReqGetMaxMemSlots) }

// AddMemReg sends ADD_MEM_REG for r with fd.
func (f *Frontend) AddMemReg(r vhostuser.MemRegion, fd int) error {
	_, err := f.Call(vhostuser.ReqAddMemReg, vhostuser.AppendMemRegion(nil, r), fd)
	return err
}

// RemMemReg sends REM_MEM_REG for r, with fds if given (older QEMU sent
// the region's fd).
func (f *Frontend) RemMemReg(r vhostuser.MemRegion, fds ...int) error {
	_, err := f.Call(vhostuser.ReqRemMemReg, vhostuser.AppendMemRegion(nil, r), fds...)
	return err
}

// SetLogBase sends SET_LOG_BASE and checks the u64 0 reply.
func (f *Frontend) SetLogBase(l vhostuser.LogMsg, fd int) error {
	p, err := f.Call(vhostuser.ReqSetLogBase, vhostuser.AppendLog(nil, l), fd)
	if err != nil {
		return err
	}
	if v, err := vhostuser.ParseU64(p); err != nil || v != 0 {
		return fmt.Errorf("SET_LOG_BASE reply %x: %w", p, ErrProtocol)
	}
	return nil
}

// DirtyLog is a dirty page bitmap in a memfd, as QEMU allocates it for
// migration: one bit per 4 KiB of guest-physical memory.
type DirtyLog struct {
	FD   int
	Bits []byte
}

// NewDirtyLog creates a bitmap covering guest-physical addresses below
// memEnd.
func NewDirtyLog(memEnd uint64) (*DirtyLog, error) {
	n := int((memEnd/4096 + 7) / 8)
	fd, err := unix.MemfdCreate("vhost-user-frontend-log", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		unix.Close(fd)
		return nil, err
	}
	b, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &DirtyLog{FD: fd, Bits: b}, nil
}

// Dirty reports whether the page holding gpa is marked.
func (l *DirtyLog) Dirty(gpa uint64) bool {
	p := gpa / 4096
	return p/8 < uint64(len(l.Bits)) && l.Bits[p/8]&(1<<(p%8)) != 0
}

// Clear zeroes the bitmap.
func (l *DirtyLog) Clear() { clear(l.Bits) }

// Close unmaps and closes the log.
func (l *DirtyLog) Close() {
	_ = unix.Munmap(l.Bits)
	unix.Close(l.FD)
}

// Msg is the SET_LOG_BASE payload for the whole log.
func (l *DirtyLog) Msg() vhostuser.LogMsg { return vhostuser.LogMsg{MmapSize: uint64(len(l.Bits))} }
