package vhostuser

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// batchSize bounds how many chains the ring owner pops per hold of the
// dispatch read lock, so a control message that needs the write lock waits
// for at most one batch of pops (never for a request's I/O).
const batchSize = 64

// maxInflight bounds the requests of one queue in flight at once. QEMU's
// default queue size is 256 and Linux keeps up to that many requests per
// queue in flight; 64 keep a disk's queue full while bounding the
// descriptor-chain buffers a queue holds.
const maxInflight = 64

// maxExecutors bounds the goroutines of one queue running requests the
// owner does not run inline: FLUSHes, allocating writes, and reads whose
// data must come from the disk (blk coldread.go). Every blocked one holds
// an OS thread. Parallel writes to one file mostly queue on the kernel's
// inode lock, but cold reads are as fast as the disk's queue is deep: 32,
// the depth a guest's queue typically keeps, let a cold QD32 random read
// load reach the disk all at once (16 held it to about 20 k reads/s here
// where qemu-storage-daemon's 64 threads reached 33–39 k), while staying
// below maxInflight so writes beyond the limit still wait for a free one.
const maxExecutors = 32

// request is one chain taken from the ring, from Next until its completion
// is published. Its Chain buffers are reused by the next request that takes
// the slot, so after warm-up popping a chain allocates nothing.
type request struct {
	chain   virtqueue.Chain
	written uint32
	fault   error // a memory fault while executing: the queue breaks
	held    bool  // held for host space until the ring stopped: never completed
	cold    bool  // a read the owner left to an executor: its data is on the disk
}

// worker drives one started ring. See the package doc, "Workers and
// locking", for who touches what.
//
// The ring owner (run) pops chains and hands them to executor goroutines,
// each of which owns a blk.Handler. A completion is appended to done and
// published by whoever holds qmu next (flat combining): the executor
// itself if qmu is free, else the holder before it lets go, so completions
// that arrive together reach the used ring under one index store and one
// call notification.
type worker struct {
	s      *session
	r      *ring
	kick   *os.File
	stop   chan struct{} // closed by stopAndWait
	done   chan struct{} // closed when run returns
	broken atomic.Bool   // a ring-level error was reported; no more work
	popped uint64        // chains popped so far; the owner's own (pollRing)

	// qmu serialises every call on r.q (virtqueue.Queue is not safe for
	// concurrent use) and guards free. Lock order: session.mu (read),
	// then qmu, then doneMu.
	qmu  sync.Mutex
	free []*request // +checklocks:qmu; requests not in flight
	// spare is the publisher's second done list (swapped with completed).
	spare []*request // +checklocks:qmu

	doneMu    sync.Mutex
	completed []*request   // +checklocks:doneMu; completed, not yet published
	pending   atomic.Int32 // len(completed), readable without doneMu

	local  []*request    // reads popped in this batch, run by the owner; owner only
	h      *blk.Handler  // the owner's handler, for local; owner only
	todo   chan *request // to executors; capacity = requests, never blocks
	freed  chan struct{} // capacity 1: a publish returned requests to free
	nreq   int           // requests allocated (min(maxInflight, queue size))
	execs  int           // executors started; owner only
	idle   atomic.Int32  // executors committed to receive from todo, not yet claimed
	execWG sync.WaitGroup
}

func startWorker(s *session, r *ring, kick *os.File) *worker {
	n := min(maxInflight, int(r.num))
	w := &worker{
		s: s, r: r, kick: kick,
		stop: make(chan struct{}), done: make(chan struct{}),
		free: make([]*request, 0, n), spare: make([]*request, 0, n),
		completed: make([]*request, 0, n), local: make([]*request, 0, n),
		todo: make(chan *request, n), freed: make(chan struct{}, 1),
		nreq: n,
	}
	for range n {
		w.free = append(w.free, &request{})
	}
	go w.run()
	return w
}

// stopAndWait stops the worker and waits for it: the owner pops no more
// chains, and returns only after every request it popped has completed and
// been published to the used ring (GET_VRING_BASE drain rule,
// vhost-user.md §1.7), and its executors have exited.
func (w *worker) stopAndWait() {
	close(w.stop)
	w.kick.Close() // unblocks a parked Read with os.ErrClosed
	<-w.done
}

