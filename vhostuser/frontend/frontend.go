// Package frontend is a vhost-user front-end written in Go: the role QEMU
// plays towards a vhost-user-blk back-end. It exists to drive the back-end
// without a guest — in tests, and as the core of a load generator — the
// way libblkio's virtio-blk-vhost-user driver does (vhost-user.md §6.2).
//
// A Frontend owns one socket connection, a memfd that plays guest RAM,
// and per queue a split ring laid out in that memory plus kick and call
// eventfds. Besides the typed requests and the full Setup negotiation it
// has a raw mode (Send, SendRaw, ReadReply) for hostile tests.
//
// Guest-physical and front-end user addresses are deliberately different
// (GuestPhysBase, UserBase), so a back-end that confuses the two address
// spaces (vhost-user spec, "Memory access") fails visibly.
//
// A Frontend is not safe for concurrent use, except that different Queues
// may be driven from different goroutines once Setup has returned.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// Address bases of the fake guest memory (one region).
const (
	GuestPhysBase = 0x40000000
	UserBase      = 0x7f1234000000
)

// ErrNack: the back-end answered a NEED_REPLY request with a non-zero
// REPLY_ACK status.
var ErrNack = errors.New("frontend: request refused by back-end")

// ErrProtocol: the back-end sent a reply that breaks the protocol.
var ErrProtocol = errors.New("frontend: protocol error")

// Frontend is one connection to a vhost-user back-end.
type Frontend struct {
	conn *net.UnixConn

	// Negotiated state, filled by Setup or the typed calls.
	Features         uint64 // virtio features sent with SET_FEATURES
	ProtocolFeatures uint64 // protocol features sent with SET_PROTOCOL_FEATURES
	QueueNum         uint64 // GET_QUEUE_NUM answer (1 without MQ)
	Config           []byte // GET_CONFIG answer from Setup

	// Guest memory.
	memfd int
	Mem   []byte // the whole fake guest RAM
	alloc int    // bump allocator offset in Mem

	Queues []*Queue

	// Backend is the front-end's end of the back-end request channel
	// (SetBackendReqFD), nil until then.
	Backend *net.UnixConn

	// CallBeforeKick makes every queue start send SET_VRING_CALL before
	// SET_VRING_KICK, the order QEMU 7.2's vhost-user-blk uses (it
	// unmasks the call notifiers before vhost_dev_start); newer QEMU
	// sends CALL after KICK.
	CallBeforeKick bool

	out []byte
}

// New wraps an established connection.
func New(c *net.UnixConn) *Frontend { return &Frontend{conn: c, memfd: -1} }

// Dial connects to a back-end listening at path.
func Dial(path string) (*Frontend, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return New(c), nil
}

// Conn returns the socket, e.g. to close its write side in tests.
func (f *Frontend) Conn() *net.UnixConn { return f.conn }

// Close releases the socket, eventfds, memfd and mapping.
func (f *Frontend) Close() error {
	err := f.conn.Close()
	if f.Backend != nil {
		f.Backend.Close()
		f.Backend = nil
	}
	for _, q := range f.Queues {
		q.close()
	}
	f.Queues = nil
	if f.Mem != nil {
		unix.Munmap(f.Mem)
		f.Mem = nil
	}
	if f.memfd >= 0 {
		unix.Close(f.memfd)
		f.memfd = -1
	}
	return err
}

// SendRaw writes b as one sendmsg with fds attached, whatever b holds.
func (f *Frontend) SendRaw(b []byte, fds ...int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := f.conn.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n < len(b) {
		_, err = f.conn.Write(b[n:])
	}
	return err
}

// Send writes one message with the given flags; fds travel with the
// header's first byte (spec "Communication").
func (f *Frontend) Send(req vhostuser.Request, flags uint32, payload []byte, fds ...int) error {
	f.out = vhostuser.AppendHeader(f.out[:0], vhostuser.Header{Request: req, Flags: flags, Size: uint32(len(payload))})
	f.out = append(f.out, payload...)
	return f.SendRaw(f.out, fds...)
}

