package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

var le = binary.LittleEndian

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func mustOK(t *testing.T, what string, r frontend.BlkResult, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if r.Status != frontend.BlkSOK {
		t.Fatalf("%s: status %d, want OK", what, r.Status)
	}
}

func TestNegotiatedDeviceServesWriteReadFlushAndGetID(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	ctx := context.Background()

	if got, want := le.Uint64(f.Config[0:8]), uint64(testDiskSize/512); got != want {
		t.Errorf("GET_CONFIG capacity = %d sectors, want %d", got, want)
	}
	if f.Features&vhostuser.FeatureVersion1 == 0 || f.Features&vhostuser.FeatureProtocolFeatures == 0 {
		t.Errorf("negotiated features %#x lack VERSION_1 or PROTOCOL_FEATURES", f.Features)
	}
	if f.ProtocolFeatures != vhostuser.ProtocolFeatures {
		t.Errorf("protocol features = %#x, want %#x", f.ProtocolFeatures, uint64(vhostuser.ProtocolFeatures))
	}
	q := f.Queues[0]
	data := pattern(3, 8192)
	r, err := q.Write(ctx, 8, data)
	mustOK(t, "write", r, err)
	if r.Written != 1 {
		t.Errorf("write used len = %d, want 1 (status byte only)", r.Written)
	}
	if got := s.disk.bytes(8*512, len(data)); !bytes.Equal(got, data) {
		t.Errorf("disk does not hold the written data")
	}
	r, err = q.Read(ctx, 8, len(data))
	mustOK(t, "read", r, err)
	if !bytes.Equal(r.Data, data) {
		t.Errorf("read back differs from written data")
	}
	if r.Written != uint32(len(data))+1 {
		t.Errorf("read used len = %d, want %d", r.Written, len(data)+1)
	}
	r, err = q.Flush(ctx)
	mustOK(t, "flush", r, err)
	r, err = q.GetID(ctx)
	mustOK(t, "get id", r, err)
	if got := string(bytes.TrimRight(r.Data, "\x00")); got != testSerial {
		t.Errorf("GET_ID = %q, want %q", got, testSerial)
	}
}

func TestGetConfigReturnsRequestedSliceOrEmptyOnOutOfRange(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{ConfigSize: 60})
	// A writable device offers CONFIG_WCE and starts in write-back mode.
	want := blk.Config(s.disk, blk.Options{Serial: testSerial, NumQueues: 1, Cache: new(blk.WriteCache)})
	for _, tc := range []struct {
		off, size uint32
		ok        bool
	}{
		{0, 8, true},
		{32, 1, true},
		{34, 2, true},
		{uint32(len(want)) - 4, 4, true},
		{uint32(len(want)) - 4, 8, false},
		{0, vhostuser.MaxConfigSize, false},
		{0xffffffff, 1, false},
	} {
		got, err := f.GetConfig(tc.off, tc.size)
		if tc.ok {
			if err != nil || !bytes.Equal(got, want[tc.off:tc.off+tc.size]) {
				t.Errorf("GET_CONFIG(%d, %d) = %x, %v; want %x", tc.off, tc.size, got, err, want[tc.off:tc.off+tc.size])
			}
		} else if !errors.Is(err, frontend.ErrNack) {
			t.Errorf("GET_CONFIG(%d, %d) err = %v, want an empty (error) reply", tc.off, tc.size, err)
		}
	}
}

func TestTwoQueuesServeRequestsInParallel(t *testing.T) {
	s := startServer(t, 2)
	f := s.connect(t, frontend.Options{NumQueues: 2})
	writeReadBackOnEveryQueue(t, f, 50, 4096, func(qi, i int) uint64 { return uint64(qi)*2048 + uint64(i)*8 }, func(qi, i int) byte { return byte(qi*100 + i) }, nil)
}

