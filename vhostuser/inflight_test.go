package vhostuser_test

import (
	"bytes"
	"context"
	"math"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

var inflightSetup = frontend.Options{MemSize: 1 << 20, QueueSize: 16, MaxIO: 4096, MaxInflight: 8}

func TestGetInflightFDReturnsSealedZeroedBufferOfSplitLayout(t *testing.T) {
	s := startServer(t, 2)
	f := s.dial(t)
	if err := negotiate(f, stateNegotiated); err != nil {
		t.Fatal(err)
	}
	in, err := f.GetInflightFD(2, 128)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	// Two regions of ALIGN_UP(16 + 16*128, 64) = 2112 bytes (vhost-user.md §1.10).
	want := vhostuser.InflightMsg{MmapSize: 2 * 2112, MmapOffset: 0, NumQueues: 2, QueueSize: 128}
	if in.Msg != want {
		t.Errorf("reply %+v, want %+v", in.Msg, want)
	}
	if !bytes.Equal(in.Mem, make([]byte, len(in.Mem))) {
		t.Error("a new inflight buffer is not all zeroes")
	}
	seals, err := unix.FcntlInt(uintptr(in.FD), unix.F_GET_SEALS, 0)
	if err != nil || seals&(unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL) != unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL {
		t.Errorf("seals %#x (%v), want SHRINK|GROW|SEAL", seals, err)
	}
	if err := unix.Ftruncate(in.FD, 100); err == nil {
		t.Error("the inflight memfd could be shrunk")
	}

	// Repeated requests leave nothing behind in the back-end (CVE-2020-10726).
	// The back-end may let go of the region it replaced after its reply is
	// on the socket; a round trip after the last request (the session
	// handles one message at a time) makes the count see that done.
	roundTrip := func(what string) {
		t.Helper()
		if _, err := f.GetFeatures(); err != nil {
			t.Fatalf("connection unusable %s: %v", what, err)
		}
	}
	roundTrip("after the first GET_INFLIGHT_FD")
	fds0 := openFDs(t)
	for range 50 {
		in, err := f.GetInflightFD(1, 256)
		if err != nil {
			t.Fatal(err)
		}
		in.Close()
	}
	roundTrip("after 50 GET_INFLIGHT_FD")
	if added := newFDs(fds0, openFDs(t)); len(added) > 0 {
		t.Errorf("fds opened over 50 GET_INFLIGHT_FD and still open: %v", added)
	}
}

func TestBadInflightRequestEndsConnectionAndServerServesNext(t *testing.T) {
	s := startServer(t, 1)
	v := uint32(vhostuser.FlagVersion)
	sealed := func(t *testing.T, size int64) int {
		fd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	good := vhostuser.InflightMsg{MmapSize: 1088, NumQueues: 1, QueueSize: 64} // ALIGN_UP(16+16*64, 64)
	set := func(m vhostuser.InflightMsg, fds ...int) func(t *testing.T, f *frontend.Frontend) error {
		return func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqSetInflightFD, v, vhostuser.AppendInflight(nil, m), fds...)
		}
	}
	with := func(edit func(m *vhostuser.InflightMsg)) vhostuser.InflightMsg {
		m := good
		edit(&m)
		return m
	}
	cases := []malformedCase{
		{"GET_INFLIGHT_FD before INFLIGHT_SHMFD is negotiated", stateRaw, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, good))
		}, vhostuser.ErrState},
		{"GET_INFLIGHT_FD for more queues than offered", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, with(func(m *vhostuser.InflightMsg) { m.NumQueues = 2 })))
		}, vhostuser.ErrInvalidMessage},
		{"GET_INFLIGHT_FD with queue_size 0", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, with(func(m *vhostuser.InflightMsg) { m.QueueSize = 0 })))
		}, vhostuser.ErrInvalidMessage},
		{"GET_INFLIGHT_FD payload of 20 bytes", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return f.Send(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, good)[:20])
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD without an fd", stateNegotiated, set(good), vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD with two fds", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(good, sealed(t, 4096), sealed(t, 4096))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD with an unsealed memfd", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			fd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.Ftruncate(fd, 4096); err != nil {
				return err
			}
			return set(good, fd)(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD with an eventfd", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(good, eventfd(t))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD mmap_size smaller than the regions", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(with(func(m *vhostuser.InflightMsg) { m.MmapSize = 1000 }), sealed(t, 4096))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD range past the end of the fd", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(with(func(m *vhostuser.InflightMsg) { m.MmapOffset = 4096 }), sealed(t, 4096))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD offset+size wrapping 2^64", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(with(func(m *vhostuser.InflightMsg) { m.MmapOffset = math.MaxUint64 - 100 }), sealed(t, 4096))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD num_queues 0", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(with(func(m *vhostuser.InflightMsg) { m.NumQueues = 0 }), sealed(t, 4096))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD queue_size 65535", stateNegotiated, func(t *testing.T, f *frontend.Frontend) error {
			return set(with(func(m *vhostuser.InflightMsg) { m.QueueSize = 65535 }), sealed(t, 1<<30))(t, f)
		}, vhostuser.ErrInvalidMessage},
		{"ring larger than the inflight queue_size", stateMemory, func(t *testing.T, f *frontend.Frontend) error {
			in := with(func(m *vhostuser.InflightMsg) { m.QueueSize = 8; m.MmapSize = 192 })
			if err := set(in, sealed(t, 4096))(t, f); err != nil {
				return err
			}
			q, err := f.NewQueue(0, 16, 1, 512)
			if err != nil {
				return err
			}
			return f.StartQueue(q)
		}, vhostuser.ErrInvalidMessage},
		{"SET_INFLIGHT_FD while a ring runs", stateMemory, func(t *testing.T, f *frontend.Frontend) error {
			q, err := f.NewQueue(0, 16, 1, 512)
			if err != nil {
				return err
			}
			if err := f.StartQueue(q); err != nil {
				return err
			}
			return set(good, sealed(t, 4096))(t, f)
		}, vhostuser.ErrState},
		{"inflight region with an unknown version", stateMemory, func(t *testing.T, f *frontend.Frontend) error {
			fd := sealed(t, 4096)
			if _, err := unix.Pwrite(fd, []byte{9, 0}, 8); err != nil {
				return err
			}
			if err := set(good, fd)(t, f); err != nil {
				return err
			}
			q, err := f.NewQueue(0, 16, 1, 512)
			if err != nil {
				return err
			}
			return f.StartQueue(q)
		}, virtqueue.ErrInvalidInflight},
	}
	s.runMalformedCases(t, cases, true)
}

