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
	return rawIov(unix.SYS_PREADV, fd, bufs, off)
}

// rawPwritev is pwritev(2), as rawPreadv.
func rawPwritev(fd int, bufs [][]byte, off int64) (int, error) {
	return rawIov(unix.SYS_PWRITEV, fd, bufs, off)
}

func rawIov(trap uintptr, fd int, bufs [][]byte, off int64) (int, error) {
	bufs = bufs[:min(len(bufs), iovMax)]
	ap := iovecPool.Get().(*[]unix.Iovec)
	iov := (*ap)[:0]
	for _, b := range bufs {
		v := unix.Iovec{}
		if len(b) > 0 {
			v.Base = &b[0]
			v.SetLen(len(b))
		}
		iov = append(iov, v)
	}
	defer func() {
		clear(iov) // keep no reference to guest memory
		*ap = iov[:0]
		iovecPool.Put(ap)
	}()
	if len(iov) == 0 {
		return 0, nil
	}
	// The offset is passed as two longs, low then high (the kernel's
	// pos_l/pos_h); with 64-bit longs the high one is zero.
	const half = unix.SizeofLong * 8 / 2
	lo := uintptr(off)
	hi := uintptr(uint64(off) >> half >> half)
	n, _, errno := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)), lo, hi, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
