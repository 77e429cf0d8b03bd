package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// workerGoroutines counts the queue workers running in this process, from
// the goroutine dump.
func workerGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "vhostuser.(*worker).run(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// waitWorkers waits until the worker count is want (a stopped worker
// unwinds after GET_VRING_BASE answered) and returns the last count.
func waitWorkers(want int) int {
	n := workerGoroutines()
	for i := 0; i < 400 && n != want; i++ {
		time.Sleep(5 * time.Millisecond)
		n = workerGoroutines()
	}
	return n
}

// The default offers MaxQueues queues, as many as a front-end can address,
// in GET_QUEUE_NUM and in the config's num_queues; a front-end that sets up
// three of them (scattered, the last index included) gets exactly three
// workers, each serving I/O, and stopping one leaves two.
func TestDefaultOffersManyQueuesAndStartsWorkersOnlyForTheOnesSetUp(t *testing.T) {
	s := startServer(t, 0)
	f := s.dial(t)
	// Workers of earlier tests' servers may still be unwinding.
	base := waitWorkers(0)

	feats, err := f.GetFeatures()
	if err != nil {
		t.Fatal(err)
	}
	pf, err := f.GetProtocolFeatures()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.SetProtocolFeatures(pf); err != nil {
		t.Fatal(err)
	}
	n, err := f.GetQueueNum()
	if err != nil {
		t.Fatal(err)
	}
	if n != vhostuser.MaxQueues {
		t.Fatalf("GET_QUEUE_NUM = %d, want %d", n, vhostuser.MaxQueues)
	}
	cfg, err := f.GetConfig(0, 60)
	if err != nil {
		t.Fatal(err)
	}
	// virtio_blk_config.num_queues is the u16 at offset 34 (VIRTIO 1.2 §5.2.4).
	if got := binary.LittleEndian.Uint16(cfg[34:]); got != vhostuser.MaxQueues {
		t.Fatalf("config num_queues = %d, want %d (must match GET_QUEUE_NUM)", got, vhostuser.MaxQueues)
	}
	if err := f.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if err := f.SetFeatures(feats); err != nil {
		t.Fatal(err)
	}
	if err := f.CreateMemory(1 << 20); err != nil {
		t.Fatal(err)
	}
	if err := f.SetMemTable(); err != nil {
		t.Fatal(err)
	}
	if got := workerGoroutines() - base; got != 0 {
		t.Fatalf("%d workers before any queue was set up, want 0", got)
	}

	indices := []int{0, 7, vhostuser.MaxQueues - 1}
	var qs []*frontend.Queue
	for _, i := range indices {
		q, err := f.NewQueue(i, 16, 2, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.StartQueue(q); err != nil {
			t.Fatalf("queue %d: %v", i, err)
		}
		qs = append(qs, q)
	}
	if got := waitWorkers(base+len(indices)) - base; got != len(indices) {
		t.Fatalf("%d workers for %d queues set up out of %d offered", got, len(indices), n)
	}

	ctx := context.Background()
	for k, q := range qs {
		data := pattern(byte(k+1), 512)
		r, err := q.Write(ctx, uint64(k), data)
		mustOK(t, "write", r, err)
		r, err = q.Read(ctx, uint64(k), 512)
		mustOK(t, "read", r, err)
		if !bytes.Equal(r.Data, data) {
			t.Fatalf("queue %d: read back differs", q.Index)
		}
	}

	if _, err := f.GetVringBase(7); err != nil {
		t.Fatal(err)
	}
	if got := waitWorkers(base+2) - base; got != 2 {
		t.Fatalf("%d workers after stopping one of three, want 2", got)
	}
}
