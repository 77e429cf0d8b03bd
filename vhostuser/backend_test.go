package vhostuser_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// resizableDisk is a memDisk whose reported size a test can change, as an
// online resize would.
type resizableDisk struct {
	*memDisk
	size atomic.Int64
}

func newResizableDisk(size int) *resizableDisk {
	d := &resizableDisk{memDisk: newMemDisk(size)}
	d.size.Store(int64(size))
	return d
}

func (d *resizableDisk) Size() int64 { return d.size.Load() }

func capacityOf(t *testing.T, f *frontend.Frontend) uint64 {
	t.Helper()
	c, err := f.GetConfig(0, 8)
	if err != nil {
		t.Fatalf("GET_CONFIG capacity: %v", err)
	}
	return le.Uint64(c)
}

// startNotifying runs NotifyConfigChange on its own goroutine, as a resize
// would, and returns its result channel.
func startNotifying(n *vhostuser.ConfigNotifier, ctx context.Context) chan error {
	done := make(chan error, 1)
	go func() { done <- n.NotifyConfigChange(ctx) }()
	return done
}

// A changed disk size is announced with BACKEND_CONFIG_CHANGE_MSG on the
// channel from SET_BACKEND_REQ_FD. Like QEMU, the front-end re-reads the
// config (GET_CONFIG, served while the notifier waits) and finds the new
// capacity, then acks; NotifyConfigChange returns only after the ack.
func TestConfigChangeIsAnnouncedAndGetConfigReturnsTheNewCapacity(t *testing.T) {
	d := newResizableDisk(testDiskSize)
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1, Notifier: n})
	f := s.connect(t, smallSetup)
	if f.ProtocolFeatures&vhostuser.ProtoBackendReq == 0 || f.ProtocolFeatures&vhostuser.ProtoReplyAck == 0 {
		t.Fatalf("protocol features %#x lack BACKEND_REQ or REPLY_ACK", f.ProtocolFeatures)
	}
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	if got := capacityOf(t, f); got != testDiskSize/512 {
		t.Fatalf("capacity %d before the resize", got)
	}
	for _, size := range []int64{2 * testDiskSize, testDiskSize / 2} {
		d.size.Store(size)
		done := startNotifying(n, context.Background())
		h, p, err := f.ReadBackendRequest()
		if err != nil {
			t.Fatal(err)
		}
		if h.Request != vhostuser.Request(vhostuser.BackendConfigChangeMsg) || h.Flags != vhostuser.FlagVersion|vhostuser.FlagNeedReply || len(p) != 0 {
			t.Fatalf("back-end sent request %d flags %#x, %d payload bytes; want CONFIG_CHANGE_MSG with NEED_REPLY and no payload", uint32(h.Request), h.Flags, len(p))
		}
		if got := capacityOf(t, f); got != uint64(size/512) {
			t.Fatalf("GET_CONFIG capacity %d after resizing to %d bytes, want %d", got, size, size/512)
		}
		select {
		case err := <-done:
			t.Fatalf("NotifyConfigChange returned (%v) before the ack", err)
		default:
		}
		if err := f.AckBackendRequest(h, 0); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("NotifyConfigChange: %v", err)
		}
	}
}

// Without REPLY_ACK the message goes out without NEED_REPLY and
// NotifyConfigChange does not wait for an answer.
func TestConfigChangeWithoutReplyAckIsFireAndForget(t *testing.T) {
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Notifier: n})
	o := smallSetup
	o.ProtocolFeatures = ^uint64(vhostuser.ProtoReplyAck)
	f := s.connect(t, o)
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	// Without acks, a round trip makes sure the server took the fd.
	if _, err := f.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	if err := n.NotifyConfigChange(context.Background()); err != nil {
		t.Fatal(err)
	}
	h, _, err := f.ReadBackendRequest()
	if err != nil || h.Flags != vhostuser.FlagVersion {
		t.Fatalf("request flags %#x, %v; want VERSION only", h.Flags, err)
	}
}

// NotifyConfigChange says ErrNoBackendChannel when there is nobody to
// tell: no connection, or a front-end that set up no channel.
func TestConfigChangeWithoutAChannelIsErrNoBackendChannel(t *testing.T) {
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Notifier: n})
	if err := n.NotifyConfigChange(context.Background()); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("no connection: %v", err)
	}
	f := s.connect(t, smallSetup)
	if err := n.NotifyConfigChange(context.Background()); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("connection without SET_BACKEND_REQ_FD: %v", err)
	}
	f.Close()
	s.waitClosed(t)
	if err := n.NotifyConfigChange(context.Background()); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("after the connection ended: %v", err)
	}
}