// wake makes the worker look at the ring, as a guest kick would. Writing
// our own kick eventfd is what libvhost-user does after recovery; the
// front-end may write it too (vhost-user.md §1.6).
//
// The write is a single non-blocking write(2), not os.File.Write, which
// parks until the fd is writable: a kick fd the worker no longer reads
// (a broken ring, or a full pipe posing as an eventfd) would otherwise
// wedge the control goroutine. EAGAIN means a wake-up is already pending;
// any other failure leaves a ring that cannot be kicked anyway.
func (w *worker) wake() {
	var one [8]byte
	le.PutUint64(one[:], 1)
	rc, err := w.kick.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Write(func(fd uintptr) bool {
		_, _ = unix.Write(int(fd), one[:])
		return true // never wait for writability
	})
}

func (w *worker) stopping() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

// popState is what one pass of the owner over the ring found.
type popState int

const (
	popIdle   popState = iota // ring empty (or not to be touched): wait for a kick
	popMore                   // batch full: look again at once
	popFull                   // every request is in flight: wait for one to finish
	popPaused                 // a drain holds new requests off: wait for resume
	popSerial                 // recovery: wait until every request is back
)

func (w *worker) run() {
	defer close(w.done)
	// A SIGBUS from a front-end that truncated its memfd becomes a
	// recoverable panic in this goroutine instead of killing the daemon
	// (style.md §10.4 item 6).
	debug.SetPanicOnFault(true)
	w.h = blk.NewHandler(w.s.opts.Disk, w.s.opts.Blk)
	w.h.SetStop(w.stop) // a request held for host space ends when the ring stops
	w.h.CountInto(w.s.opts.Stats.Queue(w.r.index))
	defer w.finish()
	var buf [8]byte
	for {
		// The ring is processed when it starts, without waiting for a
		// first kick (vhost-user.md §1.6), and after every kick.
		for !w.stopping() {
			st := w.batch()
			if st == popIdle {
				break
			}
			switch st {
			case popFull:
				select {
				case <-w.freed:
				case <-w.stop:
				}
			case popSerial:
				w.awaitAllBack(w.stop)
			case popPaused:
				if ch := w.s.reqs.reopened(); ch != nil {
					select {
					case <-ch:
					case <-w.stop:
					}
				}
			}
		}
		if w.stopping() {
			return
		}
		if w.pollRing() {
			continue
		}
		if waitHook != nil {
			waitHook("sleep")
		}
		n, err := w.kick.Read(buf[:])
		if err == nil && n > 0 {
			continue
		}
		if errors.Is(err, os.ErrClosed) || w.stopping() {
			return
		}
		// The kick fd can never deliver a kick (not an eventfd, EOF):
		// retrying would spin. Report, then idle until stopped.
		w.fail(fmt.Errorf("kick fd read (%d bytes): %v: %w", n, err, ErrInvalidMessage))
		<-w.stop
		return
	}
}

// pollRing is adaptive polling: after the ring was found empty, the owner
// keeps looking for up to Options.PollWindow before it sleeps until a
// kick, and reports whether it found work. A sleeping owner costs a
// thread wake-up per kick, and on a virtual machine whose idle vCPUs halt
// that wake-up is an interrupt through the hypervisor: about 20 µs here,
// two per QD1 request with the front-end's own (docs/benchmarks/profile.md,
// "adaptive polling"). Bounded: one window per sleep avoided, and the
// window ends at stop. A kick that arrives while it polls is left in the
// eventfd and costs one read that does not sleep. Work found ends the
// window: the owner's loop runs the ring dry again and a new window starts.
//
// No window opens while a request of the queue is at an executor (a read
// from the disk, a flush, an allocation): the guest's next request then
// mostly waits for that one's completion, which takes the disk's time, so
// the window would burn the core for nothing, and the wake-up it saves is
// small beside the disk's latency. On a cold-read run (4K randread QD32,
// data off the disk) the back-end's CPU per request went from 24.3 to
// 20.8 µs without those windows (docs/benchmarks/profile.md).
func (w *worker) pollRing() bool {
	win := w.s.opts.PollWindow
	if win <= 0 || w.atExecutors() > 0 {
		return false
	}
	deadline := time.Now().Add(win)
	for !w.stopping() {
		if waitHook != nil {
			waitHook("poll") // before the look: what it publishes is seen
		}
		before := w.popped
		if w.batch() != popIdle || w.popped != before {
			if waitHook != nil {
				waitHook("poll-found")
			}
			return true
		}
		if !time.Now().Before(deadline) {
			return false
		}
	}
	return false
}

// finish waits until every request is back (completed and published),
// then ends the executors.
func (w *worker) finish() {
	w.awaitAllBack(nil)
	close(w.todo)
	w.execWG.Wait()
}

