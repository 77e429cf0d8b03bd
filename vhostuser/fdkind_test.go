package vhostuser_test

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// fdKinds opens one fd of each kind a front-end might pass as a kick,
// call or err fd, and says whether it is an acceptable notifier (an
// eventfd, pipe or socket).
var fdKinds = []struct {
	name string
	ok   bool
	open func(t *testing.T) int
}{
	{"eventfd", true, func(t *testing.T) int {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		must(t, err)
		return fd
	}},
	{"pipe", true, func(t *testing.T) int {
		var p [2]int
		must(t, unix.Pipe2(p[:], unix.O_CLOEXEC))
		t.Cleanup(func() { unix.Close(p[1]) })
		return p[0]
	}},
	{"socket", true, func(t *testing.T) int {
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		t.Cleanup(func() { unix.Close(p[1]) })
		return p[0]
	}},
	// A timerfd becomes readable every period with nobody writing it: as a
	// kick fd its worker would wake forever; as a call fd writes fail.
	{"armed timerfd", false, func(t *testing.T) int {
		fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC|unix.TFD_NONBLOCK)
		must(t, err)
		ts := unix.ItimerSpec{Interval: unix.Timespec{Nsec: 1e6}, Value: unix.Timespec{Nsec: 1e6}}
		must(t, unix.TimerfdSettime(fd, 0, &ts, nil))
		return fd
	}},
	{"epoll fd", false, func(t *testing.T) int {
		fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		must(t, err)
		return fd
	}},
	// A regular file as a call fd would grow by 8 bytes per completion.
	{"regular file", false, func(t *testing.T) int {
		fd, err := unix.Open(filepath.Join(t.TempDir(), "f"), unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
		must(t, err)
		return fd
	}},
	{"/dev/zero", false, func(t *testing.T) int {
		fd, err := unix.Open("/dev/zero", unix.O_RDWR|unix.O_CLOEXEC, 0)
		must(t, err)
		return fd
	}},
	{"directory", false, func(t *testing.T) int {
		fd, err := unix.Open(t.TempDir(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		must(t, err)
		return fd
	}},
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// SET_VRING_KICK, SET_VRING_CALL and SET_VRING_ERR on a running ring take
// an eventfd, a pipe or a socket; any other fd (a timerfd, an epoll fd, a
// regular file, a device, a directory) ends the connection with
// ErrInvalidMessage, and the server serves the next front-end.
func TestNotifierFDsMustBeEventfdsPipesOrSockets(t *testing.T) {
	s := startServer(t, 1)
	for _, req := range []vhostuser.Request{vhostuser.ReqSetVringKick, vhostuser.ReqSetVringCall, vhostuser.ReqSetVringErr} {
		for _, k := range fdKinds {
			t.Run(req.String()+"/"+k.name, func(t *testing.T) {
				f := s.dial(t)
				if err := f.Setup(smallSetup); err != nil {
					t.Fatal(err)
				}
				fd := k.open(t)
				defer unix.Close(fd)
				if k.ok {
					if err := f.SetVringFD(req, 0, fd); err != nil {
						t.Fatalf("%s with a %s: %v", req, k.name, err)
					}
					if _, err := f.GetFeatures(); err != nil {
						t.Fatalf("session ended after %s with a %s: %v", req, k.name, err)
					}
					f.Close()
					if c := s.waitClosed(t); c.err != nil {
						t.Fatalf("connection ended with %v", c.err)
					}
					return
				}
				// Send, not Call: no reply is expected, the session ends.
				if err := f.Send(req, vhostuser.FlagVersion, le.AppendUint64(nil, 0), fd); err != nil {
					t.Fatal(err)
				}
				if _, err := f.GetFeatures(); err == nil {
					t.Fatalf("session survived %s with a %s", req, k.name)
				}
				if c := s.waitClosed(t); !errors.Is(c.err, vhostuser.ErrInvalidMessage) {
					t.Fatalf("connection ended with %v, want ErrInvalidMessage", c.err)
				}
				s.checkServes(t)
			})
		}
	}
}

// The check reads the kind of an anonymous inode from /proc; the test
// relies on the link text the kernel uses for an eventfd.
func TestEventfdLinkNameIsWhatTheCheckExpects(t *testing.T) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	must(t, err)
	defer unix.Close(fd)
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil || link != "anon_inode:[eventfd]" {
		t.Fatalf("eventfd link %q, %v", link, err)
	}
}