// ReadReply reads one message from the back-end and checks that it is a
// well-formed reply (flags exactly VERSION|REPLY, size ≤ 4096).
func (f *Frontend) ReadReply() (vhostuser.Header, []byte, error) {
	var hb [vhostuser.HeaderSize]byte
	if _, err := io.ReadFull(f.conn, hb[:]); err != nil {
		return vhostuser.Header{}, nil, err
	}
	h, _ := vhostuser.ParseHeader(hb[:])
	if h.Flags != vhostuser.FlagVersion|vhostuser.FlagReply {
		return h, nil, fmt.Errorf("%s reply flags %#x: %w", h.Request, h.Flags, ErrProtocol)
	}
	if h.Size > vhostuser.MaxPayloadSize {
		return h, nil, fmt.Errorf("%s reply size %d: %w", h.Request, h.Size, ErrProtocol)
	}
	p := make([]byte, h.Size)
	if _, err := io.ReadFull(f.conn, p); err != nil {
		return h, nil, err
	}
	return h, p, nil
}

// hasReply lists the requests answered with an explicit body.
func hasReply(r vhostuser.Request) bool {
	switch r {
	case vhostuser.ReqGetFeatures, vhostuser.ReqGetProtocolFeatures, vhostuser.ReqGetVringBase,
		vhostuser.ReqGetQueueNum, vhostuser.ReqGetConfig, vhostuser.ReqGetStatus,
		vhostuser.ReqGetMaxMemSlots, vhostuser.ReqSetLogBase:
		return true
	}
	return false
}

// Call sends a request and reads its reply. Requests without a reply body
// are sent with NEED_REPLY when REPLY_ACK is negotiated, and a non-zero
// ack becomes ErrNack.
func (f *Frontend) Call(req vhostuser.Request, payload []byte, fds ...int) ([]byte, error) {
	flags := uint32(vhostuser.FlagVersion)
	ack := !hasReply(req) && f.ProtocolFeatures&vhostuser.ProtoReplyAck != 0
	if ack {
		flags |= vhostuser.FlagNeedReply
	}
	if err := f.Send(req, flags, payload, fds...); err != nil {
		return nil, err
	}
	if !ack && !hasReply(req) {
		return nil, nil
	}
	h, p, err := f.ReadReply()
	if err != nil {
		return nil, err
	}
	if h.Request != req {
		return nil, fmt.Errorf("reply to %s is for %s: %w", req, h.Request, ErrProtocol)
	}
	if ack {
		v, err := vhostuser.ParseU64(p)
		if err != nil {
			return nil, fmt.Errorf("%s ack: %w", req, err)
		}
		if v != 0 {
			return nil, fmt.Errorf("%s: status %d: %w", req, v, ErrNack)
		}
		return nil, nil
	}
	return p, nil
}

func (f *Frontend) callU64(req vhostuser.Request) (uint64, error) {
	p, err := f.Call(req, nil)
	if err != nil {
		return 0, err
	}
	v, err := vhostuser.ParseU64(p)
	if err != nil {
		return 0, fmt.Errorf("%s reply: %w", req, err)
	}
	return v, nil
}

func u64(v uint64) []byte { return le.AppendUint64(nil, v) }

// GetFeatures sends GET_FEATURES.
func (f *Frontend) GetFeatures() (uint64, error) { return f.callU64(vhostuser.ReqGetFeatures) }

// SetFeatures sends SET_FEATURES and records v.
func (f *Frontend) SetFeatures(v uint64) error {
	_, err := f.Call(vhostuser.ReqSetFeatures, u64(v))
	if err == nil {
		f.Features = v
	}
	return err
}

// GetProtocolFeatures sends GET_PROTOCOL_FEATURES.
func (f *Frontend) GetProtocolFeatures() (uint64, error) {
	return f.callU64(vhostuser.ReqGetProtocolFeatures)
}

