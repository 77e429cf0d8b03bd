package vhostuser_test

import (
	"context"
	"errors"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

var smallSetup = frontend.Options{MemSize: 1 << 20, QueueSize: 16, MaxIO: 4096, MaxInflight: 2}

// checkServes proves the server still works: a fresh front-end negotiates,
// completes a flush and disconnects cleanly.
func (s *testServer) checkServes(t *testing.T) {
	t.Helper()
	f, err := frontend.Dial(s.path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Setup(smallSetup); err != nil {
		f.Close()
		t.Fatalf("normal connection after the bad one: Setup: %v", err)
	}
	r, err := f.Queues[0].Flush(context.Background())
	f.Close()
	mustOK(t, "flush on the next connection", r, err)
	if c := s.waitClosed(t); c.err != nil {
		t.Fatalf("normal connection ended with %v", c.err)
	}
}

func eventfd(t *testing.T) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

const (
	stateRaw = iota
	stateNegotiated
	stateMemory
)

func negotiate(f *frontend.Frontend, state int) error {
	if state == stateRaw {
		return nil
	}
	feats, err := f.GetFeatures()
	if err != nil {
		return err
	}
	pf, err := f.GetProtocolFeatures()
	if err != nil {
		return err
	}
	// No REPLY_ACK: the hostile message must get no answer at all.
	if err := f.SetProtocolFeatures(pf &^ vhostuser.ProtoReplyAck); err != nil {
		return err
	}
	if err := f.SetOwner(); err != nil {
		return err
	}
	// Split rings: the cases lay out split rings and split inflight
	// regions (packed ones have their own tests, packed_test.go).
	if err := f.SetFeatures(feats &^ vhostuser.FeatureRingPacked); err != nil {
		return err
	}
	if state == stateNegotiated {
		return nil
	}
	if err := f.CreateMemory(1 << 20); err != nil {
		return err
	}
	return f.SetMemTable()
}

func u64(v uint64) []byte { return le.AppendUint64(nil, v) }

func vs(idx, num uint32) []byte {
	return vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx, Num: num})
}