// awaitAllBack waits until no request of the queue is in flight, or until
// stop is closed (nil: no way out).
func (w *worker) awaitAllBack(stop chan struct{}) {
	for {
		// qmu is released through unlockQ like everywhere else: a
		// completion that found qmu held here left its publication to us,
		// and a plain Unlock would strand it (and this wait with it:
		// nothing else would ever return that request to free).
		w.s.mu.RLock()
		w.qmu.Lock()
		back := len(w.free) == w.nreq
		if !back && waitHook != nil {
			waitHook("stop-check") // qmu held: a completion now leaves its publication to us
		}
		w.unlockQ()
		w.s.mu.RUnlock()
		if back {
			return
		}
		if stop == nil && waitHook != nil {
			waitHook("stop")
		}
		select {
		case <-w.freed:
		case <-stop:
			return
		}
	}
}

// batch pops up to batchSize chains under the dispatch read lock and hands
// them to executors.
func (w *worker) batch() popState {
	st := w.popBatch()
	// Quick requests (reads, overwrites: blk.Quick) popped in this batch
	// run here, with no lock held, and are published in runs of
	// quickRun (one used index store, at most one notification each).
	if len(w.local) > 0 {
		for start := 0; start < len(w.local); start += quickRun {
			run := w.local[start:min(start+quickRun, len(w.local))]
			done := run[:0]
			for _, req := range run {
				if w.tryHandle(req) {
					done = append(done, req)
				} else {
					// Its data must come from the disk: an executor
					// waits for it, the owner goes on (blk coldread.go).
					req.cold = true
					w.dispatch(req)
				}
			}
			w.complete(done...)
		}
		clear(w.local)
		w.local = w.local[:0]
	}
	return st
}

// quickRun is how many quick requests the owner runs before it publishes
// them. Publishing a whole batch at its end left the front-end idle while
// the owner worked through it and the owner idle while the front-end
// refilled the ring; runs let the front-end reap and refill while the
// owner goes on (docs/benchmarks/profile.md, "Publishing quick requests in
// runs"). A run that needs no notification (EVENT_IDX: the driver is
// still reaping) costs one used index store. 16 measured best of 4, 8
// and 16 at QD32: shorter runs wake the front-end more often for little.
const quickRun = 16

// popBatch pops under the dispatch read lock and qmu.
func (w *worker) popBatch() popState {
	s := w.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	// Stopped or disabled rings are not touched (spec "Ring states"): a
	// disabled blk ring has no side-effect-free way to process requests.
	if w.broken.Load() || !w.r.enabled.Load() || w.r.q == nil {
		return popIdle
	}
	w.qmu.Lock()
	st, err := w.pop(w.r.q)
	w.unlockQ()
	if err != nil {
		w.failLocked(err)
		return popIdle
	}
	return st
}

// pop is the drain loop of VIRTIO 1.2 §2.7.10 with notification
// suppression: disable kicks, pop chains, re-enable kicks and look once
// more so a chain published in between is not missed. Preconditions: mu
// held for reading, qmu held.
func (w *worker) pop(q virtqueue.Queue) (st popState, err error) {
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			st, err = popIdle, fe
		}
	}()
	q.DisableNotifications()
	n := 0
	// Each pass either pops a chain or re-arms notifications; a ring that
	// keeps reporting "work arrived" without yielding chains is cut off
	// by the bound rather than spinning.
	for pass := 0; n < batchSize && pass < 2*batchSize+2; pass++ {
		if len(w.free) == 0 {
			// Kicks stay disabled: the ring is looked at again as soon
			// as a request finishes.
			return popFull, nil
		}
		// Requests recovered from the inflight region are redone one at a
		// time in the order the dead back-end popped them, and before any
		// new request (package doc, "Inflight tracking"): the guest may
		// have had overlapping writes in flight, and their last state on
		// the disk must be the one the last pop would have left.
		resubmit := q.Resubmits() > 0
		if resubmit && len(w.free) < w.nreq {
			return popSerial, nil
		}
		if !w.s.reqs.admit() {
			return popPaused, nil
		}
		req := w.free[len(w.free)-1]
		ok, err := q.Next(&req.chain)
		if err != nil || !ok {
			w.s.reqs.leave(1)
		}
		if err != nil {
			return popIdle, err
		}
		if !ok {
			again, err := q.EnableNotifications()
			if err != nil {
				return popIdle, err
			}
			if !again {
				return popIdle, nil
			}
			q.DisableNotifications()
			continue
		}
		w.free = w.free[:len(w.free)-1]
		n++
		w.popped++
		req.written, req.fault, req.held, req.cold = 0, nil, false, false
		if req.chain.Err != nil {
			// A malformed chain is completed with length 0 so the head is
			// not leaked (CH #8401); the queue goes on.
			w.s.ev.RequestFailed(w.s.id, w.r.index, req.chain.Err)
			w.addDone(req)
			continue
		}
		if !resubmit && blk.Quick(w.s.opts.Disk, w.s.opts.Blk, req.chain.Readable) {
			// A read, or an overwrite of allocated blocks in write-back
			// mode, never waits for an allocation or a sync: the owner
			// runs it after this batch (batch), saving two goroutine
			// switches per request; everything else gets an executor.
			w.local = append(w.local, req) // capacity nreq
			continue
		}
		w.dispatch(req)
		if resubmit {
			return popSerial, nil
		}
	}
	return popMore, nil
}