// SetProtocolFeatures sends SET_PROTOCOL_FEATURES and records v; from then
// on REPLY_ACK is used if v has it.
func (f *Frontend) SetProtocolFeatures(v uint64) error {
	// The ack (if any) only starts with the next request.
	f.ProtocolFeatures = 0
	_, err := f.Call(vhostuser.ReqSetProtocolFeatures, u64(v))
	if err == nil {
		f.ProtocolFeatures = v
	}
	return err
}

// SetOwner sends SET_OWNER.
func (f *Frontend) SetOwner() error { _, err := f.Call(vhostuser.ReqSetOwner, nil); return err }

// ResetDevice sends RESET_DEVICE.
func (f *Frontend) ResetDevice() error { _, err := f.Call(vhostuser.ReqResetDevice, nil); return err }

// GetQueueNum sends GET_QUEUE_NUM.
func (f *Frontend) GetQueueNum() (uint64, error) { return f.callU64(vhostuser.ReqGetQueueNum) }

// SetStatus sends SET_STATUS.
func (f *Frontend) SetStatus(v uint8) error {
	_, err := f.Call(vhostuser.ReqSetStatus, u64(uint64(v)))
	return err
}

// GetStatus sends GET_STATUS.
func (f *Frontend) GetStatus() (uint64, error) { return f.callU64(vhostuser.ReqGetStatus) }

// GetConfig sends GET_CONFIG for size bytes at offset and returns the data;
// an empty reply payload (the back-end's error signal) is an ErrNack.
func (f *Frontend) GetConfig(offset, size uint32) ([]byte, error) {
	p, err := f.Call(vhostuser.ReqGetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigMsg{Offset: offset, Data: make([]byte, size)}))
	if err != nil {
		return nil, err
	}
	if len(p) == 0 {
		return nil, fmt.Errorf("GET_CONFIG offset %d size %d: %w", offset, size, ErrNack)
	}
	c, err := vhostuser.ParseConfig(p)
	if err != nil {
		return nil, err
	}
	if c.Offset != offset || c.Size != size {
		return nil, fmt.Errorf("GET_CONFIG reply offset %d size %d: %w", c.Offset, c.Size, ErrProtocol)
	}
	return c.Data, nil
}

// SetConfig sends SET_CONFIG.
func (f *Frontend) SetConfig(offset, flags uint32, data []byte) error {
	_, err := f.Call(vhostuser.ReqSetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigMsg{Offset: offset, Flags: flags, Data: data}))
	return err
}

// SetVringNum, SetVringBase and SetVringEnable send the vring-state
// requests of the same name.
func (f *Frontend) SetVringNum(idx, num uint32) error {
	_, err := f.Call(vhostuser.ReqSetVringNum, vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx, Num: num}))
	return err
}

func (f *Frontend) SetVringBase(idx, base uint32) error {
	_, err := f.Call(vhostuser.ReqSetVringBase, vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx, Num: base}))
	return err
}

func (f *Frontend) SetVringEnable(idx uint32, on bool) error {
	var n uint32
	if on {
		n = 1
	}
	_, err := f.Call(vhostuser.ReqSetVringEnable, vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx, Num: n}))
	return err
}

// GetVringBase stops ring idx and returns its next avail index.
func (f *Frontend) GetVringBase(idx uint32) (uint32, error) {
	p, err := f.Call(vhostuser.ReqGetVringBase, vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx}))
	if err != nil {
		return 0, err
	}
	st, err := vhostuser.ParseVringState(p)
	if err != nil {
		return 0, err
	}
	if st.Index != idx {
		return 0, fmt.Errorf("GET_VRING_BASE reply for ring %d, asked %d: %w", st.Index, idx, ErrProtocol)
	}
	return st.Num, nil
}

// SetVringAddr sends SET_VRING_ADDR.
func (f *Frontend) SetVringAddr(a vhostuser.VringAddr) error {
	_, err := f.Call(vhostuser.ReqSetVringAddr, vhostuser.AppendVringAddr(nil, a))
	return err
}

