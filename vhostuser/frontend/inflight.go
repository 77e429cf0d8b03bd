package frontend

import (
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// Inflight is the back-end's inflight buffer as the front-end keeps it
// across back-end restarts (vhost-user spec "Inflight I/O tracking"): the
// fd from GET_INFLIGHT_FD, the description that came with it, and the
// front-end's own mapping, which QEMU keeps too.
type Inflight struct {
	FD  int
	Msg vhostuser.InflightMsg
	Mem []byte // mmap of [MmapOffset, MmapOffset+MmapSize)
}

// Close unmaps the buffer and closes the fd.
func (in *Inflight) Close() {
	if in == nil {
		return
	}
	if in.Mem != nil {
		unix.Munmap(in.Mem)
		in.Mem = nil
	}
	if in.FD >= 0 {
		unix.Close(in.FD)
		in.FD = -1
	}
}

// readReplyFD is ReadReply that also collects fds sent with the header.
func (f *Frontend) readReplyFD() (vhostuser.Header, []byte, []int, error) {
	var hb [vhostuser.HeaderSize]byte
	oob := make([]byte, unix.CmsgSpace(4*vhostuser.MaxFDs))
	var fds []int
	fail := func(err error) (vhostuser.Header, []byte, []int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return vhostuser.Header{}, nil, nil, err
	}
	for got := 0; got < len(hb); {
		n, oobn, _, _, err := f.conn.ReadMsgUnix(hb[got:], oob)
		if oobn > 0 {
			cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
			if perr == nil {
				for _, cm := range cmsgs {
					if got, err := unix.ParseUnixRights(&cm); err == nil {
						fds = append(fds, got...)
					}
				}
			}
		}
		if err != nil {
			return fail(err)
		}
		if n == 0 {
			return fail(io.ErrUnexpectedEOF)
		}
		got += n
	}
	h, _ := vhostuser.ParseHeader(hb[:])
	if h.Flags != vhostuser.FlagVersion|vhostuser.FlagReply || h.Size > vhostuser.MaxPayloadSize {
		return fail(fmt.Errorf("%s reply flags %#x size %d: %w", h.Request, h.Flags, h.Size, ErrProtocol))
	}
	p := make([]byte, h.Size)
	if _, err := io.ReadFull(f.conn, p); err != nil {
		return fail(err)
	}
	return h, p, fds, nil
}

// GetInflightFD asks the back-end for an inflight buffer for numQueues
// queues of queueSize entries and maps it, as QEMU does.
func (f *Frontend) GetInflightFD(numQueues, queueSize uint16) (*Inflight, error) {
	req := vhostuser.AppendInflight(nil, vhostuser.InflightMsg{NumQueues: numQueues, QueueSize: queueSize})
	if err := f.Send(vhostuser.ReqGetInflightFD, vhostuser.FlagVersion, req); err != nil {
		return nil, err
	}
	h, p, fds, err := f.readReplyFD()
	if err != nil {
		return nil, err
	}
	if h.Request != vhostuser.ReqGetInflightFD || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("GET_INFLIGHT_FD reply %s with %d fds: %w", h.Request, len(fds), ErrProtocol)
	}
	in := &Inflight{FD: fds[0]}
	if in.Msg, err = vhostuser.ParseInflight(p); err != nil {
		in.Close()
		return nil, err
	}
	if in.Msg.MmapSize == 0 || in.Msg.MmapSize > 1<<30 {
		in.Close()
		return nil, fmt.Errorf("GET_INFLIGHT_FD mmap_size %d: %w", in.Msg.MmapSize, ErrProtocol)
	}
	if in.Mem, err = unix.Mmap(in.FD, int64(in.Msg.MmapOffset), int(in.Msg.MmapSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		in.Close()
		return nil, fmt.Errorf("mmap inflight buffer: %w", err)
	}
	return in, nil
}

// SetInflightFD hands the buffer (back) to the back-end.
func (f *Frontend) SetInflightFD(in *Inflight) error {
	_, err := f.Call(vhostuser.ReqSetInflightFD, vhostuser.AppendInflight(nil, in.Msg), in.FD)
	return err
}

// QueueRegion returns queue i's region of the buffer (the split layout is
// in virtqueue/inflight.go).
func (in *Inflight) QueueRegion(i int, regionSize uint64) []byte {
	off := uint64(i) * regionSize
	return in.Mem[off : off+regionSize]
}

// SetupInflight is Setup with QEMU's inflight steps (vhost-user.md §1.13
// item 5): after SET_FEATURES it gets an inflight buffer for the queues and
// sets it, then sends the memory table and creates the queues. With start
// false the queues are laid out but not started, so a test can publish
// requests first.
func (f *Frontend) SetupInflight(o Options, start bool) (*Inflight, error) {
	o.defaults()
	if err := f.negotiate(o); err != nil {
		return nil, err
	}
	in, err := f.GetInflightFD(uint16(o.NumQueues), o.QueueSize)
	if err != nil {
		return nil, err
	}
	if err := f.SetInflightFD(in); err != nil {
		in.Close()
		return nil, err
	}
	if err := f.CreateMemory(o.MemSize); err != nil {
		in.Close()
		return nil, err
	}
	if err := f.SetMemTable(); err != nil {
		in.Close()
		return nil, err
	}
	for i := 0; i < o.NumQueues; i++ {
		q, err := f.NewQueue(i, o.QueueSize, o.MaxInflight, o.MaxIO)
		if err == nil && start {
			err = f.StartQueue(q)
		}
		if err != nil {
			in.Close()
			return nil, err
		}
	}
	return in, nil
}

// negotiate runs Setup's steps up to and including SET_FEATURES.
func (f *Frontend) negotiate(o Options) error {
	feats, err := f.GetFeatures()
	if err != nil {
		return err
	}
	feats &= o.Features
	if feats&vhostuser.FeatureProtocolFeatures == 0 {
		return errors.New("frontend: inflight tracking needs VHOST_USER_F_PROTOCOL_FEATURES")
	}
	pf, err := f.GetProtocolFeatures()
	if err != nil {
		return err
	}
	if pf&vhostuser.ProtoInflightShmfd == 0 {
		return fmt.Errorf("frontend: back-end does not offer INFLIGHT_SHMFD (%#x): %w", pf, ErrProtocol)
	}
	if err := f.SetProtocolFeatures(pf & o.ProtocolFeatures); err != nil {
		return err
	}
	if f.ProtocolFeatures&vhostuser.ProtoMQ != 0 {
		if f.QueueNum, err = f.GetQueueNum(); err != nil {
			return err
		}
	}
	if err := f.SetOwner(); err != nil {
		return err
	}
	return f.SetFeatures(feats)
}

// StartAt starts the already laid-out queues, each with SET_VRING_BASE =
// its used.idx, which is what QEMU sends after losing the back-end
// (vhost-user.md §1.7: GET_VRING_BASE failed, last_avail_idx rewound).
func (f *Frontend) StartAt() error {
	for _, q := range f.Queues {
		if q.packed {
			// Neither packed index is in guest memory: QEMU resends
			// the base of the last start (vhost-user.md §1.7), and the
			// back-end's inflight region says where it really was.
			if err := f.SetVringNum(uint32(q.Index), uint32(q.Size)); err != nil {
				return err
			}
			if err := f.startWithBase(q, q.startBase); err != nil {
				return err
			}
			continue
		}
		base := q.availIdx
		q.availIdx = q.UsedIdx()
		err := f.StartQueue(q)
		q.availIdx = base
		if err != nil {
			return err
		}
	}
	return nil
}

// Reattach continues on a new connection c to a restarted back-end, as
// QEMU does on reconnect (vhost-user.md §1.13 item 7): the same features,
// the kept inflight buffer, the same guest memory, and every queue
// restarted with SET_VRING_BASE = used.idx. Requests published before the
// back-end died stay where they are; the back-end resubmits the ones it
// had in flight.
func (f *Frontend) Reattach(c *net.UnixConn, in *Inflight, o Options) error {
	o.defaults()
	f.conn.Close()
	f.conn = c
	if err := f.negotiate(o); err != nil {
		return err
	}
	if err := f.SetInflightFD(in); err != nil {
		return err
	}
	if err := f.SetMemTable(); err != nil {
		return err
	}
	return f.StartAt()
}

// UsedIdx reads the used ring's idx.
func (q *Queue) UsedIdx() uint16 { return load16(q.f.Mem, q.usedOff+2) }
