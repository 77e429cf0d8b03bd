package vhostuser_test

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
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

// quiesceDisk counts requests in progress and those that ran while a
// Quiesce callback ran.
type quiesceDisk struct {
	*memDisk
	inflight, violations atomic.Int64
	quiet                atomic.Bool
}

// quiesceDuringWrites runs each writer in a goroutine of its own, calling
// it with i = 0, 1, ... until it returns false (it reports its own error) or
// the Quiesce calls are over, and meanwhile calls mon.Quiesce at least
// rounds times and until minWrites writes have completed. Each callback
// fails the test unless no request of d is in progress, and marks d quiet
// while it runs so that a request starting inside counts as a violation
// (the caller checks d.violations). It returns the writes completed.
func quiesceDuringWrites(t *testing.T, mon *vhostuser.Monitor, d *quiesceDisk, rounds int, minWrites int64, writers ...func(i int) bool) int64 {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var done atomic.Int64
	for _, write := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if !write(i) {
					return
				}
				done.Add(1)
			}
		}()
	}
	for i := 0; i < rounds || done.Load() < minWrites; i++ {
		err := mon.Quiesce(func() error {
			d.quiet.Store(true)
			defer d.quiet.Store(false)
			if n := d.inflight.Load(); n != 0 {
				return fmt.Errorf("%d requests in progress inside Quiesce", n)
			}
			runtime.Gosched()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	return done.Load()
}

func (d *quiesceDisk) enter() {
	d.inflight.Add(1)
	if d.quiet.Load() {
		d.violations.Add(1)
	}
}

func (d *quiesceDisk) WriteVec(b [][]byte, off int64) error {
	d.enter()
	defer d.inflight.Add(-1)
	runtime.Gosched() // widen the window a racing Quiesce would hit
	return d.memDisk.WriteVec(b, off)
}

func (d *quiesceDisk) ReadVec(b [][]byte, off int64) error {
	d.enter()
	defer d.inflight.Add(-1)
	return d.memDisk.ReadVec(b, off)
}

// While Quiesce's callback runs no request is in progress on any queue and
// none starts; requests in flight before complete, those after wait, and
// none fails.
func TestQuiesceHoldsEveryQueueOutsideItsCallback(t *testing.T) {
	d := &quiesceDisk{memDisk: newMemDisk(testDiskSize)}
	mon := new(vhostuser.Monitor)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 2, Monitor: mon})
	o := smallSetup
	o.NumQueues = 2
	f := s.connect(t, o)
	ctx := context.Background()
	var writers []func(i int) bool
	for q := range 2 {
		writers = append(writers, func(i int) bool {
			r, err := f.Queues[q].Write(ctx, uint64(q*64+i%64), make([]byte, 512))
			if err != nil || r.Status != blk.StatusOK {
				t.Errorf("queue %d write %d: %+v %v", q, i, r, err)
				return false
			}
			return true
		})
	}
	// Quiesce over and over until the queues have done plenty of work
	// between and around the calls.
	done := quiesceDuringWrites(t, mon, d, 200, 300, writers...)
	if v := d.violations.Load(); v != 0 {
		t.Errorf("%d requests ran while Quiesce's callback ran", v)
	}
	if done == 0 {
		t.Error("no write completed")
	}
}