// SetVringFD sends SET_VRING_KICK/CALL/ERR for ring idx with fd, or with
// the "no fd" flag when fd < 0.
func (f *Frontend) SetVringFD(req vhostuser.Request, idx uint32, fd int) error {
	v := uint64(idx)
	if fd < 0 {
		v |= vhostuser.VringNoFDFlag
		_, err := f.Call(req, u64(v))
		return err
	}
	_, err := f.Call(req, u64(v), fd)
	return err
}

// CreateMemory creates size bytes of fake guest RAM in a memfd and maps it.
func (f *Frontend) CreateMemory(size int) error {
	if f.Mem != nil {
		return errors.New("frontend: memory already created")
	}
	fd, err := unix.MemfdCreate("vhost-user-frontend-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return fmt.Errorf("ftruncate: %w", err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("mmap: %w", err)
	}
	f.memfd, f.Mem, f.alloc = fd, m, 0
	return nil
}

// MemFD is the memfd backing the guest memory (owned by the Frontend).
func (f *Frontend) MemFD() int { return f.memfd }

// Region describes the whole guest memory as one SET_MEM_TABLE region.
func (f *Frontend) Region() vhostuser.MemRegion {
	return vhostuser.MemRegion{GuestPhysAddr: GuestPhysBase, Size: uint64(len(f.Mem)), UserAddr: UserBase}
}

// SetMemTable sends SET_MEM_TABLE with the one region and the memfd.
func (f *Frontend) SetMemTable() error {
	_, err := f.Call(vhostuser.ReqSetMemTable, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{f.Region()}), f.memfd)
	return err
}

// Alloc reserves n bytes of guest memory aligned to align (a power of two)
// and returns their offset in Mem.
func (f *Frontend) Alloc(n, align int) (int, error) {
	off := (f.alloc + align - 1) &^ (align - 1)
	if n < 0 || off > len(f.Mem)-n {
		return 0, fmt.Errorf("frontend: guest memory exhausted (%d bytes at %d of %d)", n, off, len(f.Mem))
	}
	f.alloc = off + n
	return off, nil
}

// GPA and UVA translate an offset in Mem to a guest-physical or front-end
// user address.
func GPA(off int) uint64 { return GuestPhysBase + uint64(off) }
func UVA(off int) uint64 { return UserBase + uint64(off) }

// Options shape Setup.
type Options struct {
	MemSize     int    // bytes of guest RAM; 0: 8 MiB
	NumQueues   int    // queues to set up; 0: 1
	QueueSize   uint16 // ring size; 0: 128 (QEMU's default)
	MaxIO       int    // largest data buffer per request; 0: 64 KiB
	MaxInflight int    // request slots per queue; 0: 4
	// Features masks the virtio features accepted from GET_FEATURES; 0
	// accepts everything offered but VHOST_F_LOG_ALL.
	Features uint64
	// ProtocolFeatures masks the protocol features accepted; 0 accepts
	// everything offered.
	ProtocolFeatures uint64
	ConfigSize       uint32 // bytes of GET_CONFIG; 0: 60
	// Packed negotiates VIRTIO_F_RING_PACKED and drives packed rings;
	// without it the bit is masked out (the rings are split) whatever
	// Features says.
	Packed bool
}

func (o *Options) defaults() {
	if o.MemSize == 0 {
		o.MemSize = 8 << 20
	}
	if o.NumQueues == 0 {
		o.NumQueues = 1
	}
	if o.QueueSize == 0 {
		o.QueueSize = 128
	}
	if o.MaxIO == 0 {
		o.MaxIO = 64 << 10
	}
	if o.MaxInflight == 0 {
		o.MaxInflight = 4
	}
	if o.Features == 0 {
		// Everything offered except VHOST_F_LOG_ALL, which QEMU acks
		// only while a migration runs (SET_FEATURES again).
		o.Features = ^uint64(vhostuser.FeatureLogAll)
	}
	if o.Packed {
		o.Features |= vhostuser.FeatureRingPacked
	} else {
		o.Features &^= vhostuser.FeatureRingPacked
	}
	if o.ProtocolFeatures == 0 {
		o.ProtocolFeatures = ^uint64(0)
	}
	if o.ConfigSize == 0 {
		o.ConfigSize = 60
	}
}