// atExecutors is the number of requests handed to executors and not yet
// back from them: each started executor is either committed in idle, or busy
// with one, and idle owes one for each request waiting in todo (dispatch),
// so execs − idle counts the busy ones and the waiting requests. Only the
// owner calls it (execs is the owner's), never inside dispatch.
func (w *worker) atExecutors() int32 {
	return int32(w.execs) - w.idle.Load()
}

// dispatch hands req to an executor. Only the owner calls it.
func (w *worker) dispatch(req *request) {
	// While executors can still be started, every request sent has one
	// committed to receive it (idle), so none sits in todo behind
	// executors parked in the disk. At the limit a request takes the next
	// executor to come back (idle goes negative: a debt its commit pays).
	if w.idle.Add(-1) < 0 && w.execs < maxExecutors {
		w.idle.Add(1)
		w.execs++
		w.execWG.Add(1)
		go w.exec()
	}
	w.todo <- req // capacity nreq: never blocks
}

// exec runs requests until the owner closes todo. Each executor owns one
// blk.Handler (not safe for concurrent use); they count into the queue's
// statistics with atomics.
func (w *worker) exec() {
	defer w.execWG.Done()
	debug.SetPanicOnFault(true)
	h := blk.NewHandler(w.s.opts.Disk, w.s.opts.Blk)
	h.SetStop(w.stop)
	h.CountInto(w.s.opts.Stats.Queue(w.r.index))
	for {
		req, ok := <-w.todo
		if !ok {
			return
		}
		w.handle(h, req)
		// Committed to take the next request before req's slot can be
		// seen free: with every executor started, a free slot thus
		// always finds one in idle.
		w.idle.Add(1)
		w.complete(req)
	}
}

// handle executes req with no session lock held: guest memory stays mapped
// because the gate counts req until its completion is published.
func (w *worker) handle(h *blk.Handler, req *request) {
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			req.written, req.fault = 0, fe
		}
	}()
	if req.cold {
		req.written = h.HandleCold(req.chain.Readable, req.chain.Writable)
	} else {
		req.written = h.Handle(req.chain.Readable, req.chain.Writable)
	}
	w.noteResult(h, req)
}

// tryHandle is handle for the owner's quick requests: false when req is a
// read whose data is not in memory, left undone for an executor
// (blk.Handler.TryHandle).
func (w *worker) tryHandle(req *request) (done bool) {
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			req.written, req.fault, done = 0, fe, true
		}
	}()
	req.written, done = w.h.TryHandle(req.chain.Readable, req.chain.Writable)
	if done {
		w.noteResult(w.h, req)
	}
	return done
}

// noteResult records what h's last request left to do besides its
// completion: a hold for host space, an error to report.
func (w *worker) noteResult(h *blk.Handler, req *request) {
	if errors.Is(h.Err(), blk.ErrStopped) {
		// Held for host space while the ring stopped: not completed, it
		// stays in flight for the next back-end (blk/nospace.go).
		req.held = true
		return
	}
	if herr := h.Err(); herr != nil {
		w.s.ev.RequestFailed(w.s.id, w.r.index, herr)
	}
}

// complete queues the completions of reqs (one request from an executor,
// or a run of quick ones from the owner) and publishes them, with any
// others waiting, unless another goroutine holds qmu: that one publishes
// them before letting go (unlockQ).
func (w *worker) complete(reqs ...*request) {
	w.addDone(reqs...)
	w.s.mu.RLock()
	if w.qmu.TryLock() {
		w.unlockQ()
	} else if waitHook != nil {
		waitHook("left") // the holder of qmu publishes them
	}
	w.s.mu.RUnlock()
}

