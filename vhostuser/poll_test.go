package vhostuser_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// TestRequestPublishedWhileTheOwnerPollsIsFoundByPolling: with a poll
// window, a ring's owner that found the ring empty keeps looking instead
// of sleeping until a kick. The request is published from inside the poll
// loop (the "poll" hook runs just before each look), so it must be the
// poll that finds it, whatever the kick does.
func TestRequestPublishedWhileTheOwnerPollsIsFoundByPolling(t *testing.T) {
	for _, packed := range []bool{false, true} {
		name := "split"
		if packed {
			name = "packed"
		}
		t.Run(name, func(t *testing.T) {
			var (
				armed, published atomic.Bool
				submitted        = make(chan error, 1)
				once, foundOnce  sync.Once
				found            = make(chan struct{})
				q                *frontend.Queue
				fill             = pattern(9, 4096)
			)
			// Installed before the server starts (a plain variable its
			// goroutines read). Once armed, the hook owns q: the test
			// touches it again only after the submission is reported.
			t.Cleanup(vhostuser.SetWaitHook(func(what string) {
				switch what {
				case "poll":
					if armed.Load() {
						once.Do(func() {
							_, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: 64, Data: fill})
							published.Store(err == nil)
							submitted <- err
						})
					}
				case "poll-found":
					if published.Load() {
						foundOnce.Do(func() { close(found) })
					}
				}
			}))
			s := startServerOpts(t, vhostuser.Options{NumQueues: 1, PollWindow: vhostuser.MaxPollWindow})
			f := s.connect(t, frontend.Options{Packed: packed})
			q = f.Queues[0]
			// The first request starts the owner; after it the ring is
			// empty and the owner polls.
			r, err := q.Read(context.Background(), 0, 512)
			mustOK(t, "first read", r, err)
			armed.Store(true)
			// If the window ran out before the hook was armed the owner
			// sleeps: a kick wakes it and starts another window. (Only the
			// eventfd is written here; the hook may be using q.)
			q.Kick()
			select {
			case err := <-submitted:
				if err != nil {
					t.Fatalf("submit from the poll hook: %v", err)
				}
			case <-time.After(time.Minute):
				t.Fatal("the owner never polled after the ring ran empty")
			}
			r, err = q.Reap(context.Background(), 0)
			mustOK(t, "the write published while the owner polled", r, err)
			// The owner reports what its poll found after the batch that
			// ran (and may have published) the write: wait for the report.
			select {
			case <-found:
			case <-time.After(10 * time.Second):
				t.Fatal("the write published inside the poll loop was not found by the poll")
			}
			if got := s.disk.bytes(64*512, 4096); string(got) != string(fill) {
				t.Error("the write published while polling did not reach the disk")
			}
		})
	}
}

// TestPollWindowOutOfRangeIsRefused: the window is bounded (a longer one
// only burns a core after the guest went quiet).
func TestPollWindowOutOfRangeIsRefused(t *testing.T) {
	for _, w := range []int64{-1, int64(vhostuser.MaxPollWindow) + 1} {
		ln, err := vhostuser.Listen(t.TempDir() + "/s.sock")
		if err != nil {
			t.Fatal(err)
		}
		err = vhostuser.Serve(context.Background(), ln, vhostuser.Options{Disk: newMemDisk(testDiskSize), PollWindow: time.Duration(w)})
		if !errors.Is(err, vhostuser.ErrInvalidOptions) {
			t.Errorf("PollWindow %v: Serve = %v, want ErrInvalidOptions", time.Duration(w), err)
		}
	}
}

// hookLog records the wait hook's calls in order, for tests that look at
// what a ring's owner did between two points.
type hookLog struct {
	mu     sync.Mutex
	events []string
}

func (l *hookLog) add(what string) {
	l.mu.Lock()
	l.events = append(l.events, what)
	l.mu.Unlock()
}

// mark is the index the next event will have.
func (l *hookLog) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.events)
}

// since returns the events from index from on.
func (l *hookLog) since(from int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.events[from:]...)
}

// awaitFrom waits until an event what has an index ≥ from.
func (l *hookLog) awaitFrom(t *testing.T, from int, what string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		for _, e := range l.since(from) {
			if e == what {
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
	evs := l.since(0)
	t.Fatalf("no %q from event %d on; the last events: %v", what, from, evs[max(0, len(evs)-20):])
}

// TestOwnerSleepsInsteadOfPollingWhileARequestWaitsForTheDisk: a poll
// window only pays when the guest's next request may come at any moment.
// While a request of the queue is at an executor (here a FLUSH parked in
// the disk) the next one mostly waits for that completion, so a ring's
// owner that runs the ring empty then goes to sleep until a kick without
// polling, also when a kick wakes it meanwhile. Once the flush is back it
// polls again.
func TestOwnerSleepsInsteadOfPollingWhileARequestWaitsForTheDisk(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			var log hookLog
			t.Cleanup(vhostuser.SetWaitHook(log.add))
			d := newParkDisk(true)
			// The longest window: an owner that polled after the flush went
			// to its executor would still be polling when the flush parks.
			s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1, PollWindow: vhostuser.MaxPollWindow})
			release := sync.OnceFunc(func() { close(d.flushGo) })
			t.Cleanup(release) // a failed check must not leave the flush parked
			f := s.connect(t, parallelSetup(k.packed))
			q := f.Queues[0]
			head := parkFlush(t, q, d)
			parked := log.mark()
			// Whether or not the owner slept already, a kick makes it run
			// the (empty) ring again and decide again: a sleep comes after
			// the mark taken before the kick.
			kicked := log.mark()
			q.Kick()
			log.awaitFrom(t, kicked, "sleep")
			for i, e := range log.since(parked) {
				if e == "poll" {
					t.Fatalf("the owner polled (event %d after the flush parked: %v) while the flush was in the disk", i, log.since(parked))
				}
			}
			release()
			r, err := q.Reap(context.Background(), 0)
			mustOK(t, "the flush", r, err)
			if r.Head != head {
				t.Fatalf("reaped head %d, want the flush's %d", r.Head, head)
			}
			// Nothing at an executor: a read's owner polls after it again.
			back := log.mark()
			r, err = q.Read(context.Background(), 0, 512)
			mustOK(t, "a read after the flush", r, err)
			log.awaitFrom(t, back, "poll")
		})
	}
}
