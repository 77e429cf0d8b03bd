package vhostuser

import (
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// checkNotifyFD accepts only fds that behave like an eventfd for the
// kick, call and err roles: an eventfd, a pipe (or FIFO) or a socket. A
// kick fd must block until the front-end writes it, or its worker spins: a
// regular file, directory or device (/dev/zero) reads without blocking,
// and so do anonymous inodes other than eventfd once they fire (a timerfd
// becomes readable every period with no front-end write, a signalfd on any
// signal). A call or err fd is written by the back-end: a regular file
// would grow with every completion, a timerfd or signalfd refuses the
// write and the driver is never notified. what names the role in the
// error.
//
// Pipes and sockets are told by fstat's file type. Every anonymous inode
// has file type 0; which one it is comes from the /proc/self/fd link,
// "anon_inode:[eventfd]" for an eventfd (fs/anon_inodes.c names the inode
// after the type). Without /proc an anonymous inode is refused.
func checkNotifyFD(fd int, what string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s fd: fstat: %v: %w", what, err, ErrInvalidMessage)
	}
	switch t := st.Mode & unix.S_IFMT; t {
	case unix.S_IFIFO, unix.S_IFSOCK:
		return nil
	case 0:
		var buf [64]byte
		n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
		if err != nil {
			return fmt.Errorf("%s fd: anonymous inode of unknown kind (/proc/self/fd: %v): %w", what, err, ErrInvalidMessage)
		}
		if kind := string(buf[:n]); kind != "anon_inode:[eventfd]" {
			return fmt.Errorf("%s fd: %s is not an eventfd, pipe or socket: %w", what, kind, ErrInvalidMessage)
		}
		return nil
	default:
		return fmt.Errorf("%s fd: file type %#o is not an eventfd, pipe or socket: %w", what, t, ErrInvalidMessage)
	}
}
