package vhostuser_test

import (
	"context"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// settled waits for goroutines that already reported completion to
// finish unwinding, then returns the open fds not in fds0 (newFDs) and the
// goroutine count. The loop only waits; callers assert on what it returns.
// The fds are compared as sets, not counted: an fd an earlier test's
// goroutine closes meanwhile would make a count fall and hide a leak, or
// fail a test that leaked nothing.
func settled(t *testing.T, fds0 map[string]string, g0 int) ([]string, int) {
	t.Helper()
	added, g := newFDs(fds0, openFDs(t)), runtime.NumGoroutine()
	for i := 0; i < 200 && (len(added) > 0 || g > g0); i++ {
		time.Sleep(5 * time.Millisecond)
		added, g = newFDs(fds0, openFDs(t)), runtime.NumGoroutine()
	}
	return added, g
}

// noFDOrGoroutineGrowth waits for fds and goroutines to settle (settled)
// and fails if an fd not in fds0 is open, or goroutines grew beyond g0,
// over what was done.
func noFDOrGoroutineGrowth(t *testing.T, fds0 map[string]string, g0 int, over string) {
	t.Helper()
	added, g := settled(t, fds0, g0)
	if len(added) > 0 {
		t.Errorf("fds opened over %s and still open: %v", over, added)
	}
	if g > g0 {
		t.Errorf("goroutines grew from %d to %d over %s", g0, g, over)
	}
}

func TestThousandConnectionsOfEveryKindLeakNoFDsOrGoroutines(t *testing.T) {
	if testing.Short() {
		t.Skip("1000 connections")
	}
	s := startServer(t, 2)
	ctx := context.Background()
	o := smallSetup
	o.NumQueues = 2
	kinds := []struct {
		name  string
		every int // one cycle in every
		run   func(t *testing.T, f *frontend.Frontend)
	}{
		// Connect and hang up: the cheapest cycle, most of the thousand.
		{"bare", 1, func(t *testing.T, f *frontend.Frontend) {}},
		// Full negotiation with an inflight buffer, two running queues
		// and a write on each.
		{"full", 4, func(t *testing.T, f *frontend.Frontend) {
			in, err := f.SetupInflight(o, true)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			for _, q := range f.Queues {
				r, err := q.Write(ctx, 1, pattern(2, 512))
				mustOK(t, "write", r, err)
			}
		}},
		// Running queues, a request left unanswered by the front-end, and
		// the socket closed in the middle of a message.
		{"aborted", 5, func(t *testing.T, f *frontend.Frontend) {
			if err := f.Setup(o); err != nil {
				t.Fatal(err)
			}
			if _, err := f.Queues[0].Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 2, Data: pattern(3, 512)}); err != nil {
				t.Fatal(err)
			}
			hdr := vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqSetVringCall, Flags: vhostuser.FlagVersion, Size: 8})
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			err = f.SendRaw(append(hdr, 1, 0), efd)
			unix.Close(efd)
			if err != nil {
				t.Fatal(err)
			}
		}},
	}
	ran := map[string]int{}
	cycle := func(i int) {
		f, err := frontend.Dial(s.path)
		if err != nil {
			t.Fatal(err)
		}
		k := kinds[0]
		for _, kk := range kinds[1:] {
			if i%kk.every == 0 {
				k = kk
			}
		}
		k.run(t, f)
		ran[k.name]++
		f.Close()
		s.waitClosed(t)
		<-s.ev.opened // the recorder's buffer holds only 1000
	}
	cycle(0) // warm up lazily created runtime state (poller, timers)
	fds0, g0 := openFDs(t), runtime.NumGoroutine()
	for i := 1; i <= 1000; i++ {
		cycle(i)
	}
	noFDOrGoroutineGrowth(t, fds0, g0, "1000 connections")
	t.Logf("connections by kind: %v", ran)
}

// A front-end that keeps one connection and re-sends every resource-carrying
// request: fds, mappings and heap stay where they were.
func TestChurningFrontEndKeepsFDsAndHeapBounded(t *testing.T) {
	s := startServer(t, 1)
	f := s.dial(t)
	in, err := f.SetupInflight(smallSetup, true)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	q := f.Queues[0]
	ctx := context.Background()
	churn := func() {
		for _, req := range []vhostuser.Request{vhostuser.ReqSetVringCall, vhostuser.ReqSetVringErr} {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			err = f.SetVringFD(req, 0, fd)
			unix.Close(fd)
			if err != nil {
				t.Fatal(err)
			}
		}
		// Back to our own call fd, so completions still reach us.
		if err := f.SetVringFD(vhostuser.ReqSetVringCall, 0, q.CallFD()); err != nil {
			t.Fatal(err)
		}
		extra, err := f.GetInflightFD(1, 1024)
		if err != nil {
			t.Fatal(err)
		}
		extra.Close()
		if err := f.SetMemTable(); err != nil {
			t.Fatal(err)
		}
		if _, err := f.GetVringBase(0); err != nil {
			t.Fatal(err)
		}
		if err := f.SetInflightFD(in); err != nil {
			t.Fatal(err)
		}
		if err := f.StartQueue(q); err != nil {
			t.Fatal(err)
		}
		r, err := q.Write(ctx, 3, pattern(4, 512))
		mustOK(t, "write", r, err)
	}
	churn()
	var m0, m runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	fds0 := openFDs(t)
	for range 1000 {
		churn()
	}
	if added, _ := settled(t, fds0, runtime.NumGoroutine()); len(added) > 0 {
		t.Errorf("fds opened over 1000 rounds and still open: %v", added)
	}
	runtime.GC()
	runtime.ReadMemStats(&m)
	// Live heap, not allocation: 1000 rounds of a leak of even one
	// message buffer or one ring state would exceed this.
	if grew := int64(m.HeapAlloc) - int64(m0.HeapAlloc); grew > 4<<20 {
		t.Errorf("live heap grew by %d bytes over 1000 rounds", grew)
	}
}
