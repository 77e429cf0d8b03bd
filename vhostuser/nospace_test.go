package vhostuser_test

import (
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// fullMemDisk fails writes as the engine does on a full host disk while
// full is set.
type fullMemDisk struct {
	*memDisk
	full atomic.Bool
}

func (d *fullMemDisk) WriteVec(bufs [][]byte, off int64) error {
	if d.full.Load() {
		return fmt.Errorf("write: %w: %w", vhdx.ErrNoSpace, syscall.ENOSPC)
	}
	return d.memDisk.WriteVec(bufs, off)
}

// TestRequestHeldForSpaceStaysInFlightWhenItsRingStops: with
// --on-enospc wait a write held for host space does not keep
// GET_VRING_BASE waiting: stopping the ring abandons the hold, the
// request is not completed (used.idx stays 0, no status) and stays marked
// in the inflight region for the front-end to resubmit, and the episode
// ends without space.
func TestRequestHeldForSpaceStaysInFlightWhenItsRingStops(t *testing.T) {
	d := &fullMemDisk{memDisk: newMemDisk(testDiskSize)}
	d.full.Store(true)
	events := make(chan blk.NoSpaceEvent, 4)
	ns := blk.NewNoSpace(blk.NoSpaceWait, func(ev blk.NoSpaceEvent) { events <- ev })
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Disk: d, Blk: blk.Options{NoSpace: ns}})
	f := s.dial(t)
	in, err := f.SetupInflight(inflightSetup, true)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	q := f.Queues[0]
	head, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 8, Data: pattern('H', 512)})
	if err != nil {
		t.Fatal(err)
	}
	next := func() blk.NoSpaceEvent {
		select {
		case ev := <-events:
			return ev
		case <-time.After(30 * time.Second):
			t.Fatal("no out-of-space event: the write was not held")
			return blk.NoSpaceEvent{}
		}
	}
	if ev := next(); !ev.Start {
		t.Fatalf("first event %+v, want the start of an episode", ev)
	}
	type baseResult struct {
		base uint32
		err  error
	}
	got := make(chan baseResult, 1)
	go func() {
		b, err := f.GetVringBase(0)
		got <- baseResult{b, err}
	}()
	var r baseResult
	select {
	case r = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("GET_VRING_BASE is stuck behind the request held for space")
	}
	if r.err != nil || r.base != 1 {
		t.Fatalf("GET_VRING_BASE = %d, %v; want 1 (the held request was popped)", r.base, r.err)
	}
	if ev := next(); ev.Start || ev.SpaceBack {
		t.Errorf("second event %+v, want the episode's end without space", ev)
	}
	if used := q.UsedIdx(); used != 0 {
		t.Errorf("used.idx = %d: the abandoned request was completed", used)
	}
	region := in.QueueRegion(0, virtqueue.InflightRegionSize(inflightSetup.QueueSize))
	if region[16+16*int(head)] != 1 {
		t.Errorf("descriptor %d is not marked in flight", head)
	}
	if snap := ns.Snapshot(); snap.Waiting != 0 || snap.Episodes != 1 {
		t.Errorf("snapshot %+v, want nothing waiting after one episode", snap)
	}
}
