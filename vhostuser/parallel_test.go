package vhostuser_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// parkDisk is a memDisk whose Flush, and reads and writes at chosen byte
// offsets, park until the test releases them. Each parked call reports itself on
// parked first, so a test knows the request is executing.
type parkDisk struct {
	*memDisk
	parkFlush bool
	flushGo   chan struct{}           // closed: parked flushes return
	writeGo   map[int64]chan struct{} // offset → closed: that write goes on
	readGo    map[int64]chan struct{} // offset → closed: that read goes on
	parked    chan string             // "flush", "write" or "read"
	mu        sync.Mutex              // guards the map lookups against the test
}

func newParkDisk(parkFlush bool) *parkDisk {
	return &parkDisk{memDisk: newMemDisk(testDiskSize), parkFlush: parkFlush, flushGo: make(chan struct{}),
		writeGo: map[int64]chan struct{}{}, readGo: map[int64]chan struct{}{}, parked: make(chan string, 64)}
}

// park holds a read or write at off while gates has a channel for it:
// it reports what on parked, then waits until the test closes it.
func (d *parkDisk) park(gates map[int64]chan struct{}, off int64, what string) {
	d.mu.Lock()
	ch := gates[off]
	d.mu.Unlock()
	if ch != nil {
		d.parked <- what
		<-ch
	}
}

func (d *parkDisk) ReadVec(b [][]byte, off int64) error {
	d.park(d.readGo, off, "read")
	return d.memDisk.ReadVec(b, off)
}

func (d *parkDisk) Flush() error {
	if d.parkFlush {
		d.parked <- "flush"
		<-d.flushGo
	}
	return d.memDisk.Flush()
}

func (d *parkDisk) WriteVec(b [][]byte, off int64) error {
	d.park(d.writeGo, off, "write")
	return d.memDisk.WriteVec(b, off)
}

// ringKinds runs a test on a split and on a packed ring.
var ringKinds = []struct {
	name   string
	packed bool
}{{"split", false}, {"packed", true}}

// parallelSetup leaves room for several requests in flight per queue.
func parallelSetup(packed bool) frontend.Options {
	return frontend.Options{MemSize: 2 << 20, QueueSize: 64, MaxIO: 8192, MaxInflight: 16, Packed: packed}
}

func awaitParked(t *testing.T, d *parkDisk, want string) {
	t.Helper()
	if got := <-d.parked; got != want {
		t.Fatalf("parked %q, want %q", got, want)
	}
}

// serveParkDisk serves d on one queue, packed or split, and returns the
// connected front-end and its queue.
func serveParkDisk(t *testing.T, d *parkDisk, packed bool) (*frontend.Frontend, *frontend.Queue) {
	t.Helper()
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
	f := s.connect(t, parallelSetup(packed))
	return f, f.Queues[0]
}

// parkFlush submits a FLUSH on q and waits until d holds it parked; it
// returns the flush's head.
func parkFlush(t *testing.T, q *frontend.Queue, d *parkDisk) uint16 {
	t.Helper()
	head, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTFlush})
	if err != nil {
		t.Fatal(err)
	}
	awaitParked(t, d, "flush")
	return head
}

// waitingAt returns a channel closed the first time a session has to wait
// at what ("drain" or "stop", see SetWaitHook) for requests in flight; the
// hook is removed when the test ends.
func waitingAt(t *testing.T, what string) <-chan struct{} {
	t.Helper()
	reached := make(chan struct{})
	var once sync.Once
	t.Cleanup(vhostuser.SetWaitHook(func(w string) {
		if w == what {
			once.Do(func() { close(reached) })
		}
	}))
	return reached
}

// A FLUSH parked in the disk does not hold up the reads queued behind it
// on the same queue: they complete, with their data, while it waits.
func TestReadsBehindAParkedFlushComplete(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			d := newParkDisk(true)
			copy(d.data, pattern(3, 64*512)) // before the server reads it
			_, q := serveParkDisk(t, d, k.packed)
			ctx := context.Background()
			flushHead := parkFlush(t, q, d)
			for i := range 8 {
				r, err := q.Read(ctx, uint64(8*i), 4096)
				mustOK(t, "read behind the parked flush", r, err)
				if !bytes.Equal(r.Data, d.bytes(8*i*512, 4096)) {
					t.Fatalf("read %d: wrong data", i)
				}
			}
			close(d.flushGo)
			r, err := q.Reap(ctx, 0)
			mustOK(t, "the flush", r, err)
			if r.Head != flushHead || r.Written != 1 {
				t.Errorf("flush completion: head %d written %d, want head %d written 1", r.Head, r.Written, flushHead)
			}
		})
	}
}

