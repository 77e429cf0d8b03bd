//go:build linux

package main

import (
	"syscall"
	"unsafe"
)

// ioctlZeroout issues BLKZEROOUT for [off, off+length) on the block device
// fd; the kernel reads the two-word range through the pointer.
func ioctlZeroout(fd uintptr, off, length uint64) error {
	r := [2]uint64{off, length}
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, blkZeroout, uintptr(unsafe.Pointer(&r))); errno != 0 {
		return errno
	}
	return nil
}
