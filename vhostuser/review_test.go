package vhostuser_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// A kick fd the worker cannot read (here the write end of a pipe: read
// fails with EBADF) breaks the ring, and the worker stops reading it. If
// the pipe is full, SET_VRING_ENABLE(1)'s own wake-up write must not park
// the control goroutine: the session keeps answering, and ends when the
// front-end leaves.
func TestEnableWithFullUnreadableKickFDDoesNotWedgeControlPath(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, smallSetup)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if err := f.SetVringFD(vhostuser.ReqSetVringKick, 0, p[1]); err != nil {
		t.Fatalf("SET_VRING_KICK: %v", err)
	}
	if b := <-s.ev.broken; b.queue != 0 {
		t.Fatalf("QueueBroken on queue %d, want 0", b.queue)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := unix.Write(p[1], chunk); errors.Is(err, unix.EAGAIN) {
			break
		} else if err != nil {
			t.Fatalf("filling the pipe: %v", err)
		}
	}
	if err := f.SetVringEnable(0, true); err != nil {
		t.Fatalf("SET_VRING_ENABLE: %v", err)
	}
	// Without the fix this reply never comes (the test binary times out).
	if _, err := f.GetFeatures(); err != nil {
		t.Fatalf("GET_FEATURES after SET_VRING_ENABLE: %v", err)
	}
	f.Close()
	if c := s.waitClosed(t); c.err != nil {
		t.Fatalf("connection ended with %v", c.err)
	}
}

// A front-end that sends requests and never reads the replies blocks the
// server's reply write. Cancelling the context must still end the session
// (and so let Serve return, e.g. on SIGTERM).
func TestCancelEndsSessionBlockedWritingAReply(t *testing.T) {
	a, b := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.ServeConn(ctx, a, vhostuser.Options{Disk: newMemDisk(1 << 20)})
	}()
	// GET_FEATURES requests until the connection is closed; the replies
	// are never read.
	req := vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqGetFeatures, Flags: vhostuser.FlagVersion})
	writer := make(chan struct{})
	go func() {
		defer close(writer)
		for {
			if _, err := b.Write(req); err != nil {
				return
			}
		}
	}()
	// Wait, without a clock, until the server goroutine is parked writing
	// a reply.
	for !serverBlockedWriting() {
		runtime.Gosched()
	}
	cancel()
	// Without the fix this never returns (the test binary times out).
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after cancel = %v, want nil", err)
	}
	b.Close()
	<-writer
}

// serverBlockedWriting reports whether some goroutine is parked in the
// server's reply write waiting for the socket to drain.
func serverBlockedWriting() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("waitWrite")) && bytes.Contains(g, []byte("vhostuser.(*wireConn).writeReplyFD")) {
			return true
		}
	}
	return false
}

// A kick fd that is always readable without anyone kicking (/dev/zero, a
// regular file) would make the worker spin on a core for as long as the
// front-end keeps the session open. Only eventfd-like fds (anonymous
// inodes), pipes and sockets can be waited on; anything else is refused.
func TestKickFDThatNeverBlocksIsRefused(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, smallSetup)
	zero, err := unix.Open("/dev/zero", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(zero)
	// Send, not Call: the session is expected to end without a reply.
	if err := f.Send(vhostuser.ReqSetVringKick, vhostuser.FlagVersion, le.AppendUint64(nil, 0), zero); err != nil {
		t.Fatal(err)
	}
	if _, err := f.GetFeatures(); err == nil {
		t.Fatal("session survived SET_VRING_KICK with /dev/zero; its worker spins")
	}
	if c := s.waitClosed(t); !errors.Is(c.err, vhostuser.ErrInvalidMessage) {
		t.Fatalf("connection ended with %v, want ErrInvalidMessage", c.err)
	}
	s.checkServes(t)
}

// A memory region backed by hugetlbfs whose mmap_offset+memory_size is not a
// multiple of the huge page size maps fine (the kernel rounds the length
// up) but munmap with the unrounded length fails with EINVAL, so every
// table swap and every connection leaked the mapping: a front-end repeating
// SET_MEM_TABLE could exhaust vm.max_map_count and take the Go runtime's
// own mmaps down with it.
func TestHugetlbRegionIsUnmappedOnTableSwapAndTeardown(t *testing.T) {
	const name = "vhost-vhdx-review-hugetlb"
	probe, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_HUGETLB)
	if err != nil {
		t.Skipf("no hugetlbfs memfd: %v", err)
	}
	unix.Close(probe)
	s := startServer(t, 1)
	f := s.dial(t)
	if err := negotiate(f, stateNegotiated); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_HUGETLB)
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(fd, st.Blksize); err != nil {
			unix.Close(fd)
			t.Skipf("sizing a hugetlbfs memfd: %v", err)
		}
		regions := []vhostuser.MemRegion{{GuestPhysAddr: 0, Size: 4096, UserAddr: 1 << 30, MmapOffset: 0}}
		err = f.Send(vhostuser.ReqSetMemTable, vhostuser.FlagVersion, vhostuser.AppendMemTable(nil, regions), fd)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.GetFeatures(); err != nil {
			t.Fatalf("SET_MEM_TABLE %d with a hugetlbfs region: %v", i, err)
		}
	}
	f.Close()
	if c := s.waitClosed(t); c.err != nil {
		t.Fatalf("connection ended with %v", c.err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Skipf("reading /proc/self/maps: %v", err)
	}
	if n := bytes.Count(maps, []byte(name)); n != 0 {
		t.Fatalf("%d hugetlbfs guest memory mappings left after three tables and the end of the connection", n)
	}
}
