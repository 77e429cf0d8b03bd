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
