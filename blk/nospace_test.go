package blk

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// spaceDisk is a trimDisk whose writes, write zeroes and flushes fail the
// way the engine fails on a full host disk while full is set.
type spaceDisk struct {
	*trimDisk
	mu    sync.Mutex
	full  bool
	err   error // the failure while full; default: ErrNoSpace over ENOSPC
	tries int   // calls that failed
}

func newSpaceDisk() *spaceDisk {
	return &spaceDisk{trimDisk: &trimDisk{memDisk: newMemDisk(1<<20, 512)}, full: true,
		err: fmt.Errorf("write payload: %w: %w", vhdx.ErrNoSpace, syscall.ENOSPC)}
}

func (d *spaceDisk) fail() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.full {
		d.tries++
		return d.err
	}
	return nil
}

func (d *spaceDisk) setFull(full bool) {
	d.mu.Lock()
	d.full = full
	d.mu.Unlock()
}

func (d *spaceDisk) WriteVec(bufs [][]byte, off int64) error {
	if err := d.fail(); err != nil {
		return err
	}
	return d.memDisk.WriteVec(bufs, off)
}

func (d *spaceDisk) Flush() error {
	if err := d.fail(); err != nil {
		return err
	}
	return d.memDisk.Flush()
}

func (d *spaceDisk) WriteZeroes(off, n int64, unmap bool) error {
	if err := d.fail(); err != nil {
		return err
	}
	return d.trimDisk.WriteZeroes(off, n, unmap)
}

// heldClock replaces the retry timer: each retry announces its delay on
// delays and waits for a tick.
type heldClock struct {
	delays chan time.Duration
	tick   chan time.Time
}

func newHeldClock(ns *NoSpace) *heldClock {
	c := &heldClock{delays: make(chan time.Duration), tick: make(chan time.Time)}
	ns.after = func(d time.Duration) <-chan time.Time {
		c.delays <- d
		return c.tick
	}
	return c
}

// noSpaceRequests are the request types that can need host space.
var noSpaceRequests = []struct {
	name     string
	readable [][]byte
	check    func(d *spaceDisk) bool // the request took effect
}{
	{"OUT", [][]byte{hdr(TypeOut, 2), pattern(1024, 9)}, func(d *spaceDisk) bool {
		return bytes.Equal(d.data[1024:2048], pattern(1024, 9))
	}},
	{"FLUSH", [][]byte{hdr(TypeFlush, 0)}, func(d *spaceDisk) bool { return d.flushes == 1 }},
	{"WRITE_ZEROES", [][]byte{hdr(TypeWriteZeroes, 0), seg(4, 2, 0)}, func(d *spaceDisk) bool {
		return bytes.Equal(d.data[2048:3072], make([]byte, 1024))
	}},
}

func TestFullDiskWithReportCompletesTheRequestWithIOErr(t *testing.T) {
	for _, rq := range noSpaceRequests {
		t.Run(rq.name, func(t *testing.T) {
			d := newSpaceDisk()
			ns := NewNoSpace(NoSpaceReport, nil)
			h := NewHandler(d, Options{NoSpace: ns})
			h.SetStop(make(chan struct{}))
			w := [][]byte{{0xAA}}
			if n := h.Handle(rq.readable, w); n != 1 || w[0][0] != StatusIOErr {
				t.Fatalf("Handle = %d, status %d; want 1, IOERR", n, w[0][0])
			}
			if !IsNoSpace(h.Err()) || d.tries != 1 {
				t.Errorf("Err = %v after %d tries, want ErrNoSpace after 1", h.Err(), d.tries)
			}
			if s := ns.Snapshot(); s.Reported != 1 || s.Episodes != 0 || s.Waiting != 0 {
				t.Errorf("snapshot %+v, want 1 reported and no episode", s)
			}
		})
	}
}

