package vhostuser

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// batchSize bounds how many chains a worker completes per hold of the
// dispatch read lock, so a control message that needs the write lock
// (SET_MEM_TABLE) waits for at most one batch.
const batchSize = 64

// worker drains one started ring. It owns its blk.Handler; nothing on the
// data path is shared with other queues.
type worker struct {
	s      *session
	r      *ring
	kick   *os.File
	stop   chan struct{} // closed by stopAndWait
	done   chan struct{} // closed when run returns
	broken atomic.Bool   // a ring-level error was reported; no more work
}

func startWorker(s *session, r *ring, kick *os.File) *worker {
	w := &worker{s: s, r: r, kick: kick, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

// stopAndWait stops the worker and waits for it: a drain in progress
// completes its batch, so every request popped from the ring has been
// pushed to the used ring before this returns (GET_VRING_BASE drain rule,
// vhost-user.md §1.7).
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

func (w *worker) run() {
	defer close(w.done)
	// A SIGBUS from a front-end that truncated its memfd becomes a
	// recoverable panic in this goroutine instead of killing the daemon
	// (style.md §10.4 item 6).
	debug.SetPanicOnFault(true)
	h := blk.NewHandler(w.s.opts.Disk, w.s.opts.Blk)
	h.SetStop(w.stop) // a request held for host space ends when the ring stops
	h.CountInto(w.s.opts.Stats.Queue(w.r.index))
	var chain virtqueue.Chain
	var buf [8]byte
	for {
		// The ring is processed when it starts, without waiting for a
		// first kick (vhost-user.md §1.6), and after every kick.
		for !w.stopping() && w.batch(h, &chain) {
		}
		if w.stopping() {
			return
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

// batch processes up to batchSize chains under the dispatch read lock and
// reports whether more may be pending.
func (w *worker) batch(h *blk.Handler, c *virtqueue.Chain) bool {
	s := w.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	// Stopped or disabled rings are not touched (spec "Ring states"): a
	// disabled blk ring has no side-effect-free way to process requests.
	if w.broken.Load() || !w.r.enabled.Load() || w.r.q == nil {
		return false
	}
	more, err := w.process(w.r.q, h, c)
	if err != nil {
		w.failLocked(err)
		return false
	}
	return more
}

// process is the drain loop of VIRTIO 1.2 §2.7.10 with notification
// suppression: disable kicks, pop and complete chains, re-enable kicks and
// look once more so a chain published in between is not missed.
func (w *worker) process(q virtqueue.Queue, h *blk.Handler, c *virtqueue.Chain) (more bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			fe := faultError(r)
			if fe == nil {
				panic(r)
			}
			err = fe
		}
	}()
	lg := w.s.logging // nil unless dirty logging is on (dirtylog.go)
	q.DisableNotifications()
	n := 0
	// Each pass either completes a chain or re-arms notifications; a
	// ring that keeps reporting "work arrived" without yielding chains is
	// cut off by the bound rather than spinning.
	for pass := 0; n < batchSize && pass < 2*batchSize+2; pass++ {
		ok, err := q.Next(c)
		if err != nil {
			return false, err
		}
		if !ok {
			again, err := q.EnableNotifications()
			if err != nil {
				return false, err
			}
			if !again {
				break
			}
			q.DisableNotifications()
			continue
		}
		var written uint32
		if c.Err != nil {
			// A malformed chain is completed with length 0 so the head is
			// not leaked (CH #8401); the queue goes on.
			w.s.ev.RequestFailed(w.s.id, w.r.index, c.Err)
		} else {
			written = h.Handle(c.Readable, c.Writable)
			if errors.Is(h.Err(), blk.ErrStopped) {
				// Held for host space while the ring stopped: not
				// completed, it stays in flight (blk/nospace.go).
				break
			}
			if herr := h.Err(); herr != nil {
				w.s.ev.RequestFailed(w.s.id, w.r.index, herr)
			}
			if lg != nil {
				w.logChain(lg, c)
			}
		}
		if err := q.PushUsed(c.Head, written); err != nil {
			return false, err
		}
		n++
	}
	if lg != nil {
		_, packed := q.(*virtqueue.PackedQueue)
		w.logRing(lg, packed)
	}
	if n > 0 && q.NeedsNotification() {
		w.signal(w.r.callFD)
	}
	return n == batchSize, nil
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