// Setup runs the whole negotiation in the order QEMU's vhost-user-blk uses
// (vhost-user.md §1.13 items 4-5) and starts every queue.
func (f *Frontend) Setup(o Options) error {
	o.defaults()
	feats, err := f.GetFeatures()
	if err != nil {
		return err
	}
	feats &= o.Features
	if feats&vhostuser.FeatureProtocolFeatures != 0 {
		pf, err := f.GetProtocolFeatures()
		if err != nil {
			return err
		}
		if err := f.SetProtocolFeatures(pf & o.ProtocolFeatures); err != nil {
			return err
		}
	}
	f.QueueNum = 1
	if f.ProtocolFeatures&vhostuser.ProtoMQ != 0 {
		if f.QueueNum, err = f.GetQueueNum(); err != nil {
			return err
		}
	}
	if uint64(o.NumQueues) > f.QueueNum {
		return fmt.Errorf("frontend: back-end supports %d queues, want %d", f.QueueNum, o.NumQueues)
	}
	if err := f.SetOwner(); err != nil {
		return err
	}
	if f.ProtocolFeatures&vhostuser.ProtoConfig != 0 {
		if f.Config, err = f.GetConfig(0, o.ConfigSize); err != nil {
			return err
		}
	}
	if err := f.SetFeatures(feats); err != nil {
		return err
	}
	if err := f.CreateMemory(o.MemSize); err != nil {
		return err
	}
	if err := f.SetMemTable(); err != nil {
		return err
	}
	for i := 0; i < o.NumQueues; i++ {
		q, err := f.NewQueue(i, o.QueueSize, o.MaxInflight, o.MaxIO)
		if err != nil {
			return err
		}
		if err := f.StartQueue(q); err != nil {
			return err
		}
	}
	return nil
}

// StartQueue sends the per-queue start sequence: SET_VRING_NUM, BASE, ADDR,
// KICK, CALL (CALL, KICK with CallBeforeKick), then ENABLE if
// PROTOCOL_FEATURES was negotiated.
func (f *Frontend) StartQueue(q *Queue) error {
	idx := uint32(q.Index)
	if err := f.SetVringNum(idx, uint32(q.Size)); err != nil {
		return err
	}
	base := uint32(q.availIdx)
	if q.packed {
		base = q.packedBase()
	}
	return f.startWithBase(q, base)
}

// startWithBase sends StartQueue's steps after SET_VRING_NUM.
func (f *Frontend) startWithBase(q *Queue, base uint32) error {
	idx := uint32(q.Index)
	if err := f.SetVringBase(idx, base); err != nil {
		return err
	}
	if err := f.SetVringAddr(q.Addr()); err != nil {
		return err
	}
	fds := []struct {
		req vhostuser.Request
		fd  *os.File
	}{{vhostuser.ReqSetVringKick, q.kick}, {vhostuser.ReqSetVringCall, q.call}}
	if f.CallBeforeKick {
		fds[0], fds[1] = fds[1], fds[0]
	}
	for _, m := range fds {
		if err := f.SetVringFD(m.req, idx, int(m.fd.Fd())); err != nil {
			return err
		}
	}
	if f.Features&vhostuser.FeatureProtocolFeatures != 0 {
		return f.SetVringEnable(idx, true)
	}
	return nil
}

// newEventFD returns a non-blocking eventfd as a pollable File, so reads
// can be cancelled with a deadline.
func newEventFD(name string) (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// waitFile blocks reading an eventfd until it fires or ctx ends.
func waitFile(ctx context.Context, f *os.File) error {
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(aLongTimeAgo) })
	defer stop()
	var b [8]byte
	_, err := f.Read(b[:])
	if err != nil && ctx.Err() != nil {
		f.SetReadDeadline(noDeadline)
		return ctx.Err()
	}
	return err
}