// writeReadBackOnEveryQueue has every queue of f write n blocks of size
// bytes, reading each back at once, one goroutine per queue: block i of
// queue qi goes to sector(qi, i) and holds pattern(seed(qi, i), size).
// during (if not nil) runs on the test goroutine meanwhile. Each queue's
// first failure is reported.
func writeReadBackOnEveryQueue(t *testing.T, f *frontend.Frontend, n, size int, sector func(qi, i int) uint64, seed func(qi, i int) byte, during func()) {
	t.Helper()
	ctx := context.Background()
	errs := make(chan error, len(f.Queues))
	for qi, q := range f.Queues {
		go func() {
			for i := range n {
				data := pattern(seed(qi, i), size)
				if r, err := q.Write(ctx, sector(qi, i), data); err != nil || r.Status != 0 {
					errs <- fmt.Errorf("queue %d write %d: %v, status %d", qi, i, err, r.Status)
					return
				}
				r, err := q.Read(ctx, sector(qi, i), size)
				if err != nil || r.Status != 0 || !bytes.Equal(r.Data, data) {
					errs <- fmt.Errorf("queue %d read %d: %v, status %d", qi, i, err, r.Status)
					return
				}
			}
			errs <- nil
		}()
	}
	if during != nil {
		during()
	}
	for range f.Queues {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestGetVringBaseReturnsNextAvailAndRingRestarts(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	ctx := context.Background()
	q := f.Queues[0]
	for i := 0; i < 5; i++ {
		r, err := q.Write(ctx, uint64(i), pattern(byte(i), 512))
		mustOK(t, "write", r, err)
	}
	if err := f.SetVringEnable(0, false); err != nil {
		t.Fatal(err)
	}
	base, err := f.GetVringBase(0)
	if err != nil {
		t.Fatal(err)
	}
	if base != 5 {
		t.Fatalf("GET_VRING_BASE = %d after 5 requests, want 5", base)
	}
	// Restart from the returned base, as QEMU does after a stop.
	if err := f.StartQueue(q); err != nil {
		t.Fatal(err)
	}
	r, err := q.Read(ctx, 4, 512)
	mustOK(t, "read after restart", r, err)
	if !bytes.Equal(r.Data, pattern(4, 512)) {
		t.Error("read after restart returned wrong data")
	}
}

func TestReplyAckOnlyWhenNegotiatedAndRequested(t *testing.T) {
	s := startServer(t, 1)

	t.Run("negotiated", func(t *testing.T) {
		f := s.connect(t, frontend.Options{})
		// SET_OWNER with NEED_REPLY is acked with 0.
		if err := f.SetOwner(); err != nil {
			t.Fatalf("SET_OWNER with NEED_REPLY: %v", err)
		}
		// Changing read-only config is refused with a non-zero ack, and
		// the session goes on.
		if err := f.SetConfig(0, 0, []byte{1, 2, 3, 4}); !errors.Is(err, frontend.ErrNack) {
			t.Fatalf("SET_CONFIG of capacity: err = %v, want ErrNack", err)
		}
		// Writing writeback unchanged is accepted.
		if err := f.SetConfig(32, 0, f.Config[32:33]); err != nil {
			t.Fatalf("SET_CONFIG of unchanged writeback: %v", err)
		}
		if _, err := f.GetFeatures(); err != nil {
			t.Fatalf("session unusable after refused SET_CONFIG: %v", err)
		}
	})

	t.Run("not negotiated", func(t *testing.T) {
		f := s.dial(t)
		// NEED_REPLY without REPLY_ACK negotiated must not produce a reply:
		// the next message read is GET_FEATURES' answer.
		if err := f.Send(vhostuser.ReqSetOwner, vhostuser.FlagVersion|vhostuser.FlagNeedReply, nil); err != nil {
			t.Fatal(err)
		}
		if err := f.Send(vhostuser.ReqGetFeatures, vhostuser.FlagVersion, nil); err != nil {
			t.Fatal(err)
		}
		h, p, err := f.ReadReply()
		if err != nil {
			t.Fatal(err)
		}
		if h.Request != vhostuser.ReqGetFeatures || len(p) != 8 {
			t.Fatalf("first reply is %s with %d bytes, want GET_FEATURES with 8", h.Request, len(p))
		}
	})
}

func TestMalformedChainCompletesWithZeroLengthAndQueueContinues(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	ctx := context.Background()
	q := f.Queues[0]
	// A descriptor far outside guest memory.
	head, err := q.Publish([]frontend.Desc{{Addr: 0xdead0000000, Len: 16}, {Addr: frontend.GPA(0), Len: 1, Write: true}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := q.WaitUsed(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if u.ID != uint32(head) || u.Len != 0 {
		t.Fatalf("used = {id %d len %d}, want {id %d len 0}", u.ID, u.Len, head)
	}
	if err := <-s.ev.failed; err == nil {
		t.Error("RequestFailed reported a nil error")
	}
	r, err := q.Write(ctx, 0, pattern(9, 512))
	mustOK(t, "write after bad chain", r, err)
}

func TestCancelStopsServeWithActiveConnection(t *testing.T) {
	dir := t.TempDir()
	ln, err := vhostuser.Listen(dir + "/s")
	if err != nil {
		t.Fatal(err)
	}
	ev := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: newMemDisk(1 << 20), Events: ev})
	}()
	f, err := frontend.Dial(dir + "/s")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(frontend.Options{MemSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve after cancel = %v, want nil", err)
	}
	if c := <-ev.closed; c.err != nil {
		t.Errorf("ConnClosed after cancel reported %v, want nil", c.err)
	}
}

func TestServeConnOverSocketpair(t *testing.T) {
	a, b := socketpair(t)
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.ServeConn(context.Background(), a, vhostuser.Options{Disk: newMemDisk(1 << 20)})
	}()
	f := frontend.New(b)
	if err := f.Setup(frontend.Options{MemSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	r, err := f.Queues[0].Flush(context.Background())
	mustOK(t, "flush", r, err)
	f.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after orderly close = %v, want nil", err)
	}
}