// TestFullDiskWithWaitHoldsTheRequestUntilSpaceIsBack drives a held request
// through its retries with a test clock: it retries with a doubling delay
// capped at 1 s, shows as one waiting request of one episode with a start
// time, completes OK once space is back, and the episode produces exactly
// two events (start, space back) however many retries it took.
func TestFullDiskWithWaitHoldsTheRequestUntilSpaceIsBack(t *testing.T) {
	for _, rq := range noSpaceRequests {
		t.Run(rq.name, func(t *testing.T) {
			d := newSpaceDisk()
			var events []NoSpaceEvent
			var evMu sync.Mutex
			ns := NewNoSpace(NoSpaceWait, func(ev NoSpaceEvent) {
				evMu.Lock()
				events = append(events, ev)
				evMu.Unlock()
			})
			clock := newHeldClock(ns)
			h := NewHandler(d, Options{NoSpace: ns})
			h.SetStop(make(chan struct{}))
			w := [][]byte{{0xAA}}
			done := make(chan uint32)
			go func() { done <- h.Handle(rq.readable, w) }()

			want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond,
				800 * time.Millisecond, time.Second, time.Second}
			for i, wd := range want {
				if got := <-clock.delays; got != wd {
					t.Fatalf("retry %d waits %v, want %v", i, got, wd)
				}
				s := ns.Snapshot()
				if s.Waiting != 1 || s.Episodes != 1 || s.Since == nil {
					t.Fatalf("while held: snapshot %+v, want 1 waiting in episode 1 with a start time", s)
				}
				if i == len(want)-1 {
					d.setFull(false) // the operator freed space
				}
				clock.tick <- time.Time{}
			}
			if n := <-done; n != 1 || w[0][0] != StatusOK || h.Err() != nil {
				t.Fatalf("Handle = %d, status %d, err %v; want 1, OK, nil", n, w[0][0], h.Err())
			}
			if !rq.check(d) {
				t.Error("the request completed OK but did not take effect")
			}
			if s := ns.Snapshot(); s.Waiting != 0 || s.Since != nil || s.Episodes != 1 || s.Held != 1 || s.Reported != 0 {
				t.Errorf("after: snapshot %+v, want nothing waiting, 1 episode, 1 held", s)
			}
			if len(events) != 2 || !events[0].Start || !IsNoSpace(events[0].Err) || events[1].Start || !events[1].SpaceBack {
				t.Errorf("events %+v, want start (with the error), then space back", events)
			}
		})
	}
}

func TestFullDiskWithWaitAbandonsTheHeldRequestWhenTheQueueStops(t *testing.T) {
	d := newSpaceDisk()
	var events []NoSpaceEvent
	ns := NewNoSpace(NoSpaceWait, func(ev NoSpaceEvent) { events = append(events, ev) })
	clock := newHeldClock(ns)
	h := NewHandler(d, Options{NoSpace: ns})
	stop := make(chan struct{})
	h.SetStop(stop)
	w := [][]byte{{0xAA}}
	done := make(chan uint32)
	go func() { done <- h.Handle(noSpaceRequests[0].readable, w) }()
	<-clock.delays
	close(stop) // the ring stops while the request waits for its tick
	if n := <-done; n != 0 || !errors.Is(h.Err(), ErrStopped) || !IsNoSpace(h.Err()) {
		t.Fatalf("Handle = %d, err %v; want 0 and ErrStopped over ErrNoSpace", n, h.Err())
	}
	if w[0][0] != 0xAA {
		t.Errorf("status byte %#x written for a request that was not completed", w[0][0])
	}
	if s := ns.Snapshot(); s.Waiting != 0 || s.Episodes != 1 {
		t.Errorf("snapshot %+v, want nothing waiting after 1 episode", s)
	}
	if len(events) != 2 || events[1].SpaceBack {
		t.Errorf("events %+v, want start, then an end without space", events)
	}
}