// Requests that finish in the reverse order of their submission land in
// the used ring in finishing order, each with its own id and used length:
// three writes park in the disk, a read submitted after them completes
// first, then the writes are let go one by one, last first.
func TestOutOfOrderCompletionsCarryTheirOwnIdsAndLengths(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			const n = 3
			offs := make([]int64, n)
			for i := range offs {
				offs[i] = int64(16 * i * 512)
			}
			d := newParkDisk(false)
			for _, off := range offs {
				d.writeGo[off] = make(chan struct{})
			}
			copy(d.data, pattern(9, 128*512)) // before the server reads it
			_, q := serveParkDisk(t, d, k.packed)
			ctx := context.Background()
			heads := make([]uint16, n)
			for i := range n {
				h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: uint64(16 * i), Data: pattern(byte(i+1), 512*(i+1))})
				if err != nil {
					t.Fatal(err)
				}
				heads[i] = h
			}
			for range n {
				awaitParked(t, d, "write")
			}
			readHead, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTIn, Sector: 100, InLen: 2048})
			if err != nil {
				t.Fatal(err)
			}
			r, err := q.Reap(ctx, 2048)
			mustOK(t, "read behind three parked writes", r, err)
			if r.Head != readHead || r.Written != 2048+1 || !bytes.Equal(r.Data, pattern(9, 128*512)[100*512:100*512+2048]) {
				t.Fatalf("first completion: head %d written %d, want the read, head %d written %d, with its data", r.Head, r.Written, readHead, 2048+1)
			}
			for i := n - 1; i >= 0; i-- {
				close(d.writeGo[offs[i]])
				r, err := q.Reap(ctx, 0)
				mustOK(t, "write", r, err)
				if r.Head != heads[i] || r.Written != 1 {
					t.Fatalf("completion after releasing write %d: head %d written %d, want head %d written 1", i, r.Head, r.Written, heads[i])
				}
				if !bytes.Equal(d.bytes(int(offs[i]), 512*(i+1)), pattern(byte(i+1), 512*(i+1))) {
					t.Fatalf("write %d did not reach the disk", i)
				}
			}
		})
	}
}

// SET_MEM_TABLE sent while a request is executing waits until that
// request has completed and been published, then installs the new table,
// and the queue serves requests from it.
func TestSetMemTableWaitsForRequestsInFlightThenRemaps(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			draining := waitingAt(t, "drain")
			d := newParkDisk(true)
			f, q := serveParkDisk(t, d, k.packed)
			ctx := context.Background()
			parkFlush(t, q, d)
			replied := make(chan error, 1)
			go func() { replied <- f.SetMemTable() }()
			<-draining
			select {
			case err := <-replied:
				t.Fatalf("SET_MEM_TABLE replied (%v) while a request was executing", err)
			default:
			}
			close(d.flushGo)
			if err := <-replied; err != nil {
				t.Fatalf("SET_MEM_TABLE: %v", err)
			}
			r, err := q.Reap(ctx, 0)
			mustOK(t, "the flush that was in flight", r, err)
			w, err := q.Write(ctx, 4, pattern(5, 1024))
			mustOK(t, "write after the new table", w, err)
			if !bytes.Equal(d.bytes(4*512, 1024), pattern(5, 1024)) {
				t.Error("the write after SET_MEM_TABLE did not reach the disk")
			}
		})
	}
}

// GET_VRING_BASE sent while a request is executing replies only after it
// completed and was published, with a base that counts every request.
func TestGetVringBaseWaitsForRequestsInFlight(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			stopping := waitingAt(t, "stop")
			d := newParkDisk(true)
			f, q := serveParkDisk(t, d, k.packed)
			ctx := context.Background()
			flushHead := parkFlush(t, q, d)
			for i := range 2 {
				r, err := q.Read(ctx, uint64(i), 512)
				mustOK(t, "read", r, err)
			}
			type result struct {
				base uint32
				err  error
			}
			replied := make(chan result, 1)
			go func() {
				b, err := f.GetVringBase(0)
				replied <- result{b, err}
			}()
			<-stopping
			close(d.flushGo)
			res := <-replied
			if res.err != nil {
				t.Fatalf("GET_VRING_BASE: %v", res.err)
			}
			r, err := q.Reap(ctx, 0)
			mustOK(t, "the flush that was in flight", r, err)
			if r.Head != flushHead {
				t.Errorf("flush completed with head %d, want %d", r.Head, flushHead)
			}
			if k.packed {
				// Both positions and wrap counters agree: nothing in flight.
				if avail, used := uint16(res.base), uint16(res.base>>16); avail != used || avail&0x7fff != 8 {
					t.Errorf("packed base %#x: avail half %#x, used half %#x, want both at slot 8 (2+3+3 descriptors)", res.base, avail, used)
				}
			} else if res.base != 3 || q.UsedIdx() != 3 {
				t.Errorf("base %d, used.idx %d after the drain, want 3 and 3", res.base, q.UsedIdx())
			}
		})
	}
}

