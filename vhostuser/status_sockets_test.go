package vhostuser_test

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// frontendOn returns the Frontends entry for socket, failing if there is
// not exactly one.
func frontendOn(t *testing.T, st vhostuser.DeviceStatus, socket string) vhostuser.FrontendStatus {
	t.Helper()
	var found []vhostuser.FrontendStatus
	for _, f := range st.Frontends {
		if f.Socket == socket {
			found = append(found, f)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d entries for %s in %+v", len(found), socket, st.Frontends)
	}
	return found[0]
}

// One device on two sockets (serve --socket-path A --socket-path B, a
// migration on one host) with one Monitor: status lists each socket's
// front-end, its top-level fields describe the one whose rings run (not
// the one that connected last), and Quiesce holds the queues of both.
func TestOneMonitorOnTwoSocketsShowsEachFrontEndAndQuiescesTheRunningOne(t *testing.T) {
	disk := &quiesceDisk{memDisk: newMemDisk(testDiskSize)}
	gate := vhostuser.NewRingGate()
	mon := new(vhostuser.Monitor)
	paths := serveOnTwoSockets(t, vhostuser.Options{Disk: disk, Gate: gate, Monitor: mon, NumQueues: 2})
	for len(mon.Status().Frontends) < 2 {
		runtime.Gosched() // until both Serve calls listed their socket
	}
	if st := mon.Status(); st.Connected || frontendOn(t, st, paths[0]).Connected || frontendOn(t, st, paths[1]).Connected {
		t.Fatalf("status before any front-end: %+v", st)
	}

	src := dialSetUp(t, paths[0])
	// The destination connects and negotiates; its first ring waits for
	// the source's to stop.
	_, setup := dialWaitingAtGate(t, paths[1], gate)

	st := mon.Status()
	a, b := frontendOn(t, st, paths[0]), frontendOn(t, st, paths[1])
	if !a.Connected || !a.Active || len(a.Queues) != 2 || !a.Queues[0].Started || !a.Queues[1].Started {
		t.Errorf("source's entry: %+v", a)
	}
	if !b.Connected || b.Active || !b.FeaturesAcked || b.Conn == a.Conn || (len(b.Queues) > 0 && b.Queues[0].Started) {
		t.Errorf("destination's entry: %+v", b)
	}
	if !st.Connected || st.Conn != a.Conn || len(st.Queues) != 2 || st.Connections != 2 {
		t.Errorf("top-level status %+v, want the source's (connection %d)", st, a.Conn)
	}

	// Quiesce holds the source's queues although the destination
	// connected last.
	ctx := context.Background()
	quiesceDuringWrites(t, mon, disk, 100, 200, func(i int) bool {
		r, err := src.Queues[i%2].Write(ctx, uint64(i%64), make([]byte, 512))
		if err != nil || r.Status != blk.StatusOK {
			t.Errorf("source write %d: %+v %v", i, r, err)
			return false
		}
		return true
	})
	if v := disk.violations.Load(); v != 0 {
		t.Errorf("%d source requests ran while Quiesce's callback ran", v)
	}

	// The source stops its rings and leaves: the destination is active,
	// the source's socket is listed as not connected.
	for i := range 2 {
		if _, err := src.GetVringBase(uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-setup; err != nil {
		t.Fatalf("destination Setup: %v", err)
	}
	src.Close()
	for frontendOn(t, mon.Status(), paths[0]).Connected {
		runtime.Gosched()
	}
	st = mon.Status()
	if a, b := frontendOn(t, st, paths[0]), frontendOn(t, st, paths[1]); a.Connected || a.Active || !b.Active || st.Conn != b.Conn || len(st.Queues) != 2 || !st.Queues[0].Started {
		t.Errorf("after the source left: %+v", st)
	}
}

// gatedDisk holds every write until release is closed.
type gatedDisk struct {
	*memDisk
	entered  chan struct{}
	release  chan struct{}
	inflight atomic.Int64
}

func (d *gatedDisk) WriteVec(b [][]byte, off int64) error {
	d.inflight.Add(1)
	defer d.inflight.Add(-1)
	select {
	case d.entered <- struct{}{}:
	default:
	}
	<-d.release
	return d.memDisk.WriteVec(b, off)
}

// A front-end that disconnects while a request of its runs stays in the
// Monitor until its queues have stopped: Status shows it and Quiesce waits
// for the request, so a disk swapped inside Quiesce is never used by a
// leaving connection's last requests.
func TestQuiesceWaitsForTheRequestsOfAFrontEndThatIsLeaving(t *testing.T) {
	d := &gatedDisk{memDisk: newMemDisk(testDiskSize), entered: make(chan struct{}, 1), release: make(chan struct{})}
	mon := new(vhostuser.Monitor)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1, Monitor: mon})
	f := s.connect(t, smallSetup)
	wrote := make(chan error, 1)
	go func() {
		_, err := f.Queues[0].Write(context.Background(), 0, make([]byte, 512))
		wrote <- err
	}()
	<-d.entered
	// Hang up, keeping the guest memory mapped so the request can still
	// complete into it.
	f.Conn().Close()
	// Give the connection every chance to be forgotten too early: the
	// session sees EOF at once, its worker stays in the disk.
	for i := 0; i < 5000 && mon.Status().Connected; i++ {
		runtime.Gosched()
	}
	if !mon.Status().Connected {
		t.Error("status forgot the connection while a request of it runs")
	}
	quiesced := make(chan error, 1)
	go func() {
		quiesced <- mon.Quiesce(func() error {
			if n := d.inflight.Load(); n != 0 {
				return fmt.Errorf("%d requests of the leaving front-end in progress inside Quiesce", n)
			}
			return nil
		})
	}()
	close(d.release)
	if err := <-quiesced; err != nil {
		t.Error(err)
	}
	<-wrote // the request completed; its result does not matter here
	s.waitClosed(t)
	if st := mon.Status(); st.Connected {
		t.Errorf("status after the connection ended: %+v", st)
	}
}
