// Package hostile is a suite of malformed front-end messages and hostile
// guest requests for checking a vhost-user-blk back-end from the outside,
// through its socket only (vhost-user.md §5.5; issue 5 item 3). Every case
// runs on a fresh connection; after each, Run checks that a fresh, normal
// connection still negotiates and completes a flush, so a back-end that
// died or wedged fails the next check.
//
// Expectations, as a front-end can observe them:
//   - Message cases: the back-end closes the connection without answering
//     (Run sends GET_FEATURES after the bad message; a reply to it means
//     the bad message was accepted).
//   - Request cases: the request completes, with used length 0 and the
//     status byte untouched for a malformed chain, or with an error status
//     for a well-formed chain with a bad request.
//   - Ring cases: the back-end stops the queue and signals the
//     SET_VRING_ERR eventfd.
//
// Nothing here uses timeouts: a case that never completes blocks until ctx
// ends, and is reported with ctx's error.
package hostile

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

var le = binary.LittleEndian

// ErrAccepted: the back-end accepted a message it should have refused.
var ErrAccepted = errors.New("hostile: back-end accepted a malformed message")

// ErrWrongOutcome: a request completed, but not the way the spec requires.
var ErrWrongOutcome = errors.New("hostile: wrong outcome")

// Case is one hostile interaction.
type Case struct {
	Name string
	run  func(ctx context.Context, path string) error
}

// setup is the small geometry every case negotiates.
var setup = frontend.Options{MemSize: 1 << 20, QueueSize: 16, MaxIO: 4096, MaxInflight: 2}

const version = vhostuser.FlagVersion

