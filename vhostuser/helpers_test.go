package vhostuser_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// memDisk is an in-memory blk.Disk.
type memDisk struct {
	mu      sync.RWMutex
	data    []byte
	flushes int
}

func newMemDisk(size int) *memDisk { return &memDisk{data: make([]byte, size)} }

func (d *memDisk) ReadVec(bufs [][]byte, off int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	for _, b := range bufs {
		if off < 0 || off+int64(len(b)) > int64(len(d.data)) {
			return errors.New("memDisk: read out of range")
		}
		off += int64(copy(b, d.data[off:]))
	}
	return nil
}

func (d *memDisk) WriteVec(bufs [][]byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		if off < 0 || off+int64(len(b)) > int64(len(d.data)) {
			return errors.New("memDisk: write out of range")
		}
		off += int64(copy(d.data[off:], b))
	}
	return nil
}

func (d *memDisk) Flush() error {
	d.mu.Lock()
	d.flushes++
	d.mu.Unlock()
	return nil
}

func (d *memDisk) Size() int64                { return int64(len(d.data)) }
func (d *memDisk) LogicalSectorSize() uint32  { return 512 }
func (d *memDisk) PhysicalSectorSize() uint32 { return 512 }

func (d *memDisk) bytes(off, n int) []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]byte(nil), d.data[off:off+n]...)
}

type closedEvent struct {
	id  uint64
	err error
}

type brokenEvent struct {
	queue int
	err   error
}

// recorder collects server events; tests block on its channels, bounded
// only by the test binary's -timeout, never by a sleep.
type recorder struct {
	opened chan uint64
	closed chan closedEvent
	broken chan brokenEvent
	failed chan error
	// recovered gets {queue, n} for every QueueRecovered.
	recovered chan [2]int
	// messages gets "NAME" or "NAME: error" for every MessageHandled.
	messages chan string
}

func newRecorder() *recorder {
	return &recorder{
		opened: make(chan uint64, 1000),
		closed: make(chan closedEvent, 1000),
		broken: make(chan brokenEvent, 100),
		failed: make(chan error, 1000),

		recovered: make(chan [2]int, 100),
		messages:  make(chan string, 1000),
	}
}

func (r *recorder) ConnOpened(id uint64)            { r.opened <- id }
func (r *recorder) ConnClosed(id uint64, err error) { r.closed <- closedEvent{id, err} }
func (r *recorder) QueueBroken(_ uint64, q int, err error) {
	r.broken <- brokenEvent{q, err}
}
func (r *recorder) QueueRecovered(_ uint64, q int, n int) {
	r.recovered <- [2]int{q, n}
}
func (r *recorder) MessageHandled(_ uint64, request string, err error) {
	if err != nil {
		request += ": " + err.Error()
	}
	select {
	case r.messages <- request:
	default:
	}
}
func (r *recorder) RequestFailed(_ uint64, _ int, err error) {
	select {
	case r.failed <- err:
	default:
	}
}

const (
	testDiskSize = 4 << 20
	testSerial   = "vhost-vhdx-test"
)

type testServer struct {
	path string
	disk *memDisk
	ev   *recorder
	done chan error
	stop context.CancelFunc
}

// startServer runs Serve on a fresh socket until the test ends.
func startServer(t *testing.T, numQueues int) *testServer {
	t.Helper()
	return startServerOpts(t, vhostuser.Options{NumQueues: numQueues})
}

// testPollWindow is serve's default --poll-us: the tests run the owners
// as the daemon does, polling an empty ring before they sleep.
const testPollWindow = 50 * time.Microsecond

// startServerOpts is startServer with options: Disk defaults to a memDisk
// (s.disk, nil when opts.Disk is set), Blk.Serial to testSerial, Events to a
// recorder, PollWindow to testPollWindow.
func startServerOpts(t *testing.T, opts vhostuser.Options) *testServer {
	t.Helper()
	dir, err := os.MkdirTemp("", "vu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s.sock")
	ln, err := vhostuser.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &testServer{path: path, ev: newRecorder(), done: make(chan error, 1), stop: cancel}
	if opts.Disk == nil {
		s.disk = newMemDisk(testDiskSize)
		opts.Disk = s.disk
	}
	if opts.Blk.Serial == "" {
		opts.Blk.Serial = testSerial
	}
	if opts.PollWindow == 0 {
		opts.PollWindow = testPollWindow
	}
	opts.Events = s.ev
	go func() { s.done <- vhostuser.Serve(ctx, ln, opts) }()
	t.Cleanup(func() {
		cancel()
		if err := <-s.done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func (s *testServer) dial(t *testing.T) *frontend.Frontend {
	t.Helper()
	f, err := frontend.Dial(s.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// connect dials and runs the full negotiation.
func (s *testServer) connect(t *testing.T, o frontend.Options) *frontend.Frontend {
	t.Helper()
	f := s.dial(t)
	if err := f.Setup(o); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	return f
}

// waitClosed waits for the server to report the end of a connection.
func (s *testServer) waitClosed(t *testing.T) closedEvent {
	t.Helper()
	return <-s.ev.closed
}

// socketpair returns both ends of a unix stream socketpair as UnixConns.
func socketpair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unixSocketpair()
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1]
}