// previousBackend writes queue 0's inflight region as a back-end would have
// left it when it died: heads popped in the order given (counters from
// 100), none completed, used.idx still 0.
func previousBackend(region []byte, popOrder []uint16) {
	le.PutUint16(region[8:], 1)                        // version
	le.PutUint16(region[10:], inflightSetup.QueueSize) // desc_num
	le.PutUint16(region[14:], 0)                       // used_idx
	for i, h := range popOrder {
		d := region[16+16*int(h):]
		d[0] = 1
		le.PutUint64(d[8:], uint64(100+i))
	}
}

func TestRequestsLeftInFlightByDeadBackendAreRedoneInPopOrder(t *testing.T) {
	s := startServer(t, 1)
	f := s.dial(t)
	in, err := f.SetupInflight(inflightSetup, false)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	q := f.Queues[0]
	// Three writes of the same sector, then a read of it, published while
	// no back-end runs the ring.
	var heads []uint16
	for _, seed := range []byte{'X', 'Y', 'Z'} {
		h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 8, Data: pattern(seed, 512)})
		if err != nil {
			t.Fatal(err)
		}
		heads = append(heads, h)
	}
	// The dead back-end had popped Z, X and Y, in that order, and completed
	// none; it never saw the read.
	previousBackend(in.QueueRegion(0, virtqueue.InflightRegionSize(inflightSetup.QueueSize)), []uint16{heads[2], heads[0], heads[1]})
	read, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTIn, Sector: 8, InLen: 512})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.StartAt(); err != nil { // SET_VRING_BASE = used.idx = 0
		t.Fatal(err)
	}
	if rec := <-s.ev.recovered; rec != [2]int{0, 3} {
		t.Errorf("QueueRecovered(queue %d, %d requests), want queue 0 with 3", rec[0], rec[1])
	}
	var order []uint16
	var readData []byte
	for range 4 {
		r, err := q.Reap(context.Background(), 512)
		mustOK(t, "reap", r, err)
		order = append(order, r.Head)
		if r.Head == read {
			readData = r.Data
		}
	}
	if want := []uint16{heads[2], heads[0], heads[1], read}; !slices.Equal(order, want) {
		t.Errorf("completion order %v, want %v (resubmitted by pop order, then the new read)", order, want)
	}
	if !bytes.Equal(s.disk.bytes(8*512, 512), pattern('Y', 512)) {
		t.Error("disk does not hold the write popped last (Y)")
	}
	if !bytes.Equal(readData, pattern('Y', 512)) {
		t.Error("the read published after the resubmitted writes did not see the last of them")
	}
	region := in.QueueRegion(0, virtqueue.InflightRegionSize(inflightSetup.QueueSize))
	for h := 0; h < int(inflightSetup.QueueSize); h++ {
		if region[16+16*h] != 0 {
			t.Errorf("descriptor %d still marked in flight after completion", h)
		}
	}
}

