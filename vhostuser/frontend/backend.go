package frontend

import (
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// SetBackendReqFD creates the back-end request channel as QEMU does (a
// unix stream socketpair), sends one end with SET_BACKEND_REQ_FD and keeps
// the other as f.Backend, closed by Close. Calling it again replaces
// f.Backend (the old end is closed).
func (f *Frontend) SetBackendReqFD() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socketpair: %w", err)
	}
	_, err = f.Call(vhostuser.ReqSetBackendReqFD, nil, fds[1])
	unix.Close(fds[1])
	if err != nil {
		unix.Close(fds[0])
		return err
	}
	file := os.NewFile(uintptr(fds[0]), "backend-req")
	c, err := net.FileConn(file)
	file.Close()
	if err != nil {
		return err
	}
	if f.Backend != nil {
		f.Backend.Close()
	}
	f.Backend = c.(*net.UnixConn)
	return nil
}

// ReadBackendRequest reads one request the back-end sent on f.Backend: a
// header with flags VERSION, optionally NEED_REPLY, and at most 4096 bytes
// of payload.
func (f *Frontend) ReadBackendRequest() (vhostuser.Header, []byte, error) {
	var hb [vhostuser.HeaderSize]byte
	if _, err := io.ReadFull(f.Backend, hb[:]); err != nil {
		return vhostuser.Header{}, nil, err
	}
	h, _ := vhostuser.ParseHeader(hb[:])
	if h.Flags&^uint32(vhostuser.FlagNeedReply) != vhostuser.FlagVersion || h.Size > vhostuser.MaxPayloadSize {
		return h, nil, fmt.Errorf("back-end request %d flags %#x size %d: %w", uint32(h.Request), h.Flags, h.Size, ErrProtocol)
	}
	p := make([]byte, h.Size)
	if _, err := io.ReadFull(f.Backend, p); err != nil {
		return h, nil, err
	}
	return h, p, nil
}

// AckBackendRequest answers a back-end request that set NEED_REPLY with a
// u64 status (0 success), as QEMU's backend_read does.
func (f *Frontend) AckBackendRequest(h vhostuser.Header, status uint64) error {
	b := vhostuser.AppendHeader(nil, vhostuser.Header{Request: h.Request, Flags: vhostuser.FlagVersion | vhostuser.FlagReply, Size: vhostuser.U64Size})
	_, err := f.Backend.Write(le.AppendUint64(b, status))
	return err
}
