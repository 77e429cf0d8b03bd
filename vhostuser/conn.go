package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// message is one validated front-end request. fds are owned by the message:
// a handler that keeps one sets its slot to -1; the dispatcher closes the
// rest.
type message struct {
	hdr     Header
	spec    msgSpec
	payload []byte // aliases the connection's buffer until the next read
	fds     []int
}

// takeFD hands fd i to the caller.
func (m *message) takeFD(i int) int {
	fd := m.fds[i]
	m.fds[i] = -1
	return fd
}

func (m *message) closeFDs() { closeFDs(m.fds) }

func closeFDs(fds []int) {
	for i, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
			fds[i] = -1
		}
	}
}

// wireConn reads and writes vhost-user messages on a unix stream socket.
type wireConn struct {
	c   *net.UnixConn
	buf [HeaderSize + MaxPayloadSize]byte
	oob []byte
	out []byte
}

func newWireConn(c *net.UnixConn) *wireConn {
	return &wireConn{c: c, oob: make([]byte, unix.CmsgSpace(MaxFDs*4))}
}

// recv reads into p with recvmsg, appending received fds to *fds. The net
// package retries EINTR itself (internal/poll); the explicit check keeps
// that guarantee if the socket is ever read with raw syscalls.
func (w *wireConn) recv(p []byte, fds *[]int) (int, error) {
	for {
		n, oobn, flags, _, err := w.c.ReadMsgUnix(p, w.oob)
		if oobn > 0 {
			// Collect fds even when err != nil so they are closed, not leaked.
			if perr := parseRights(w.oob[:oobn], fds); perr != nil && err == nil {
				err = perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 && err == nil {
			// The kernel dropped fds that did not fit: the message cannot
			// be interpreted (style.md §12 item 13).
			err = fmt.Errorf("control message truncated (more than %d fds): %w", MaxFDs, ErrInvalidMessage)
		}
		if errors.Is(err, syscall.EINTR) {
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func parseRights(oob []byte, fds *[]int) error {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("control message: %v: %w", err, ErrInvalidMessage)
	}
	var bad error
	for _, cm := range cmsgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			bad = fmt.Errorf("SCM_RIGHTS: %v: %w", err, ErrInvalidMessage)
			continue
		}
		*fds = append(*fds, got...)
	}
	return bad
}

// readMessage reads one request. It returns io.EOF if the peer closed the
// socket between messages. On any error all fds received so far are
// closed.
func (w *wireConn) readMessage() (m *message, err error) {
	var fds []int
	defer func() {
		if err != nil {
			closeFDs(fds)
		}
	}()
	// Header: fds travel with its first byte (spec "Communication"), but
	// tolerate short reads as qemu-storage-daemon's vu_message_read does.
	got := 0
	for got < HeaderSize {
		n, err := w.recv(w.buf[got:HeaderSize], &fds)
		got += n
		if err != nil {
			if errors.Is(err, io.EOF) && got == 0 && len(fds) == 0 {
				return nil, io.EOF
			}
			if errors.Is(err, ErrInvalidMessage) {
				return nil, err
			}
			return nil, fmt.Errorf("reading header (%d of %d bytes): %v: %w", got, HeaderSize, err, ErrDisconnected)
		}
		if n == 0 {
			return nil, fmt.Errorf("reading header (%d of %d bytes): %w", got, HeaderSize, ErrDisconnected)
		}
		if len(fds) > MaxFDs {
			return nil, fmt.Errorf("header: %d fds: %w", len(fds), ErrInvalidMessage)
		}
	}
	h, err := ParseHeader(w.buf[:HeaderSize])
	if err != nil {
		return nil, err
	}
	// Size and fd count are checked before a single payload byte is read.
	spec, err := checkHeader(h, len(fds))
	if err != nil {
		return nil, err
	}
	p := w.buf[HeaderSize : HeaderSize+int(h.Size)]
	for got = 0; got < len(p); {
		var extra []int
		n, err := w.recv(p[got:], &extra)
		got += n
		if len(extra) > 0 {
			closeFDs(extra)
			return nil, fmt.Errorf("%s: fds sent with the payload: %w", spec.name, ErrInvalidMessage)
		}
		if err != nil {
			if errors.Is(err, ErrInvalidMessage) {
				return nil, err
			}
			return nil, fmt.Errorf("%s: reading payload (%d of %d bytes): %v: %w", spec.name, got, len(p), err, ErrDisconnected)
		}
		if n == 0 {
			return nil, fmt.Errorf("%s: reading payload (%d of %d bytes): %w", spec.name, got, len(p), ErrDisconnected)
		}
	}
	if err := checkBody(spec, p, len(fds)); err != nil {
		return nil, err
	}
	return &message{hdr: h, spec: spec, payload: p, fds: fds}, nil
}

// writeReply sends a reply: same request code, flags exactly VERSION|REPLY
// (QEMU rejects anything else, vhost-user.md §1.1).
func (w *wireConn) writeReply(req Request, payload []byte) error {
	return w.writeReplyFD(req, payload, -1)
}

// writeReplyFD is writeReply with fd (if >= 0) attached to the sendmsg
// carrying the header's first byte (spec "Communication"). It does not
// close fd.
func (w *wireConn) writeReplyFD(req Request, payload []byte, fd int) error {
	w.out = AppendHeader(w.out[:0], Header{Request: req, Flags: FlagVersion | FlagReply, Size: uint32(len(payload))})
	w.out = append(w.out, payload...)
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	n, _, err := w.c.WriteMsgUnix(w.out, oob, nil)
	if err == nil && n < len(w.out) {
		_, err = w.c.Write(w.out[n:])
	}
	if err != nil {
		return fmt.Errorf("%s reply: %v: %w", req, err, ErrDisconnected)
	}
	return nil
}
