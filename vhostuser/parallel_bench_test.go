package vhostuser_test

import (
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// syncDisk is a memDisk whose Flush costs what an fdatasync of a small
// write costs on an SSD (about 1 ms here, issue 12): the device latency
// of the benchmark below, not a timing assertion.
type syncDisk struct {
	*memDisk
	flushDelay time.Duration
}

func (d *syncDisk) Flush() error {
	time.Sleep(d.flushDelay)
	return d.memDisk.Flush()
}

// BenchmarkQueueReadsWhileFlushing keeps one FLUSH in flight at all times
// on a queue (each taking 1 ms in the disk) and fills the other 31 slots
// of the queue with 4 KiB reads; one op is one read. With requests run one
// at a time every flush stalls the reads queued behind it; with requests in
// parallel the reads go on while it runs. Reports reads/s and flushes/s.
func BenchmarkQueueReadsWhileFlushing(b *testing.B) {
	const slots = 32
	d := &syncDisk{memDisk: newMemDisk(testDiskSize), flushDelay: time.Millisecond}
	path := startServerBench(b, d)
	f, err := frontend.Dial(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(frontend.Options{MemSize: 16 << 20, QueueSize: 128, MaxIO: 4096, MaxInflight: 1}); err != nil {
		b.Fatal(err)
	}
	r, err := f.NewBlkRing(f.Queues[0], slots, 4096)
	if err != nil {
		b.Fatal(err)
	}
	sectors := uint64(testDiskSize / 4096)
	r.Prepare(0, frontend.BlkTFlush, 0, 0)
	for s := 1; s < slots; s++ {
		r.Prepare(s, frontend.BlkTIn, uint64(s)%sectors*8, 4096)
	}
	r.Publish()
	got := make([]int, slots)
	reads, flushes := 0, 0
	start := time.Now()
	b.ResetTimer()
	for reads < b.N {
		if err := r.Wait(1000); err != nil {
			b.Fatal(err)
		}
		n := r.Reap(got, nil)
		for _, s := range got[:n] {
			if s < 0 || r.Status(s) != frontend.BlkSOK {
				b.Fatalf("slot %d completed with status %d", s, r.Status(max(s, 0)))
			}
			if s == 0 {
				flushes++
				r.Prepare(0, frontend.BlkTFlush, 0, 0)
				continue
			}
			reads++
			r.Prepare(s, frontend.BlkTIn, uint64(reads*7+s)%sectors*8, 4096)
		}
		r.Publish()
	}
	b.StopTimer()
	el := time.Since(start).Seconds()
	b.ReportMetric(float64(reads)/el, "reads/s")
	b.ReportMetric(float64(flushes)/el, "flushes/s")
	// Drain what is still in flight so the session ends cleanly.
	for inflight := slots; inflight > 0; {
		if err := r.Wait(1000); err != nil {
			b.Fatal(err)
		}
		inflight -= r.Reap(got, nil)
	}
}
