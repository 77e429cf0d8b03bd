package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
)

// Events receives what happens on the server, so that the caller can log
// it. Methods are called from the connection goroutine and from queue
// workers concurrently and must not block for long.
type Events interface {
	// ConnOpened: a front-end connected; id numbers connections.
	ConnOpened(id uint64)
	// ConnClosed: the connection ended. err is nil for an orderly
	// disconnect or shutdown, otherwise the reason (wrapping one of the
	// package's sentinel errors).
	ConnClosed(id uint64, err error)
	// QueueBroken: a ring-level error (guest broke the ring, memory fault);
	// the queue does no more work until it is stopped or reset. Reported
	// once per start of the queue.
	QueueBroken(conn uint64, queue int, err error)
	// RequestFailed: one request completed with an error status or a
	// malformed descriptor chain; the queue keeps working. A hostile guest
	// can make this frequent: rate-limit any logging.
	RequestFailed(conn uint64, queue int, err error)
}

// RecoveryEvents is an optional extension of Events, found by type
// assertion: QueueRecovered reports a ring that started from an inflight
// region in which a previous back-end (or connection) left n requests in
// flight; they are redone before any new request.
type RecoveryEvents interface {
	QueueRecovered(conn uint64, queue int, n int)
}

// MessageEvents is an optional extension of Events, found by type
// assertion: MessageHandled reports every front-end message once it was
// handled (err is what handling it returned; a non-nil err other than a
// refusal ends the connection). For a trace of the control channel: a
// front-end that stops half-way through a start sequence shows where.
type MessageEvents interface {
	MessageHandled(conn uint64, request string, err error)
}

// CacheEvents is an optional extension of Events, found by type assertion:
// WriteCacheChanged reports that the front-end switched the device's write
// cache (SET_CONFIG of writeback): writeThrough true means every write is
// now flushed before it completes.
type CacheEvents interface {
	WriteCacheChanged(conn uint64, writeThrough bool)
}

// NopEvents ignores all events.
type NopEvents struct{}

func (NopEvents) ConnOpened(uint64)                {}
func (NopEvents) ConnClosed(uint64, error)         {}
func (NopEvents) QueueBroken(uint64, int, error)   {}
func (NopEvents) RequestFailed(uint64, int, error) {}

// MaxPollWindow bounds Options.PollWindow: a longer window only burns a
// core after the guest went quiet.
const MaxPollWindow = 10 * time.Millisecond

// Options configure a server.
type Options struct {
	// Disk is the storage served; it must be safe for concurrent use by
	// the queue workers.
	Disk blk.Disk
	// Blk configures the virtio-blk device. Blk.NumQueues is set from
	// NumQueues when zero, and must match it otherwise.
	Blk blk.Options
	// NumQueues is the number of request queues offered (GET_QUEUE_NUM),
	// 1..MaxQueues; 0 means MaxQueues. Offering many is free: a queue
	// costs a worker goroutine and ring state only once the front-end
	// sets it up, so the default serves QEMU's default of one queue per
	// vCPU without configuration.
	NumQueues int
	// Events receives connection and queue events; nil means NopEvents.
	Events Events
	// Notifier, if set, is attached to each connection while it is
	// served, so its NotifyConfigChange reaches the current front-end.
	Notifier *ConfigNotifier
	// Gate, if set, is shared by the Serve calls that serve one disk on
	// several sockets: the rings of only one connection run at a time
	// (RingGate, handoff.go).
	Gate *RingGate
	// Monitor, if set, reports the connected front-end's state
	// (status.go).
	Monitor *Monitor
	// Stats, if set, counts every request per queue (blk.Stats); queue
	// i counts into Stats.Queue(i).
	Stats *blk.Stats
	// PollWindow, if positive, is how long a ring's owner keeps looking
	// at the avail ring after it found it empty, before it sleeps until
	// a kick (worker.go: adaptive polling). 0: sleep at once.
	PollWindow time.Duration
}

func (o Options) normalize() (Options, error) {
	if o.Disk == nil {
		return o, fmt.Errorf("Disk is nil: %w", ErrInvalidOptions)
	}
	if o.NumQueues == 0 {
		o.NumQueues = MaxQueues
	}
	if o.PollWindow < 0 || o.PollWindow > MaxPollWindow {
		return o, fmt.Errorf("PollWindow %v not in 0..%v: %w", o.PollWindow, MaxPollWindow, ErrInvalidOptions)
	}
	if o.NumQueues < 1 || o.NumQueues > MaxQueues {
		return o, fmt.Errorf("NumQueues %d not in 1..%d: %w", o.NumQueues, MaxQueues, ErrInvalidOptions)
	}
	if o.Blk.NumQueues == 0 {
		o.Blk.NumQueues = uint16(o.NumQueues)
	} else if int(o.Blk.NumQueues) != o.NumQueues {
		return o, fmt.Errorf("Blk.NumQueues %d != NumQueues %d: %w", o.Blk.NumQueues, o.NumQueues, ErrInvalidOptions)
	}
	if o.Events == nil {
		o.Events = NopEvents{}
	}
	if o.Blk.Cache == nil && !o.Blk.ReadOnly {
		// One cache mode per Serve: it outlives a connection, since QEMU
		// does not repeat SET_CONFIG when it reconnects and the guest
		// keeps the mode it chose.
		o.Blk.Cache = new(blk.WriteCache)
	}
	return o, nil
}