// TestFullDiskWithWaitReportsWhatSpaceCannotCure: errors that are not the
// engine's clean out-of-space failure complete at once with IOERR, even
// a bare ENOSPC (the engine strips ErrNoSpace when only a reopen helps),
// and so does ErrNoSpace on a handler without a stop channel.
func TestFullDiskWithWaitReportsWhatSpaceCannotCure(t *testing.T) {
	tests := []struct {
		name    string
		err     error
		noStop  bool
		reports uint64
	}{
		{"I/O error", errDisk, false, 0},
		{"bare ENOSPC", fmt.Errorf("log: write entry: %w", syscall.ENOSPC), false, 0},
		{"EFBIG", syscall.EFBIG, false, 0},
		{"no stop channel", fmt.Errorf("x: %w", vhdx.ErrNoSpace), true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newSpaceDisk()
			d.err = tt.err
			ns := NewNoSpace(NoSpaceWait, nil)
			ns.after = func(time.Duration) <-chan time.Time {
				t.Fatal("a retry was scheduled")
				return nil
			}
			h := NewHandler(d, Options{NoSpace: ns})
			if !tt.noStop {
				h.SetStop(make(chan struct{}))
			}
			w := [][]byte{{0xAA}}
			if n := h.Handle(noSpaceRequests[0].readable, w); n != 1 || w[0][0] != StatusIOErr {
				t.Fatalf("Handle = %d, status %d; want 1, IOERR", n, w[0][0])
			}
			if s := ns.Snapshot(); s.Reported != tt.reports || s.Episodes != 0 {
				t.Errorf("snapshot %+v, want %d reported, no episode", s, tt.reports)
			}
		})
	}
}

func TestParseNoSpacePolicyAcceptsReportAndWait(t *testing.T) {
	for _, s := range []string{"report", "wait"} {
		p, err := ParseNoSpacePolicy(s)
		if err != nil || p.String() != s {
			t.Errorf("ParseNoSpacePolicy(%q) = %v, %v", s, p, err)
		}
	}
	if _, err := ParseNoSpacePolicy("stop"); !errors.Is(err, ErrBadPolicy) {
		t.Errorf("ParseNoSpacePolicy(stop) = %v, want ErrBadPolicy", err)
	}
	if s := (*NoSpace)(nil).Snapshot(); s.Policy != "report" {
		t.Errorf("nil NoSpace snapshot %+v, want policy report", s)
	}
}

// TestRequestsHeldOnSeveralQueuesShareOneEpisode: two handlers (two
// queues) of one device hold a write each; the state shows both waiting
// in one episode, and when space is back both complete and the episode
// ends with one event, not one per request.
func TestRequestsHeldOnSeveralQueuesShareOneEpisode(t *testing.T) {
	d := newSpaceDisk()
	var mu sync.Mutex
	var events []NoSpaceEvent
	ns := NewNoSpace(NoSpaceWait, func(ev NoSpaceEvent) {
		mu.Lock()
		events = append(events, ev)
		mu.Unlock()
	})
	clock := newHeldClock(ns)
	stop := make(chan struct{})
	done := make(chan byte, 2)
	for q := range 2 {
		h := NewHandler(d, Options{NoSpace: ns, NumQueues: 2})
		h.SetStop(stop)
		req := [][]byte{hdr(TypeOut, uint64(8*q)), pattern(512, byte(q))}
		go func() {
			w := [][]byte{{0xAA}}
			h.Handle(req, w)
			done <- w[0][0]
		}()
	}
	<-clock.delays // both requests are between their first failure and first retry
	<-clock.delays
	if s := ns.Snapshot(); s.Waiting != 2 || s.Episodes != 1 || s.Held != 2 {
		t.Fatalf("two held writes: snapshot %+v, want 2 waiting in 1 episode", s)
	}
	d.setFull(false)
	clock.tick <- time.Time{}
	clock.tick <- time.Time{}
	for range 2 {
		if st := <-done; st != StatusOK {
			t.Errorf("held write completed with status %d, want OK", st)
		}
	}
	if s := ns.Snapshot(); s.Waiting != 0 || s.Episodes != 1 {
		t.Errorf("after: snapshot %+v, want nothing waiting after 1 episode", s)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) != 2 || !events[0].Start || events[1].Start || !events[1].SpaceBack {
		t.Errorf("events %+v, want one start and one space-back for the episode", events)
	}
}