// Monitor.Quiesce called while a request is executing waits for it, and
// its callback sees the request's completion already published.
func TestQuiesceWaitsForAParkedRequestAndSeesItPublished(t *testing.T) {
	draining := waitingAt(t, "drain")
	d := newParkDisk(true)
	mon := new(vhostuser.Monitor)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1, Monitor: mon})
	f := s.connect(t, parallelSetup(false))
	q := f.Queues[0]
	parkFlush(t, q, d)
	seen := make(chan uint16, 1)
	go func() {
		_ = mon.Quiesce(func() error {
			seen <- q.UsedIdx()
			return nil
		})
	}()
	<-draining
	close(d.flushGo)
	if idx := <-seen; idx != 1 {
		t.Errorf("used.idx %d inside Quiesce, want 1: the parked flush was not published first", idx)
	}
	r, err := q.Reap(context.Background(), 0)
	mustOK(t, "the flush", r, err)
}

// With every executor of a queue parked in the disk, a further write waits
// for the first one to come back, while reads (run by the ring owner) still
// complete; nothing is lost or completed twice.
func TestWritesBeyondTheExecutorLimitWaitForAFreeExecutor(t *testing.T) {
	const parked = vhostuser.MaxExecutors
	d := newParkDisk(false)
	for i := range parked {
		d.writeGo[int64(8*i*512)] = make(chan struct{})
	}
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
	o := parallelSetup(false)
	o.QueueSize, o.MaxInflight = 128, parked+2 // 3 descriptors a request
	f := s.connect(t, o)
	q := f.Queues[0]
	ctx := context.Background()
	heads := map[uint16]int{}
	for i := range parked {
		h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: uint64(8 * i), Data: pattern(byte(i+1), 512)})
		if err != nil {
			t.Fatal(err)
		}
		heads[h] = i
	}
	for range parked {
		awaitParked(t, d, "write")
	}
	extra, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 500, Data: pattern(99, 512)})
	if err != nil {
		t.Fatal(err)
	}
	r, err := q.Read(ctx, 600, 512)
	mustOK(t, "read while every executor is parked", r, err)
	close(d.writeGo[0])
	seen := map[uint16]bool{}
	for range 2 {
		r, err := q.Reap(ctx, 0)
		mustOK(t, "write", r, err)
		if r.Head != extra && heads[r.Head] != 0 {
			t.Fatalf("head %d completed while its write is parked", r.Head)
		}
		seen[r.Head] = true
	}
	if !seen[extra] || !bytes.Equal(d.bytes(500*512, 512), pattern(99, 512)) {
		t.Fatal("the write beyond the limit did not run once an executor was free")
	}
	for i := 1; i < parked; i++ {
		close(d.writeGo[int64(8*i*512)])
	}
	for range parked - 1 {
		r, err := q.Reap(ctx, 0)
		mustOK(t, "write", r, err)
		if seen[r.Head] {
			t.Fatalf("head %d completed twice", r.Head)
		}
		seen[r.Head] = true
	}
}

// SET_VRING_CALL (and any control message that does not touch what
// requests use) is answered while a request is executing: no session lock
// is held across I/O.
func TestSetVringCallIsAnsweredWhileARequestExecutes(t *testing.T) {
	d := newParkDisk(true)
	f, q := serveParkDisk(t, d, false)
	parkFlush(t, q, d)
	// The same call fd again: the reply (REPLY_ACK) comes while the flush
	// is parked, or this test hangs.
	if err := f.SetVringFD(vhostuser.ReqSetVringCall, 0, q.CallFD()); err != nil {
		t.Fatalf("SET_VRING_CALL: %v", err)
	}
	if _, err := f.GetConfig(0, 8); err != nil {
		t.Fatalf("GET_CONFIG: %v", err)
	}
	close(d.flushGo)
	r, err := q.Reap(context.Background(), 0)
	mustOK(t, "the flush", r, err)
}

// A request that completes exactly while a ring stop holds the queue's lock
// to count what is still in flight finds the lock taken and leaves its
// publication to the holder; the stop must publish it (and then see every
// request back) instead of waiting forever for a request nobody will
// return. The hooks make the two meet: the parked FLUSH is released inside
// the stop's look, which goes on only once the completion has found the
// lock held.
func TestRingStopPublishesACompletionThatArrivedWhileItLooked(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			d := newParkDisk(true)
			left := make(chan struct{})
			var released, leftOnce sync.Once
			// Installed before the server starts (the hook is a plain
			// variable its goroutines read).
			t.Cleanup(vhostuser.SetWaitHook(func(what string) {
				switch what {
				case "stop-check":
					released.Do(func() {
						close(d.flushGo)
						<-left
					})
				case "left":
					leftOnce.Do(func() { close(left) })
				}
			}))
			f, q := serveParkDisk(t, d, k.packed)
			flushHead := parkFlush(t, q, d)
			replied := make(chan error, 1)
			go func() {
				_, err := f.GetVringBase(0)
				replied <- err
			}()
			select {
			case err := <-replied:
				if err != nil {
					t.Fatalf("GET_VRING_BASE: %v", err)
				}
			case <-time.After(time.Minute):
				t.Fatal("GET_VRING_BASE never replied: the completion left to the ring stop was never published")
			}
			r, err := q.Reap(context.Background(), 0)
			mustOK(t, "the flush that completed during the stop", r, err)
			if r.Head != flushHead {
				t.Errorf("flush completed with head %d, want %d", r.Head, flushHead)
			}
		})
	}
}
