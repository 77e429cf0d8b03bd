package vhostuser_test

import (
	"context"
	"errors"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// connectNegotiating connects smallSetup to a fresh one-queue server,
// offering the feature bit (named name) only if on, and fails unless the
// negotiated features agree.
func connectNegotiating(t *testing.T, name string, feature uint64, on bool) (*testServer, *frontend.Frontend) {
	t.Helper()
	s := startServer(t, 1)
	o := smallSetup
	if !on {
		o.Features = ^feature
	}
	f := s.connect(t, o)
	if got := f.Features&feature != 0; got != on {
		t.Fatalf("%s negotiated %v, want %v", name, got, on)
	}
	return s, f
}

// An indirect descriptor is followed only when VIRTIO_RING_F_INDIRECT_DESC
// was negotiated. Without it the chain is malformed: completed with used
// length 0, no status written, the disk untouched, reported through
// RequestFailed as a virtqueue.ErrInvalidChain, and the queue goes on.
func TestIndirectDescriptorHonouredOnlyWhenNegotiated(t *testing.T) {
	for _, tc := range []struct {
		name       string
		negotiated bool
	}{
		{"negotiated", true},
		{"not negotiated", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, f := connectNegotiating(t, "INDIRECT_DESC", vhostuser.FeatureIndirectDesc, tc.negotiated)
			q := f.Queues[0]
			r := newGuestReq(t, f, frontend.BlkTOut, 0, 512)
			copy(f.Mem[r.data:], pattern(9, 512))
			q.SetDesc(0, frontend.RawDesc{Addr: table(t, f, 0, r.ownData(0)...), Len: 48, Flags: fIndirect})
			q.PutAvail(0)
			ctx := context.Background()
			u, err := q.WaitUsed(ctx)
			if err != nil {
				t.Fatal(err)
			}
			written := s.disk.bytes(0, 512)
			if tc.negotiated {
				if u.Len != 1 || f.Mem[r.status] != 0 || string(written) != string(pattern(9, 512)) {
					t.Fatalf("used len %d status %d, disk written %v; want 1, 0, true", u.Len, f.Mem[r.status], string(written) == string(pattern(9, 512)))
				}
				return
			}
			if u.ID != 0 || u.Len != 0 || f.Mem[r.status] != 0xff {
				t.Fatalf("used {%d %d} status %#x; want {0 0} and the status untouched", u.ID, u.Len, f.Mem[r.status])
			}
			if string(written) != string(make([]byte, 512)) {
				t.Fatal("the disk was written through an indirect table that was not negotiated")
			}
			if err := <-s.ev.failed; !errors.Is(err, virtqueue.ErrInvalidChain) {
				t.Fatalf("RequestFailed(%v), want ErrInvalidChain", err)
			}
			res, err := q.Flush(ctx)
			mustOK(t, "flush after the refused chain", res, err)
		})
	}
}

// Used-buffer notification suppression follows what was negotiated
// (VIRTIO 1.2 §2.7.10): without EVENT_IDX the driver's avail.flags
// NO_INTERRUPT bit decides and used_event is ignored; with EVENT_IDX
// used_event decides and the flags bit is ignored. The ring is stopped
// (GET_VRING_BASE) after the completion so the worker is done signalling
// before the call eventfd is read.
func TestUsedNotificationSuppressionFollowsNegotiatedEventIdx(t *testing.T) {
	const availNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	for _, tc := range []struct {
		name        string
		eventIdx    bool
		noInterrupt bool   // avail.flags bit 0
		usedEvent   uint16 // avail ring used_event; 0: the next completion
		wantSignal  bool
	}{
		{"flags: interrupts wanted", false, false, 0, true},
		{"flags: NO_INTERRUPT", false, true, 0, false},
		{"flags: used_event is ignored", false, false, 0x8000, true},
		{"event idx: used_event reached", true, false, 0, true},
		{"event idx: used_event far ahead", true, false, 0x8000, false},
		{"event idx: NO_INTERRUPT is ignored", true, true, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, f := connectNegotiating(t, "EVENT_IDX", vhostuser.FeatureEventIdx, tc.eventIdx)
			q := f.Queues[0]
			// A first request, so the ring has signalled once: the first
			// check after a start always signals (libvhost-user
			// signalled_used_valid).
			r, err := q.Write(context.Background(), 1, pattern(2, 512))
			mustOK(t, "first write", r, err)
			a := q.Addr()
			avail := int(a.Avail - frontend.UserBase)
			var flags uint16
			if tc.noInterrupt {
				flags = availNoInterrupt
			}
			le.PutUint16(f.Mem[avail:], flags)
			// used_event: what PopUsed left (1, the next completion) or far ahead.
			if tc.usedEvent != 0 {
				le.PutUint16(f.Mem[avail+4+2*int(q.Size):], tc.usedEvent)
			}
			drainEventFD(t, q.CallFD())

			if _, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 0, Data: pattern(3, 512)}); err != nil {
				t.Fatal(err)
			}
			// Wait for the completion by looking at the used ring, not
			// the call fd under test.
			for q.UsedIdx() != 2 {
				runtime.Gosched()
			}
			if _, err := f.GetVringBase(0); err != nil {
				t.Fatal(err)
			}
			if got := drainEventFD(t, q.CallFD()) > 0; got != tc.wantSignal {
				t.Fatalf("call eventfd signalled %v, want %v", got, tc.wantSignal)
			}
		})
	}
}

// drainEventFD reads a non-blocking eventfd's counter (0 if unsignalled).
func drainEventFD(t *testing.T, fd int) uint64 {
	t.Helper()
	var b [8]byte
	n, err := unix.Read(fd, b[:])
	if errors.Is(err, unix.EAGAIN) {
		return 0
	}
	if err != nil || n != 8 {
		t.Fatalf("reading the call eventfd: %d, %v", n, err)
	}
	return le.Uint64(b[:])
}