func TestMalformedMessageEndsConnectionAndServerServesNext(t *testing.T) {
	s := startServer(t, 1)
	v := uint32(vhostuser.FlagVersion)
	memRegion := func(f *frontend.Frontend) vhostuser.MemRegion {
		return vhostuser.MemRegion{GuestPhysAddr: frontend.GuestPhysBase, Size: 1 << 20, UserAddr: frontend.UserBase}
	}
	cases := []malformedCase{
		{"unknown request", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(99, v, nil)
		}, vhostuser.ErrInvalidMessage},
		{"payload size above 4096", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.SendRaw(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqSetFeatures, Flags: v, Size: 5000}))
		}, vhostuser.ErrInvalidMessage},
		{"payload size mismatch", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetFeatures, v, []byte{1, 2, 3, 4})
		}, vhostuser.ErrInvalidMessage},
		{"version 2 in flags", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetFeatures, 2, nil)
		}, vhostuser.ErrInvalidMessage},
		{"REPLY flag on a request", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetFeatures, v|vhostuser.FlagReply, nil)
		}, vhostuser.ErrInvalidMessage},
		{"fd on a request that takes none", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetFeatures, v, nil, eventfd(t))
		}, vhostuser.ErrInvalidMessage},
		{"socket closed mid-message", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			b := vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqSetFeatures, Flags: v, Size: 8})
			if err := f.SendRaw(append(b, 1, 2, 3)); err != nil {
				return err
			}
			return f.Conn().CloseWrite()
		}, vhostuser.ErrDisconnected},
		{"GET_QUEUE_NUM without MQ negotiated", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetQueueNum, v, nil)
		}, vhostuser.ErrState},
		{"SET_PROTOCOL_FEATURES with bit 20", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetProtocolFeatures, v, u64(1<<20))
		}, vhostuser.ErrUnsupported},
		{"SET_FEATURES without VERSION_1", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetFeatures, v, u64(vhostuser.FeatureProtocolFeatures))
		}, vhostuser.ErrUnsupported},
		{"SET_MEM_TABLE with 0 regions", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			p := vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{Size: 4096}})
			le.PutUint32(p, 0)
			return f.Send(vhostuser.ReqSetMemTable, v, p, eventfd(t))
		}, vhostuser.ErrInvalidMessage},
		{"SET_MEM_TABLE with fewer fds than regions", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			if err := f.CreateMemory(1 << 20); err != nil {
				return err
			}
			r1 := memRegion(f)
			r2 := r1
			r2.GuestPhysAddr += 1 << 30
			r2.UserAddr += 1 << 30
			return f.Send(vhostuser.ReqSetMemTable, v, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r1, r2}), f.MemFD())
		}, vhostuser.ErrInvalidMessage},
		{"SET_MEM_TABLE region beyond the fd size", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			if err := f.CreateMemory(1 << 20); err != nil {
				return err
			}
			r := memRegion(f)
			r.Size = 2 << 20
			return f.Send(vhostuser.ReqSetMemTable, v, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r}), f.MemFD())
		}, vhostuser.ErrGuestMemory},
		{"SET_MEM_TABLE region with mmap_offset+size overflowing", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			if err := f.CreateMemory(1 << 20); err != nil {
				return err
			}
			r := memRegion(f)
			r.MmapOffset = ^uint64(0) - 100
			return f.Send(vhostuser.ReqSetMemTable, v, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r}), f.MemFD())
		}, vhostuser.ErrInvalidMessage},
		{"SET_MEM_TABLE with 9 fds", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			fds := make([]int, 9)
			for i := range fds {
				fds[i] = eventfd(t)
			}
			return f.Send(vhostuser.ReqSetMemTable, v, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{Size: 4096}}), fds...)
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_NUM 0", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, v, vs(0, 0))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_NUM not a power of two", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, v, vs(0, 100))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_NUM above 32768", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, v, vs(0, 65536))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_NUM ring index out of range", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, v, vs(1, 16))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_BASE ring index 2^32-1", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringBase, v, vs(0xffffffff, 0))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_KICK ring index out of range", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringKick, v, u64(7), eventfd(t))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_CALL without fd or no-fd flag", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringCall, v, u64(0))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_CALL with no-fd flag and an fd", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringCall, v, u64(vhostuser.VringNoFDFlag), eventfd(t))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_ENABLE num 2", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringEnable, v, vs(0, 2))
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_KICK before any memory table", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringKick, v, u64(0), eventfd(t))
		}, vhostuser.ErrState},
		{"ring addresses outside guest memory", stateMemory, func(t *testing.T, f *frontend.Frontend) error {
			if err := f.Send(vhostuser.ReqSetVringNum, v, vs(0, 16)); err != nil {
				return err
			}
			a := vhostuser.VringAddr{Desc: frontend.UserBase + 1<<40, Avail: frontend.UserBase, Used: frontend.UserBase + 4096}
			return f.Send(vhostuser.ReqSetVringAddr, v, vhostuser.AppendVringAddr(nil, a))
		}, vhostuser.ErrGuestMemory},
		{"ring address misaligned", stateMemory, func(t *testing.T, f *frontend.Frontend) error {
			a := vhostuser.VringAddr{Desc: frontend.UserBase + 8, Avail: frontend.UserBase + 4096, Used: frontend.UserBase + 8192}
			return f.Send(vhostuser.ReqSetVringAddr, v, vhostuser.AppendVringAddr(nil, a))
		}, vhostuser.ErrInvalidMessage},
	}
	s.runMalformedCases(t, cases, false)
}

// malformedCase is one front-end mistake: from state, send must make the
// server end the connection with an error wrapping want.
type malformedCase struct {
	name  string
	state int
	send  func(t *testing.T, f *frontend.Frontend) error
	want  error
}

// runMalformedCases runs each case on a fresh connection: the server must
// close it without replying, report want through ConnClosed, and then serve
// a normal connection. sendMayFail says a send error is expected (the server
// may close the socket mid-send) rather than a test failure.
func (s *testServer) runMalformedCases(t *testing.T, cases []malformedCase, sendMayFail bool) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := s.dial(t)
			if err := negotiate(f, tc.state); err != nil {
				t.Fatalf("getting to the state under test: %v", err)
			}
			if err := tc.send(t, f); err != nil {
				if !sendMayFail {
					t.Fatalf("sending: %v", err)
				}
				t.Logf("sending: %v", err)
			}
			if h, _, err := f.ReadReply(); err == nil {
				t.Errorf("server answered with %s instead of closing the connection", h.Request)
			}
			c := s.waitClosed(t)
			t.Logf("connection ended: %v", c.err)
			if !errors.Is(c.err, tc.want) {
				t.Errorf("connection ended with %v, want %v", c.err, tc.want)
			}
			f.Close()
			s.checkServes(t)
		})
	}
}