// addDone queues completions for the next publishLocked.
func (w *worker) addDone(reqs ...*request) {
	if len(reqs) == 0 {
		return
	}
	w.doneMu.Lock()
	w.completed = append(w.completed, reqs...) // capacity nreq
	w.doneMu.Unlock()
	w.pending.Add(int32(len(reqs)))
}

// unlockQ publishes the completions waiting in completed and releases qmu. A
// completion added after the publish but before the release found qmu
// held and left its publication to us: pending is non-zero then, and we
// take qmu again, unless someone else already has it (who will publish).
// Preconditions: mu held for reading, qmu held.
func (w *worker) unlockQ() {
	for {
		w.publishLocked()
		w.qmu.Unlock()
		if w.pending.Load() == 0 || !w.qmu.TryLock() {
			return
		}
	}
}

// publishLocked moves every completed request to the used ring with one
// index store and at most one call notification, returns the requests to
// free and uncounts them at the gate. Preconditions: mu held for reading,
// qmu held.
func (w *worker) publishLocked() {
	w.doneMu.Lock()
	batch := w.completed
	w.completed = w.spare[:0]
	w.doneMu.Unlock()
	if len(batch) == 0 {
		w.spare = batch
		return
	}
	w.pending.Add(-int32(len(batch)))
	w.pushUsed(batch)
	for i, req := range batch {
		w.free = append(w.free, req)
		batch[i] = nil
	}
	w.spare = batch[:0]
	w.s.reqs.leave(len(batch))
	select {
	case w.freed <- struct{}{}:
	default:
	}
}

// pushUsed writes the used entries of batch and publishes them. A queue
// that is broken, or breaks now, takes no more entries; the requests are
// still returned (the ring is dead until the front-end resets it).
// Preconditions: mu held for reading, qmu held.
func (w *worker) pushUsed(batch []*request) {
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			w.failLocked(fe)
		}
	}()
	q := w.r.q
	lg := w.s.logging // nil unless dirty logging is on (dirtylog.go)
	n := 0
	for _, req := range batch {
		if req.fault != nil {
			w.failLocked(req.fault)
		}
		if w.broken.Load() || q == nil || req.held {
			continue
		}
		if lg != nil && req.chain.Err == nil {
			w.logChain(lg, &req.chain)
		}
		if err := q.AddUsed(req.chain.Head, req.written); err != nil {
			w.failLocked(err)
			continue
		}
		n++
	}
	if n == 0 {
		return
	}
	q.Publish()
	if lg != nil {
		_, packed := q.(*virtqueue.PackedQueue)
		w.logRing(lg, packed)
	}
	if q.NeedsNotification() {
		w.signal(w.r.callFD)
	}
}

// signal writes an eventfd. Preconditions: mu held (read or write) so the
// fd is not closed underneath.
func (w *worker) signal(fd int) {
	if fd < 0 {
		return
	}
	var one [8]byte
	le.PutUint64(one[:], 1)
	_, _ = unix.Write(fd, one[:])
}

// fail marks the queue broken, once.
func (w *worker) fail(err error) {
	w.s.mu.RLock()
	defer w.s.mu.RUnlock()
	w.failLocked(err)
}

// failLocked marks the queue broken and reports it once; the front-end
// learns through SET_VRING_ERR's eventfd (spec "SET_VRING_ERR").
// Preconditions: mu held for reading.
func (w *worker) failLocked(err error) {
	if w.broken.Swap(true) {
		return
	}
	w.s.ev.QueueBroken(w.s.id, w.r.index, err)
	w.signal(w.r.errFD)
}

// faultError turns a recovered memory-fault panic (SetPanicOnFault) into an
// error, and returns nil for any other panic value, which must be
// re-raised: only faults are expected from guest memory.
func faultError(r any) error {
	re, ok := r.(runtime.Error)
	if !ok {
		return nil
	}
	a, ok := re.(interface{ Addr() uintptr })
	if !ok {
		return nil
	}
	return fmt.Errorf("memory fault at %#x: %v: %w", a.Addr(), re, ErrGuestMemory)
}

// guardFault runs f with memory faults turned into errors, for control-path
// code that touches guest memory.
func guardFault(f func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			err = fe
		}
	}()
	return f()
}
