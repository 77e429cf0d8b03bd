package vhostuser_test

import (
	"context"
	"slices"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// The monitor reports what the connected front-end negotiated and which
// queues run, and nothing once it is gone; statistics count the requests
// each queue executed.
func TestMonitorAndStatsReportTheConnectedFrontEndAndItsRequests(t *testing.T) {
	mon := new(vhostuser.Monitor)
	st := blk.NewStats(4)
	s := startServerOpts(t, vhostuser.Options{NumQueues: 4, Monitor: mon, Stats: st})
	if got := mon.Status(); got.Connected || len(got.Queues) != 0 {
		t.Fatalf("status before any front-end: %+v", got)
	}
	o := smallSetup
	o.NumQueues = 2
	f := s.connect(t, o)
	got := mon.Status()
	if !got.Connected || got.Connections != 1 || !got.FeaturesAcked {
		t.Fatalf("status after setup: %+v", got)
	}
	if got.Features != f.Features || got.ProtocolFeatures != f.ProtocolFeatures {
		t.Errorf("features %#x/%#x, front-end acked %#x/%#x", got.Features, got.ProtocolFeatures, f.Features, f.ProtocolFeatures)
	}
	for _, want := range []string{"VERSION_1", "FLUSH", "MQ"} {
		if !slices.Contains(got.FeatureNames, want) {
			t.Errorf("feature names %v lack %s", got.FeatureNames, want)
		}
	}
	if len(got.Queues) != 2 {
		t.Fatalf("queues %+v, want 2", got.Queues)
	}
	for i, q := range got.Queues {
		if q.Index != i || !q.Started || !q.Enabled || q.Broken || q.Size != o.QueueSize {
			t.Errorf("queue %d: %+v", i, q)
		}
	}

	ctx := context.Background()
	q1 := f.Queues[1]
	for i := 0; i < 3; i++ {
		if r, err := q1.Write(ctx, uint64(i), make([]byte, 512)); err != nil || r.Status != blk.StatusOK {
			t.Fatalf("write: %+v %v", r, err)
		}
	}
	if r, err := f.Queues[0].Read(ctx, 0, 1024); err != nil || r.Status != blk.StatusOK {
		t.Fatalf("read: %+v %v", r, err)
	}
	if r, err := f.Queues[0].Read(ctx, 1<<30, 512); err != nil || r.Status != blk.StatusIOErr {
		t.Fatalf("read past the end: %+v %v", r, err)
	}
	queues, total := st.Snapshot()
	if len(queues) != 2 {
		t.Fatalf("stats for %d queues, want 2", len(queues))
	}
	if w := queues[1].Ops["write"]; w.Ops != 3 || w.Bytes != 1536 || w.Errors != 0 {
		t.Errorf("queue 1 writes %+v", w)
	}
	if r := queues[0].Ops["read"]; r.Ops != 2 || r.Bytes != 1024 || r.Errors != 1 {
		t.Errorf("queue 0 reads %+v", r)
	}
	if total.Ops["write"].Ops != 3 || total.Ops["read"].Ops != 2 {
		t.Errorf("total %+v", total.Ops)
	}

	f.Close()
	s.waitClosed(t)
	if got := mon.Status(); got.Connected || len(got.Queues) != 0 || got.Connections != 1 {
		t.Errorf("status after the front-end left: %+v", got)
	}
}
