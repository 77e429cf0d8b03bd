package vhdx

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// iovecPool holds the iovec arrays preadv/pwritev are called with. x/sys's
// Preadv/Pwritev build theirs on the heap once a call has more than 8
// buffers, which a guest request of 32 segments (Linux's 128 KiB reads)
// would pay twice per request; a pooled array costs nothing after warm-up.
var iovecPool = sync.Pool{New: func() any {
	a := make([]unix.Iovec, 0, iovMax)
	return &a
}}

// rawPreadv is preadv(2) of at most iovMax buffers from fd at off: one
// system call, the count it returned, no retry (ReadvAt continues short
// transfers and retries EINTR).
func rawPreadv(fd int, bufs [][]byte, off int64) (int, error) {
	return rawIov(unix.SYS_PREADV, fd, bufs, off, 0)
}

// rawPwritev is pwritev(2), as rawPreadv.
func rawPwritev(fd int, bufs [][]byte, off int64) (int, error) {
	return rawIov(unix.SYS_PWRITEV, fd, bufs, off, 0)
}

// rawPreadvNoWait is preadv2(2) with RWF_NOWAIT, as rawPreadv: EAGAIN, or
// a short count, when the data is not all in the page cache.
func rawPreadvNoWait(fd int, bufs [][]byte, off int64) (int, error) {
	return rawIov(unix.SYS_PREADV2, fd, bufs, off, unix.RWF_NOWAIT)
}

func rawIov(trap uintptr, fd int, bufs [][]byte, off int64, flags int) (int, error) {
	bufs = bufs[:min(len(bufs), iovMax)]
	if len(bufs) == 0 {
		return 0, nil
	}
	// Up to 8 buffers (most requests) the array lives on the stack, as in
	// x/sys; longer lists take a pooled one.
	if len(bufs) <= 8 {
		var small [8]unix.Iovec
		return iovSyscall(trap, fd, fillIovecs(small[:0], bufs), off, flags)
	}
	pooled := iovecPool.Get().(*[]unix.Iovec)
	iov := fillIovecs((*pooled)[:0], bufs)
	n, err := iovSyscall(trap, fd, iov, off, flags)
	clear(iov) // keep no reference to guest memory
	*pooled = iov[:0]
	iovecPool.Put(pooled)
	return n, err
}

// fillIovecs appends an iovec for each buffer to iov (whose capacity
// holds them all).
func fillIovecs(iov []unix.Iovec, bufs [][]byte) []unix.Iovec {
	for _, b := range bufs {
		v := unix.Iovec{}
		if len(b) > 0 {
			v.Base = &b[0]
			v.SetLen(len(b))
		}
		iov = append(iov, v)
	}
	return iov
}

// iovSyscall makes the system call trap (preadv, pwritev or preadv2) with
// iov; flags is preadv2's last argument, which the others ignore.
func iovSyscall(trap uintptr, fd int, iov []unix.Iovec, off int64, flags int) (int, error) {
	// The offset is passed as two longs, low then high (the kernel's
	// pos_l/pos_h); with 64-bit longs the high one is zero.
	const half = unix.SizeofLong * 8 / 2
	lo := uintptr(off)
	hi := uintptr(uint64(off) >> half >> half)
	n, _, errno := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)), lo, hi, uintptr(flags))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