// negotiated returns a connection past SET_FEATURES, without REPLY_ACK so a
// refused message gets no answer at all.
func negotiated(path string) (*frontend.Frontend, error) {
	f, err := frontend.Dial(path)
	if err != nil {
		return nil, err
	}
	feats, err := f.GetFeatures()
	if err == nil {
		var pf uint64
		if pf, err = f.GetProtocolFeatures(); err == nil {
			err = f.SetProtocolFeatures(pf &^ vhostuser.ProtoReplyAck)
		}
	}
	if err == nil {
		err = f.SetOwner()
	}
	if err == nil {
		err = f.SetFeatures(feats)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// message builds a case that sends a bad message after negotiation (or
// right after connecting if raw) and expects the connection to be closed.
func message(name string, raw bool, send func(f *frontend.Frontend) error) Case {
	return Case{Name: name, run: func(ctx context.Context, path string) error {
		var f *frontend.Frontend
		var err error
		if raw {
			f, err = frontend.Dial(path)
		} else {
			f, err = negotiated(path)
		}
		if err != nil {
			return err
		}
		defer f.Close()
		stop := context.AfterFunc(ctx, func() { f.Close() })
		defer stop()
		// A failed send means the back-end already hung up: fine.
		if err := send(f); err == nil {
			_ = f.Send(vhostuser.ReqGetFeatures, version, nil)
		}
		if h, _, err := f.ReadReply(); err == nil {
			return fmt.Errorf("%w: it answered %s", ErrAccepted, h.Request)
		}
		return ctx.Err()
	}}
}

func vs(idx, num uint32) []byte {
	return vhostuser.AppendVringState(nil, vhostuser.VringState{Index: idx, Num: num})
}

func eventfd() (int, error) { return unix.Eventfd(0, unix.EFD_CLOEXEC) }

// withEventFD runs send with a fresh eventfd and closes it after.
func withEventFD(send func(f *frontend.Frontend, fd int) error) func(f *frontend.Frontend) error {
	return func(f *frontend.Frontend) error {
		fd, err := eventfd()
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return send(f, fd)
	}
}

func messageCases() []Case {
	region := vhostuser.MemRegion{GuestPhysAddr: frontend.GuestPhysBase, Size: 1 << 20, UserAddr: frontend.UserBase}
	withMemory := func(send func(f *frontend.Frontend) error) func(f *frontend.Frontend) error {
		return func(f *frontend.Frontend) error {
			if err := f.CreateMemory(1 << 20); err != nil {
				return err
			}
			return send(f)
		}
	}
	return []Case{
		message("unknown request", true, func(f *frontend.Frontend) error { return f.Send(99, version, nil) }),
		message("payload size above 4 KiB", true, func(f *frontend.Frontend) error {
			return f.SendRaw(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqSetFeatures, Flags: version, Size: 5000}))
		}),
		message("payload size not the message's", true, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetFeatures, version, []byte{1, 2, 3, 4})
		}),
		message("REPLY flag on a request", true, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetFeatures, version|vhostuser.FlagReply, nil)
		}),
		message("fd on a request that takes none", true, withEventFD(func(f *frontend.Frontend, fd int) error {
			return f.Send(vhostuser.ReqGetFeatures, version, nil, fd)
		})),
		message("socket closed mid-message", true, func(f *frontend.Frontend) error {
			b := vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqSetFeatures, Flags: version, Size: 8})
			if err := f.SendRaw(append(b, 1, 2, 3)); err != nil {
				return err
			}
			return f.Conn().CloseWrite()
		}),
		message("SET_MEM_TABLE with 0 regions", false, withEventFD(func(f *frontend.Frontend, fd int) error {
			p := vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{region})
			le.PutUint32(p, 0)
			return f.Send(vhostuser.ReqSetMemTable, version, p, fd)
		})),
		message("SET_MEM_TABLE with fewer fds than regions", false, withMemory(func(f *frontend.Frontend) error {
			r2 := region
			r2.GuestPhysAddr += 1 << 30
			r2.UserAddr += 1 << 30
			return f.Send(vhostuser.ReqSetMemTable, version, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{region, r2}), f.MemFD())
		})),
		message("SET_MEM_TABLE region past the end of its fd", false, withMemory(func(f *frontend.Frontend) error {
			r := region
			r.Size = 2 << 20
			return f.Send(vhostuser.ReqSetMemTable, version, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r}), f.MemFD())
		})),
		message("SET_VRING_NUM 0", false, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, version, vs(0, 0))
		}),
		message("SET_VRING_NUM not a power of two", false, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, version, vs(0, 100))
		}),
		message("SET_VRING_NUM above 32768", false, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringNum, version, vs(0, 65536))
		}),
		message("ring index 2^32-1", false, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetVringBase, version, vs(0xffffffff, 0))
		}),
		message("ring addresses outside every region", false, withMemory(func(f *frontend.Frontend) error {
			if err := f.SetMemTable(); err != nil {
				return err
			}
			if err := f.Send(vhostuser.ReqSetVringNum, version, vs(0, 16)); err != nil {
				return err
			}
			a := vhostuser.VringAddr{Desc: frontend.UserBase + 1<<40, Avail: frontend.UserBase, Used: frontend.UserBase + 4096}
			return f.Send(vhostuser.ReqSetVringAddr, version, vhostuser.AppendVringAddr(nil, a))
		})),
		// A timerfd turns readable with no front-end write: as a kick fd
		// it would wake the worker forever.
		message("SET_VRING_KICK with an armed timerfd", false, func(f *frontend.Frontend) error {
			fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			ts := unix.ItimerSpec{Interval: unix.Timespec{Nsec: 1e6}, Value: unix.Timespec{Nsec: 1e6}}
			if err := unix.TimerfdSettime(fd, 0, &ts, nil); err != nil {
				return err
			}
			return f.Send(vhostuser.ReqSetVringKick, version, le.AppendUint64(nil, 0), fd)
		}),
		// A regular file as a call fd would grow with every completion.
		message("SET_VRING_CALL with a regular file", false, func(f *frontend.Frontend) error {
			fd, err := unix.MemfdCreate("hostile-call", unix.MFD_CLOEXEC)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return f.Send(vhostuser.ReqSetVringCall, version, le.AppendUint64(nil, 0), fd)
		}),
		message("SET_BACKEND_REQ_FD with an eventfd", false, withEventFD(func(f *frontend.Frontend, fd int) error {
			return f.Send(vhostuser.ReqSetBackendReqFD, version, nil, fd)
		})),
		message("SET_BACKEND_REQ_FD without an fd", false, func(f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetBackendReqFD, version, nil)
		}),
		message("SET_INFLIGHT_FD with an unsealed fd", false, func(f *frontend.Frontend) error {
			fd, err := unix.MemfdCreate("hostile", unix.MFD_CLOEXEC)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.Ftruncate(fd, 4096); err != nil {
				return err
			}
			m := vhostuser.InflightMsg{MmapSize: 1088, NumQueues: 1, QueueSize: 64}
			return f.Send(vhostuser.ReqSetInflightFD, version, vhostuser.AppendInflight(nil, m), fd)
		}),
	}
}

