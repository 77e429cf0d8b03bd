package virtqueue_test

import (
	"errors"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// racingDevice is the device side of a driver/device race test: a goroutine
// that serves chains from a queue while the test's goroutine plays the
// driver on the same ring.
type racingDevice struct {
	done     <-chan error
	finished bool // done has delivered a nil error
}

// startRacingDevice serves total chains from q in a goroutine: it writes
// {n, 1, 2, 3} into each chain's first writable buffer and completes it
// with length 4, asking for notifications again whenever the ring is
// empty. A ring or chain error ends it early.
func startRacingDevice(q virtqueue.Queue, total int) *racingDevice {
	done := make(chan error, 1)
	go func() {
		var c virtqueue.Chain
		for n := 0; n < total; {
			ok, err := q.Next(&c)
			if err != nil || (ok && c.Err != nil) {
				done <- errors.Join(err, c.Err)
				return
			}
			if !ok {
				if _, err := q.EnableNotifications(); err != nil {
					done <- err
					return
				}
				continue
			}
			copy(c.Writable[0], []byte{byte(n), 1, 2, 3})
			if err := q.PushUsed(c.Head, 4); err != nil {
				done <- err
				return
			}
			q.NeedsNotification()
			n++
		}
		done <- nil
	}()
	return &racingDevice{done: done}
}

// nothingUsed is what the driver calls when it polled and found no used
// element after got completions. A device that had already finished can
// publish nothing more (its last used index store happened before it
// reported done), so that fails t, as does a device error. A device that
// finishes now may have done so after the poll looked: the driver polls
// again to drain what it published.
func (dv *racingDevice) nothingUsed(t *testing.T, got int) {
	t.Helper()
	if dv.finished {
		t.Fatalf("device stopped early after %d completions", got)
	}
	select {
	case err := <-dv.done:
		if err != nil {
			t.Fatalf("device failed after %d completions: %v", got, err)
		}
		dv.finished = true
	default:
	}
}

// wait waits for the device to finish unless nothingUsed already saw it.
func (dv *racingDevice) wait(t *testing.T) {
	t.Helper()
	if !dv.finished {
		if err := <-dv.done; err != nil {
			t.Fatal(err)
		}
	}
}