var connIDs atomic.Uint64

// Serve accepts front-ends on ln one at a time: while a connection is
// served, the next one waits in the listen backlog; when it ends (orderly,
// or because the front-end broke the protocol) Serve accepts again, as
// QEMU's reconnect=1 expects (vhost-user.md §1.13 item 7).
//
// When ctx is cancelled Serve stops accepting, stops the queue workers
// after their in-flight requests complete, unmaps guest memory and returns
// nil. Serve closes ln before it returns. Any other return is an accept
// error.
func Serve(ctx context.Context, ln *net.UnixListener, opts Options) error {
	defer ln.Close()
	opts, err := opts.normalize()
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	socket := ln.Addr().String()
	opts.Monitor.listening(socket)
	var backoff time.Duration
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			// Running out of fds or memory is a passing condition: wait
			// and accept again rather than taking the daemon down, as
			// net/http's server does.
			if temporaryAcceptError(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(backoff):
				}
				continue
			}
			return fmt.Errorf("vhostuser: accept: %w", err)
		}
		backoff = 0
		// Errors are reported through Events.ConnClosed; the server lives on.
		_ = serveConn(ctx, c, opts, socket)
		if ctx.Err() != nil {
			return nil
		}
	}
}

// ServeConn serves one front-end on c until it disconnects, breaks the
// protocol, or ctx is cancelled, then releases everything the session held
// (workers, fds, mappings) and closes c. It returns nil for an orderly end
// and otherwise the error that ended the session (also passed to
// Events.ConnClosed).
func ServeConn(ctx context.Context, c *net.UnixConn, opts Options) error {
	opts, err := opts.normalize()
	if err != nil {
		c.Close()
		return err
	}
	socket := ""
	if a := c.LocalAddr(); a != nil { // nil for some inherited or socketpair conns
		socket = a.String()
	}
	return serveConn(ctx, c, opts, socket)
}

// serveConn serves c, which came in on socket (for Monitor).
func serveConn(ctx context.Context, c *net.UnixConn, opts Options, socket string) error {
	id := connIDs.Add(1)
	opts.Events.ConnOpened(id)
	s := newSession(id, c, opts)
	s.ctx = ctx
	opts.Notifier.attach(s)
	opts.Monitor.attach(s, socket)
	// Cancellation interrupts the blocked read, and a reply write blocked
	// by a front-end that does not read; the request being handled, if
	// any, completes first.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	err := s.run()
	stop()
	opts.Notifier.detach(s)
	// The Monitor keeps s until its workers have stopped: a Quiesce in
	// between must still hold their last requests (status.go).
	s.teardown()
	opts.Monitor.detach(s)
	c.Close()
	if ctx.Err() != nil && errors.Is(err, ErrDisconnected) {
		err = nil
	}
	opts.Events.ConnClosed(id, err)
	return err
}

// Listen creates a listening socket at path. A stale socket file left by a
// previous run is removed first; any other kind of file at path is an
// error, so Listen never deletes a regular file by mistake.
func Listen(path string) (*net.UnixListener, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && fi.Mode()&fs.ModeSocket == 0:
		return nil, fmt.Errorf("vhostuser: %s exists and is not a socket: %w", path, fs.ErrExist)
	case err == nil:
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("vhostuser: removing stale socket: %w", err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("vhostuser: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vhostuser: %w", err)
	}
	return ln, nil
}

// FromFD turns an inherited listening unix stream socket (--fd N, vhost-user
// spec "Backend program conventions") into a listener. It takes ownership
// of fd: fd is closed whether or not FromFD succeeds.
func FromFD(fd int) (*net.UnixListener, error) {
	if fd < 0 {
		return nil, fmt.Errorf("vhostuser: fd %d: %w", fd, ErrInvalidOptions)
	}
	f := os.NewFile(uintptr(fd), "vhost-user-listener")
	defer f.Close()
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return nil, fmt.Errorf("vhostuser: fd %d is not a stream socket (type %d, %v): %w", fd, typ, err, ErrInvalidOptions)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return nil, fmt.Errorf("vhostuser: fd %d is not listening (%v): %w", fd, err, ErrInvalidOptions)
	}
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("vhostuser: fd %d: %w", fd, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("vhostuser: fd %d is not a unix socket: %w", fd, ErrInvalidOptions)
	}
	return ul, nil
}

// temporaryAcceptError reports whether an accept failure may clear by itself
// (accept(2): EMFILE, ENFILE, ENOBUFS, ENOMEM; ECONNABORTED for a peer that
// left the backlog).
func temporaryAcceptError(err error) bool {
	for _, e := range []error{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