// req lays out a virtio-blk request's header, data and status (preset to
// 0xff) in fresh guest memory.
type req struct {
	hdr, data, status uint64 // guest-physical
	statusOff         int
}

func newReq(f *frontend.Frontend, typ uint32, sector uint64, n int) (*req, error) {
	h, err := f.Alloc(16, 16)
	if err != nil {
		return nil, err
	}
	d, err := f.Alloc(max(n, 1), 16)
	if err != nil {
		return nil, err
	}
	s, err := f.Alloc(1, 1)
	if err != nil {
		return nil, err
	}
	le.PutUint32(f.Mem[h:], typ)
	le.PutUint64(f.Mem[h+8:], sector)
	f.Mem[s] = 0xff
	return &req{hdr: frontend.GPA(h), data: frontend.GPA(d), status: frontend.GPA(s), statusOff: s}, nil
}

const (
	next     = frontend.DescFlagNext
	write    = frontend.DescFlagWrite
	indirect = frontend.DescFlagIndirect
)

// chain writes descs at descriptors 0.. and publishes head 0.
func chain(q *frontend.Queue, descs ...frontend.RawDesc) {
	for i, d := range descs {
		q.SetDesc(uint16(i), d)
	}
	q.PutAvail(0)
}

// setUp dials path and negotiates setup with its one queue; the caller
// closes the connection.
func setUp(path string) (*frontend.Frontend, error) {
	f, err := frontend.Dial(path)
	if err != nil {
		return nil, err
	}
	if err := f.Setup(setup); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// request builds a case that publishes one hand-made chain. malformed
// chains must complete with used length 0 and the status byte untouched;
// bad requests with used length 1 and a status other than OK.
func request(name string, malformed bool, build func(f *frontend.Frontend, q *frontend.Queue) (*req, error)) Case {
	return Case{Name: name, run: func(ctx context.Context, path string) error {
		f, err := setUp(path)
		if err != nil {
			return err
		}
		defer f.Close()
		q := f.Queues[0]
		r, err := build(f, q)
		if err != nil {
			return err
		}
		u, err := q.WaitUsed(ctx)
		if err != nil {
			return fmt.Errorf("waiting for the request to complete: %w", err)
		}
		st := f.Mem[r.statusOff]
		switch {
		case u.ID != 0:
			return fmt.Errorf("%w: used id %d, want 0", ErrWrongOutcome, u.ID)
		case malformed && (u.Len != 0 || st != 0xff):
			return fmt.Errorf("%w: malformed chain completed with length %d, status byte %#x; want 0 and untouched", ErrWrongOutcome, u.Len, st)
		case !malformed && (u.Len != 1 || st == 0 || st == 0xff):
			return fmt.Errorf("%w: bad request completed with length %d, status %#x; want 1 and an error status", ErrWrongOutcome, u.Len, st)
		}
		return nil
	}}
}

// layout lays a chain out over a request's buffers; it may write indirect
// tables into guest memory (Frontend.DescTable).
type layout func(f *frontend.Frontend, r *req) ([]frontend.RawDesc, error)

// laid returns a request case's build: fresh buffers for a request of type
// typ at sector with n data bytes, and the chain lay makes of them
// published at head 0.
func laid(typ uint32, sector uint64, n int, lay layout) func(f *frontend.Frontend, q *frontend.Queue) (*req, error) {
	return func(f *frontend.Frontend, q *frontend.Queue) (*req, error) {
		r, err := newReq(f, typ, sector, n)
		if err != nil {
			return nil, err
		}
		descs, err := lay(f, r)
		if err != nil {
			return nil, err
		}
		chain(q, descs...)
		return r, nil
	}
}

// throughData is the usual three-descriptor chain: header, the given data
// descriptor, then a device-writable status byte.
func throughData(r *req, data frontend.RawDesc) []frontend.RawDesc {
	data.Flags, data.Next = next, 2
	return []frontend.RawDesc{{Addr: r.hdr, Len: 16, Flags: next, Next: 1}, data, {Addr: r.status, Len: 1, Flags: write}}
}

// headerStatus is a chain with no data descriptor: a header of hdrLen bytes
// and a device-writable status byte.
func headerStatus(r *req, hdrLen uint32) []frontend.RawDesc {
	return []frontend.RawDesc{{Addr: r.hdr, Len: hdrLen, Flags: next, Next: 1}, {Addr: r.status, Len: 1, Flags: write}}
}

func requestCases() []Case {
	out := func(sector uint64, n int) func(f *frontend.Frontend, q *frontend.Queue) (*req, error) {
		return laid(frontend.BlkTOut, sector, n, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return throughData(r, frontend.RawDesc{Addr: r.data, Len: uint32(n)}), nil
		})
	}
	return []Case{
		request("descriptor address outside guest memory", true, laid(frontend.BlkTOut, 0, 512, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return throughData(r, frontend.RawDesc{Addr: 1 << 50, Len: 512}), nil
		})),
		request("buffer running past the end of its region", true, laid(frontend.BlkTOut, 0, 512, func(f *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return throughData(r, frontend.RawDesc{Addr: frontend.GPA(len(f.Mem) - 256), Len: 512}), nil
		})),
		request("looping chain", true, laid(frontend.BlkTOut, 0, 512, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return []frontend.RawDesc{{Addr: r.hdr, Len: 16, Flags: next, Next: 1}, {Addr: r.data, Len: 512, Flags: next, Next: 0}}, nil
		})),
		request("chain longer than the ring", true, laid(frontend.BlkTOut, 0, 512, func(f *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			descs := []frontend.RawDesc{{Addr: r.hdr, Len: 16, Flags: next, Next: 1}}
			for i := 1; i < 20; i++ {
				descs = append(descs, frontend.RawDesc{Addr: r.data, Len: 16, Flags: next, Next: uint16(i + 1)})
			}
			descs = append(descs, frontend.RawDesc{Addr: r.status, Len: 1, Flags: write})
			tb, err := f.DescTable(0, descs...)
			return []frontend.RawDesc{{Addr: tb, Len: uint32(16 * len(descs)), Flags: indirect}}, err
		})),
		request("nested indirect table", true, laid(frontend.BlkTIn, 0, 512, func(f *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			inner, err := f.DescTable(0, headerStatus(r, 16)...)
			if err != nil {
				return nil, err
			}
			outer, err := f.DescTable(0, frontend.RawDesc{Addr: inner, Len: 32, Flags: indirect})
			return []frontend.RawDesc{{Addr: outer, Len: 16, Flags: indirect}}, err
		})),
		request("indirect table length not a multiple of 16", true, laid(frontend.BlkTIn, 0, 512, func(f *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			tb, err := f.DescTable(0, headerStatus(r, 16)...)
			return []frontend.RawDesc{{Addr: tb, Len: 24, Flags: indirect}}, err
		})),
		request("status byte in a device-readable buffer", true, laid(frontend.BlkTOut, 0, 512, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			descs := throughData(r, frontend.RawDesc{Addr: r.data, Len: 512})
			descs[2].Flags = 0
			return descs, nil
		})),
		request("request header shorter than 16 bytes", false, laid(frontend.BlkTOut, 0, 0, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return headerStatus(r, 8), nil
		})),
		request("IN into device-readable buffers", false, laid(frontend.BlkTIn, 0, 512, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return throughData(r, frontend.RawDesc{Addr: r.data, Len: 512}), nil
		})),
		request("write past the capacity", false, func(f *frontend.Frontend, q *frontend.Queue) (*req, error) {
			capacity := le.Uint64(f.Config) // virtio_blk_config.capacity, 512-byte sectors
			return out(capacity-1, 1024)(f, q)
		}),
		request("write at a sector near 2^64", false, out(1<<64-1, 512)),
		request("write whose byte offset wraps 2^64", false, out(1<<55, 512)),
		request("unknown request type", false, laid(0x7777, 0, 0, func(_ *frontend.Frontend, r *req) ([]frontend.RawDesc, error) {
			return headerStatus(r, 16), nil
		})),
	}
}