// A non-zero ack is ErrBackendRequestFailed and the channel stays; a
// front-end that never acks is abandoned when ctx ends, and its channel is
// closed so a late ack cannot be taken for the next request's.
func TestConfigChangeAckFailureAndCancellation(t *testing.T) {
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Notifier: n})
	f := s.connect(t, smallSetup)
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	done := startNotifying(n, context.Background())
	h, _, err := f.ReadBackendRequest()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.AckBackendRequest(h, 1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, vhostuser.ErrBackendRequestFailed) {
		t.Fatalf("NotifyConfigChange after a failed ack: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done = startNotifying(n, ctx)
	if _, _, err := f.ReadBackendRequest(); err != nil {
		t.Fatal(err)
	}
	cancel() // never acked
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("NotifyConfigChange after cancel: %v", err)
	}
	if _, err := f.Backend.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("abandoned channel not closed by the back-end: read %v", err)
	}
	if err := n.NotifyConfigChange(context.Background()); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("after the channel was abandoned: %v", err)
	}
	if _, err := f.GetFeatures(); err != nil {
		t.Fatalf("session unusable after the back-end channel was dropped: %v", err)
	}
}

// A second SET_BACKEND_REQ_FD replaces the first channel: the back-end
// closes its copy of the first, and notifications go to the second. When
// the connection ends, the back-end's copy of the channel is closed too.
func TestSecondBackendChannelReplacesTheFirst(t *testing.T) {
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Notifier: n})
	f := s.connect(t, smallSetup)
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	first := f.Backend
	f.Backend = nil // keep it open past SetBackendReqFD
	defer first.Close()
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	if _, err := first.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("first channel after the second SET_BACKEND_REQ_FD: read %v, want EOF", err)
	}
	done := startNotifying(n, context.Background())
	h, _, err := f.ReadBackendRequest()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.AckBackendRequest(h, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	f.Conn().Close()
	s.waitClosed(t)
	if _, err := f.Backend.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("channel after the connection ended: read %v, want EOF", err)
	}
}

// Notifications racing channel replacement and the end of the connection
// (run under -race): each returns nil or one of the documented errors, none
// hangs, and the server serves the next front-end.
func TestConfigChangeRacingChannelReplacementAndDisconnect(t *testing.T) {
	n := new(vhostuser.ConfigNotifier)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Notifier: n})
	o := smallSetup
	o.ProtocolFeatures = ^uint64(vhostuser.ProtoReplyAck) // no acks to answer
	f := s.connect(t, o)
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				err := n.NotifyConfigChange(context.Background())
				if err != nil && !errors.Is(err, vhostuser.ErrNoBackendChannel) && !errors.Is(err, vhostuser.ErrDisconnected) {
					errs <- err
					return
				}
			}
		}()
	}
	for range 20 {
		if err := f.SetBackendReqFD(); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	s.waitClosed(t)
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("NotifyConfigChange: %v", err)
	}
	s.checkServes(t)
}

// SET_BACKEND_REQ_FD takes exactly one connected unix stream socket and
// needs BACKEND_REQ negotiated; anything else ends the connection.
func TestMalformedSetBackendReqFDEndsConnection(t *testing.T) {
	s := startServer(t, 1)
	v := uint32(vhostuser.FlagVersion)
	sock := func(t *testing.T, domain, typ int) int {
		if domain == unix.AF_UNIX {
			p, err := unix.Socketpair(domain, typ|unix.SOCK_CLOEXEC, 0)
			must(t, err)
			t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
			return p[1]
		}
		fd, err := unix.Socket(domain, typ|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	send := func(payload []byte, fds func(t *testing.T) []int) func(t *testing.T, f *frontend.Frontend) error {
		return func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetBackendReqFD, v, payload, fds(t)...)
		}
	}
	unixStream := func(t *testing.T) []int { return []int{sock(t, unix.AF_UNIX, unix.SOCK_STREAM)} }
	s.runMalformedCases(t, []malformedCase{
		{"before BACKEND_REQ is negotiated", stateRaw, send(nil, unixStream), vhostuser.ErrState},
		{"without an fd", stateNegotiated, send(nil, func(*testing.T) []int { return nil }), vhostuser.ErrInvalidMessage},
		{"with two fds", stateNegotiated, send(nil, func(t *testing.T) []int {
			return []int{sock(t, unix.AF_UNIX, unix.SOCK_STREAM), sock(t, unix.AF_UNIX, unix.SOCK_STREAM)}
		}), vhostuser.ErrInvalidMessage},
		{"with a payload", stateNegotiated, send(u64(0), unixStream), vhostuser.ErrInvalidMessage},
		{"an eventfd", stateNegotiated, send(nil, func(t *testing.T) []int { return []int{fdKinds[0].open(t)} }), vhostuser.ErrInvalidMessage},
		{"a pipe", stateNegotiated, send(nil, func(t *testing.T) []int { return []int{fdKinds[1].open(t)} }), vhostuser.ErrInvalidMessage},
		{"a regular file", stateNegotiated, send(nil, func(t *testing.T) []int { return []int{fdKinds[5].open(t)} }), vhostuser.ErrInvalidMessage},
		{"a unix datagram socket", stateNegotiated, send(nil, func(t *testing.T) []int { return []int{sock(t, unix.AF_UNIX, unix.SOCK_DGRAM)} }), vhostuser.ErrInvalidMessage},
		{"a TCP socket", stateNegotiated, send(nil, func(t *testing.T) []int { return []int{sock(t, unix.AF_INET, unix.SOCK_STREAM)} }), vhostuser.ErrInvalidMessage},
	}, false)
}