// A back-end that put a completion in the used ring and died before it
// notified the driver leaves a guest waiting for an interrupt that never
// comes: the restarted back-end finds the completion published, so it
// rightly does not redo it, and nothing else would wake the driver. The
// restart notifies once, whichever order the front-end sends CALL and KICK
// in (QEMU 7.2 sends CALL first; a packed-ring guest hung this way in CI).
func TestACompletionTheDeadBackEndNeverSignalledReachesTheDriverAfterTheRestart(t *testing.T) {
	for _, tc := range []struct {
		name      string
		callFirst bool
	}{
		{"CALL after KICK", false},
		{"CALL before KICK (QEMU 7.2)", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, 1)
			f := s.dial(t)
			f.CallBeforeKick = tc.callFirst
			in, err := f.SetupInflight(inflightSetup, false)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			q := f.Queues[0]
			head, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 8, Data: pattern('X', 512)})
			if err != nil {
				t.Fatal(err)
			}
			// The dead back-end popped the write, completed it as a
			// batch of one (used element and used.idx written) and died
			// before clearing its inflight entry or notifying.
			region := in.QueueRegion(0, virtqueue.InflightRegionSize(inflightSetup.QueueSize))
			previousBackend(region, []uint16{head})
			le.PutUint16(region[16+16*int(head)+6:], 0) // desc[head].next: end of the batch
			le.PutUint16(region[12:], head)             // last_batch_head
			q.PutUsed(head, 1)
			if err := f.StartAt(); err != nil {
				t.Fatal(err)
			}
			if err := q.WaitCall(context.Background()); err != nil {
				t.Fatal(err)
			}
			u, ok := q.PopUsed()
			if !ok || u.ID != uint32(head) {
				t.Fatalf("after the notification the used ring gives %+v (%t), want the write's completion (head %d)", u, ok, head)
			}
			// The ring goes on, and the finished write was not redone.
			r, err := q.Read(context.Background(), 0, 512)
			mustOK(t, "read after the restart", r, err)
			select {
			case rec := <-s.ev.recovered:
				t.Errorf("QueueRecovered(queue %d, %d requests): a completion already in the used ring was redone", rec[0], rec[1])
			default:
			}
		})
	}
}