// ring builds a case that breaks the ring itself and expects the back-end
// to signal the queue's SET_VRING_ERR eventfd.
func ring(name string, breakRing func(q *frontend.Queue)) Case {
	return Case{Name: name, run: func(ctx context.Context, path string) error {
		f, err := setUp(path)
		if err != nil {
			return err
		}
		defer f.Close()
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return err
		}
		errFile := os.NewFile(uintptr(efd), "vring-err")
		defer errFile.Close()
		if err := f.SetVringFD(vhostuser.ReqSetVringErr, 0, efd); err != nil {
			return err
		}
		breakRing(f.Queues[0])
		stop := context.AfterFunc(ctx, func() { errFile.Close() })
		defer stop()
		var b [8]byte
		if _, err := errFile.Read(b[:]); err != nil {
			return fmt.Errorf("waiting for the err eventfd: %v (ctx: %v)", err, ctx.Err())
		}
		return nil
	}}
}

// Cases returns the whole suite, messages first.
func Cases() []Case {
	cs := append(messageCases(), requestCases()...)
	return append(cs,
		ring("head index beyond the ring", func(q *frontend.Queue) { q.PutAvail(300) }),
		ring("avail index jumping past the ring size", func(q *frontend.Queue) { q.SetAvailIdx(q.AvailIdx() + 100) }),
	)
}

// Healthy checks that a fresh connection negotiates and completes a flush.
func Healthy(ctx context.Context, path string) error {
	f, err := frontend.Dial(path)
	if err != nil {
		return err
	}
	defer f.Close()
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	if err := f.Setup(setup); err != nil {
		return fmt.Errorf("negotiation: %w", err)
	}
	r, err := f.Queues[0].Flush(ctx)
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if r.Status != frontend.BlkSOK {
		return fmt.Errorf("flush: status %d", r.Status)
	}
	return nil
}

// Run runs every case against the back-end at path, each on a fresh
// connection followed by a Healthy check, and reports each case's verdict
// (nil: passed). It returns the number of cases that failed. A failed
// health check is reported against the case before it and stops the run:
// the back-end is gone.
func Run(ctx context.Context, path string, report func(name string, err error)) (failed int) {
	for _, c := range Cases() {
		err := c.run(ctx, path)
		if herr := Healthy(ctx, path); herr != nil {
			report(c.Name, fmt.Errorf("back-end no longer serves after this case: %w (case: %v)", herr, err))
			return failed + 1
		}
		if err != nil {
			failed++
		}
		report(c.Name, err)
	}
	return failed
}