func TestConnectDisconnectCyclesLeakNoFDsOrGoroutines(t *testing.T) {
	s := startServer(t, 2)
	cycle := func() {
		f, err := frontend.Dial(s.path)
		if err != nil {
			t.Fatal(err)
		}
		o := smallSetup
		o.NumQueues = 2
		if err := f.Setup(o); err != nil {
			t.Fatal(err)
		}
		r, err := f.Queues[1].Write(context.Background(), 1, pattern(1, 512))
		mustOK(t, "write", r, err)
		f.Close()
		if c := s.waitClosed(t); c.err != nil {
			t.Fatalf("connection ended with %v", c.err)
		}
	}
	cycle() // warm up lazily created runtime state (poller, timers)
	fds0, g0 := openFDs(t), runtime.NumGoroutine()
	for i := 0; i < 100; i++ {
		cycle()
	}
	// Settle: goroutines that already signalled completion may still be
	// unwinding. The wait only waits; the assertion is on what is left.
	noFDOrGoroutineGrowth(t, fds0, g0, "100 connections")
}

func TestMemoryFaultBreaksOnlyThatQueueAndDaemonLives(t *testing.T) {
	s := startServer(t, 1)
	f := s.dial(t)
	o := smallSetup
	o.MemSize = 2 << 20
	if err := f.Setup(o); err != nil {
		t.Fatal(err)
	}
	q := f.Queues[0]
	hdr, err := f.Alloc(17, 16)
	if err != nil {
		t.Fatal(err)
	}
	le.PutUint32(f.Mem[hdr:], frontend.BlkTIn)
	// Shrink the memfd under the back-end's mapping: touching the second
	// MiB now raises SIGBUS, as with a front-end that truncates its RAM.
	if err := unix.Ftruncate(f.MemFD(), 1<<20); err != nil {
		t.Fatal(err)
	}
	_, err = q.Publish([]frontend.Desc{
		{Addr: frontend.GPA(hdr), Len: 16},
		{Addr: frontend.GPA(3 << 19), Len: 4096, Write: true},
		{Addr: frontend.GPA(hdr + 16), Len: 1, Write: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := <-s.ev.broken
	if b.queue != 0 || !errors.Is(b.err, vhostuser.ErrGuestMemory) {
		t.Fatalf("QueueBroken(queue %d, %v), want queue 0 with ErrGuestMemory", b.queue, b.err)
	}
	// The control path still answers on the same connection.
	if _, err := f.GetFeatures(); err != nil {
		t.Fatalf("connection unusable after a queue fault: %v", err)
	}
	f.Close()
	if c := s.waitClosed(t); c.err != nil {
		t.Fatalf("connection ended with %v", c.err)
	}
	s.checkServes(t)
}

func TestListenReplacesStaleSocketButNotRegularFile(t *testing.T) {
	dir := t.TempDir()
	sock := dir + "/stale.sock"
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // leaves the socket file behind, as a crash would
	ln, err = vhostuser.Listen(sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	ln.Close()

	file := dir + "/regular"
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := vhostuser.Listen(file); err == nil {
		t.Fatal("Listen over a regular file succeeded")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Fatalf("regular file damaged: %q, %v", b, err)
	}
}

func TestFromFDAcceptsListeningSocketOnly(t *testing.T) {
	dir := t.TempDir()
	ln, err := vhostuser.Listen(dir + "/s")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// FromFD takes ownership of the fd it is given: hand it dups.
	dup := func(f interface{ File() (*os.File, error) }) int {
		t.Helper()
		file, err := f.File()
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		fd, err := unix.Dup(int(file.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	inherited, err := vhostuser.FromFD(dup(ln))
	if err != nil {
		t.Fatalf("FromFD(listening socket): %v", err)
	}
	inherited.Close()

	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vhostuser.FromFD(efd); err == nil {
		t.Error("FromFD(eventfd) succeeded")
	}
	a, b := socketpair(t)
	defer a.Close()
	defer b.Close()
	if _, err := vhostuser.FromFD(dup(a)); err == nil {
		t.Error("FromFD(connected socket) succeeded")
	}
}
