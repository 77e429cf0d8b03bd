package vhostuser_test

import (
	"context"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

func TestRingsStartEnabledWithoutProtocolFeatures(t *testing.T) {
	s := startServer(t, 1)
	// Without VHOST_USER_F_PROTOCOL_FEATURES no SET_VRING_ENABLE is sent:
	// SET_FEATURES alone must enable the ring (spec "Ring states").
	f := s.connect(t, frontend.Options{Features: ^uint64(vhostuser.FeatureProtocolFeatures)})
	if f.ProtocolFeatures != 0 {
		t.Fatalf("protocol features %#x negotiated without bit 30", f.ProtocolFeatures)
	}
	r, err := f.Queues[0].Flush(context.Background())
	mustOK(t, "flush", r, err)
}

func TestDisabledRingIsNotProcessedUntilEnabled(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	q := f.Queues[0]
	if err := f.SetVringEnable(0, false); err != nil {
		t.Fatal(err)
	}
	head, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTFlush})
	if err != nil {
		t.Fatal(err)
	}
	// GET_VRING_BASE stops the ring; a disabled ring must not have
	// consumed the request.
	base, err := f.GetVringBase(0)
	if err != nil {
		t.Fatal(err)
	}
	if base != 0 {
		t.Fatalf("disabled ring consumed requests: next avail %d, want 0", base)
	}
	// Restart where the device stopped (not at the driver's avail idx, as
	// StartQueue would) and enable: the pending request completes.
	if err := f.SetVringBase(0, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringFD(vhostuser.ReqSetVringKick, 0, q.KickFD()); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringEnable(0, true); err != nil {
		t.Fatal(err)
	}
	res, err := q.Reap(context.Background(), 0)
	mustOK(t, "flush after enable", res, err)
	if res.Head != head {
		t.Fatalf("completed head %d, want %d", res.Head, head)
	}
}

func TestBrokenRingIsReportedOnceAndRecoversAfterReset(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, smallSetup)
	q := f.Queues[0]
	// A head index beyond the queue size is a ring-level error
	// (libvhost-user "Guest says index %u is available").
	q.PutAvail(200)
	b := <-s.ev.broken
	if b.queue != 0 || b.err == nil {
		t.Fatalf("QueueBroken(%d, %v), want queue 0 with an error", b.queue, b.err)
	}
	// More kicks do not produce more reports and do not wedge the
	// control path.
	q.Kick()
	q.Kick()
	if _, err := f.GetVringBase(0); err != nil {
		t.Fatalf("GET_VRING_BASE on a broken ring: %v", err)
	}
	select {
	case b := <-s.ev.broken:
		t.Fatalf("second QueueBroken report: %v", b.err)
	default:
	}
	// RESET_DEVICE, then a fresh start on fresh rings works.
	if err := f.ResetDevice(); err != nil {
		t.Fatal(err)
	}
	if err := f.SetFeatures(f.Features); err != nil {
		t.Fatal(err)
	}
	q2, err := f.NewQueue(0, 16, 2, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.StartQueue(q2); err != nil {
		t.Fatal(err)
	}
	r, err := q2.Flush(context.Background())
	mustOK(t, "flush after reset", r, err)
}

func TestMemTableSwapWhileQueuesRun(t *testing.T) {
	s := startServer(t, 2)
	o := smallSetup
	o.NumQueues = 2
	f := s.connect(t, o)
	writeReadBackDuringMemTableSwaps(t, f)
}

// writeReadBackDuringMemTableSwaps has every queue of f write and read
// back 100 sectors while SET_MEM_TABLE is sent 20 times with the same
// memory: every swap quiesces the workers, re-maps and re-translates the
// started rings.
func writeReadBackDuringMemTableSwaps(t *testing.T, f *frontend.Frontend) {
	t.Helper()
	writeReadBackOnEveryQueue(t, f, 100, 512, func(qi, i int) uint64 { return uint64(qi*1000 + i) }, func(qi, i int) byte { return byte(i + qi) }, func() {
		for i := 0; i < 20; i++ {
			if err := f.SetMemTable(); err != nil {
				t.Fatalf("SET_MEM_TABLE %d while running: %v", i, err)
			}
		}
	})
}

func TestStatusIsStoredAndReturned(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, smallSetup)
	for _, v := range []uint8{0x0f, 0} {
		if err := f.SetStatus(v); err != nil {
			t.Fatal(err)
		}
		got, err := f.GetStatus()
		if err != nil {
			t.Fatal(err)
		}
		if got != uint64(v) {
			t.Errorf("GET_STATUS = %#x after SET_STATUS %#x", got, v)
		}
	}
}
