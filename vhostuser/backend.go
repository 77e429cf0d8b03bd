package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// BackendRequest is a back-end → front-end request code, sent on the
// channel from SET_BACKEND_REQ_FD (vhost-user spec, "Back-end message
// types"). Only the codes this back-end sends are named.
type BackendRequest uint32

// BackendConfigChangeMsg asks the front-end to re-read the config space
// with GET_CONFIG (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, no payload); QEMU
// then raises a config interrupt in the guest if the capacity changed.
const BackendConfigChangeMsg BackendRequest = 2

// ErrNoBackendChannel: there is no connected front-end, or it did not
// negotiate VHOST_USER_PROTOCOL_F_BACKEND_REQ and send SET_BACKEND_REQ_FD.
var ErrNoBackendChannel = errors.New("vhostuser: no back-end request channel")

// ErrBackendRequestFailed: the front-end answered a back-end request with a
// non-zero REPLY_ACK status.
var ErrBackendRequestFailed = errors.New("vhostuser: back-end request failed")

// backendChannel is the socket from SET_BACKEND_REQ_FD. The control
// goroutine creates it and closes it (on replacement and at teardown);
// senders take mu for one whole request, reply included. Close does not
// take mu: closing the socket is what unblocks a sender waiting for a
// front-end that does not answer.
type backendChannel struct {
	c   *net.UnixConn
	ack bool // REPLY_ACK negotiated when the channel was set: ask for acks
	mu  sync.Mutex
}

// setBackendReqFD takes the front-end's end of the back-end channel
// (VHOST_USER_SET_BACKEND_REQ_FD). It must be a connected unix stream
// socket; a second one replaces the first, which is closed.
func (s *session) setBackendReqFD(m *message) error {
	fd := m.fds[0]
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return fmt.Errorf("SET_BACKEND_REQ_FD: fd is not a stream socket (type %d, %v): %w", typ, err, ErrInvalidMessage)
	}
	if dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil || dom != unix.AF_UNIX {
		return fmt.Errorf("SET_BACKEND_REQ_FD: fd is not a unix socket (domain %d, %v): %w", dom, err, ErrInvalidMessage)
	}
	f := os.NewFile(uintptr(m.takeFD(0)), "vhost-user-backend-req")
	nc, err := net.FileConn(f) // dups the fd
	f.Close()
	if err != nil {
		return fmt.Errorf("SET_BACKEND_REQ_FD: %v: %w", err, ErrInvalidMessage)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return fmt.Errorf("SET_BACKEND_REQ_FD: fd is not a unix socket: %w", ErrInvalidMessage)
	}
	b := &backendChannel{c: uc, ack: s.protoAcked&ProtoReplyAck != 0}
	if old := s.backend.Swap(b); old != nil {
		old.c.Close()
	}
	return nil
}

// closeBackend closes the channel, if any; a sender blocked on it returns.
func (s *session) closeBackend() {
	if b := s.backend.Swap(nil); b != nil {
		b.c.Close()
	}
}

// notifyConfigChange sends BACKEND_CONFIG_CHANGE_MSG and, when REPLY_ACK
// is negotiated, waits for the front-end's ack. It runs on the caller's
// goroutine, never the control goroutine: QEMU answers only after it has
// re-read the config with GET_CONFIG, which the control goroutine serves.
func (s *session) notifyConfigChange(ctx context.Context) error {
	b := s.backend.Load()
	if b == nil {
		return ErrNoBackendChannel
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.c.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("CONFIG_CHANGE_MSG: %v: %w", err, ErrDisconnected)
	}
	stop := context.AfterFunc(ctx, func() { b.c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	// Any failure leaves the channel out of step (a late ack would be
	// taken for the next request's): it is closed, and later
	// notifications report ErrNoBackendChannel.
	fail := func(what string, err error) error {
		s.closeBackendChannel(b)
		if ctx.Err() != nil {
			return fmt.Errorf("CONFIG_CHANGE_MSG: %s: %w", what, ctx.Err())
		}
		return fmt.Errorf("CONFIG_CHANGE_MSG: %s: %v: %w", what, err, ErrDisconnected)
	}
	flags := uint32(FlagVersion)
	if b.ack {
		flags |= FlagNeedReply
	}
	msg := AppendHeader(nil, Header{Request: Request(BackendConfigChangeMsg), Flags: flags})
	if _, err := b.c.Write(msg); err != nil {
		return fail("write", err)
	}
	if !b.ack {
		return nil
	}
	var reply [HeaderSize + U64Size]byte
	if _, err := io.ReadFull(b.c, reply[:HeaderSize]); err != nil {
		return fail("reading the ack", err)
	}
	h, _ := ParseHeader(reply[:HeaderSize])
	if h.Request != Request(BackendConfigChangeMsg) || h.Flags != FlagVersion|FlagReply || h.Size != U64Size {
		s.closeBackendChannel(b)
		return fmt.Errorf("CONFIG_CHANGE_MSG: reply request %d flags %#x size %d: %w", uint32(h.Request), h.Flags, h.Size, ErrInvalidMessage)
	}
	if _, err := io.ReadFull(b.c, reply[HeaderSize:]); err != nil {
		return fail("reading the ack", err)
	}
	if st := le.Uint64(reply[HeaderSize:]); st != 0 {
		// QEMU fails it only when re-reading the config failed; the
		// channel stays usable.
		return fmt.Errorf("CONFIG_CHANGE_MSG: status %d: %w", st, ErrBackendRequestFailed)
	}
	return nil
}

// closeBackendChannel closes b if it is still the session's channel.
func (s *session) closeBackendChannel(b *backendChannel) {
	if s.backend.CompareAndSwap(b, nil) {
		b.c.Close()
	}
}

// ConfigNotifier announces changes of the served device's config space
// (a new capacity after the disk grew or shrank) to the front-end that is
// connected at the time. Give one to Options.Notifier; its methods are safe
// for concurrent use and may be called whether or not a front-end is
// connected.
type ConfigNotifier struct {
	mu  sync.Mutex
	cur *session // the connection being served, nil between connections
}

// NotifyConfigChange sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to the
// connected front-end, which re-reads the config (GET_CONFIG returns the
// disk's size at that moment) and, for QEMU, tells the guest. With
// REPLY_ACK negotiated it returns after the front-end acknowledged, so the
// re-read is done. It returns ErrNoBackendChannel when no connected
// front-end set up the channel, and ctx.Err() if ctx ends first.
func (n *ConfigNotifier) NotifyConfigChange(ctx context.Context) error {
	n.mu.Lock()
	s := n.cur
	n.mu.Unlock()
	if s == nil {
		return ErrNoBackendChannel
	}
	return s.notifyConfigChange(ctx)
}

func (n *ConfigNotifier) attach(s *session) {
	if n == nil {
		return
	}
	n.mu.Lock()
	n.cur = s
	n.mu.Unlock()
}

func (n *ConfigNotifier) detach(s *session) {
	if n == nil {
		return
	}
	n.mu.Lock()
	if n.cur == s {
		n.cur = nil
	}
	n.mu.Unlock()
}
