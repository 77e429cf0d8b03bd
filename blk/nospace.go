package blk

// What a request does when the host file system is full (serve
// --on-enospc).
//
// The engine fails a write that needs host space it cannot get with an
// error wrapping vhdx.ErrNoSpace, after leaving the image as it was: the
// same request may be retried as it is (vhdx/nospace.go). With
// NoSpaceReport the request completes with VIRTIO_BLK_S_IOERR (Status),
// as QEMU's werror=report does. With NoSpaceWait the handler holds it and
// retries with a backoff (100 ms doubling to 1 s) until it gets past the
// full disk, like QEMU's werror=enospc, but without stopping the VM: only
// the held request (today: its queue, whose worker runs it) waits. Writes,
// write zeroes, discards and flushes are idempotent, so retrying one that
// half happened is safe.
//
// A held request ends when it succeeds, fails with another error (then it
// completes with that status), or when the handler's stop channel closes
// (the queue is stopped: GET_VRING_BASE, a reset, a closed connection, the
// daemon stopping). Then Handle reports ErrStopped and writes no status:
// the request is not completed and stays in flight; with the front-end's
// inflight region (INFLIGHT_SHMFD) QEMU resubmits it to the next back-end.
//
// A NoSpace is shared by the handlers of a device: it counts episodes
// (from the first request that starts waiting to the moment none waits
// any more) and tells its notify function at the start and at the end of
// each, so the daemon logs two lines per episode, not one per retry.

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// NoSpacePolicy says what a request that met a full host file system does.
type NoSpacePolicy uint8

const (
	// NoSpaceReport completes the request with VIRTIO_BLK_S_IOERR.
	NoSpaceReport NoSpacePolicy = iota
	// NoSpaceWait holds the request and retries it until space is back.
	NoSpaceWait
)

func (p NoSpacePolicy) String() string {
	if p == NoSpaceWait {
		return "wait"
	}
	return "report"
}

// ParseNoSpacePolicy parses "report" or "wait".
func ParseNoSpacePolicy(s string) (NoSpacePolicy, error) {
	switch s {
	case "report":
		return NoSpaceReport, nil
	case "wait":
		return NoSpaceWait, nil
	}
	return 0, fmt.Errorf("out-of-space policy %q: want report or wait: %w", s, ErrBadPolicy)
}

var (
	// ErrStopped: a request held for space was abandoned because its queue
	// stopped. Handle wrote no status; the caller must not complete it.
	ErrStopped = errors.New("blk: request held for host space abandoned: queue stopped")
	// ErrBadPolicy: an unknown out-of-space policy name.
	ErrBadPolicy = errors.New("blk: unknown out-of-space policy")
)

// Retry delays of NoSpaceWait: the first retry after retryFirst, each
// later one after twice the previous delay, at most retryMax.
const (
	retryFirst = 100 * time.Millisecond
	retryMax   = time.Second
)

// NoSpaceEvent is the start or the end of an episode.
type NoSpaceEvent struct {
	// Start: the first request started waiting. Otherwise none waits any
	// more: SpaceBack says the last one got past the full disk (false: it
	// was abandoned because its queue stopped).
	Start     bool
	SpaceBack bool
	Since     time.Time // when the episode started
	Err       error     // Start: the error that made the request wait
}

// NoSpace is a device's out-of-space policy and state; safe for concurrent
// use. The zero value is not usable: see NewNoSpace.
type NoSpace struct {
	policy NoSpacePolicy
	notify func(NoSpaceEvent) // may be nil; called without mu held
	// after returns the channel a retry waits on; tests replace it.
	after func(time.Duration) <-chan time.Time

	mu       sync.Mutex
	waiting  int
	since    time.Time
	episodes uint64
	held     uint64 // requests that waited
	reported uint64 // requests completed with IOERR for lack of space
}

// NewNoSpace returns the state of a device with policy p. notify, if not
// nil, is called at the start and at the end of every episode, on the
// goroutine of the request concerned.
func NewNoSpace(p NoSpacePolicy, notify func(NoSpaceEvent)) *NoSpace {
	return &NoSpace{policy: p, notify: notify, after: time.After}
}

// NoSpaceSnapshot is the state reported by the control socket's status.
type NoSpaceSnapshot struct {
	Policy   string     `json:"policy"`
	Waiting  int        `json:"waiting"`         // requests held now
	Since    *time.Time `json:"since,omitempty"` // start of the current episode
	Episodes uint64     `json:"episodes"`        // episodes since start
	Held     uint64     `json:"held"`            // requests that waited, in all episodes
	Reported uint64     `json:"reported"`        // requests failed with IOERR for lack of space
}

// Snapshot returns the current state; nil-safe (a nil NoSpace reports
// the default policy and nothing else).
func (n *NoSpace) Snapshot() NoSpaceSnapshot {
	if n == nil {
		return NoSpaceSnapshot{Policy: NoSpaceReport.String()}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	s := NoSpaceSnapshot{Policy: n.policy.String(), Waiting: n.waiting, Episodes: n.episodes, Held: n.held, Reported: n.reported}
	if n.waiting > 0 {
		since := n.since
		s.Since = &since
	}
	return s
}

func (n *NoSpace) countReported() {
	if n == nil {
		return
	}
	n.mu.Lock()
	n.reported++
	n.mu.Unlock()
}

// begin records a request that starts waiting.
func (n *NoSpace) begin(err error) {
	n.mu.Lock()
	n.held++
	n.waiting++
	first := n.waiting == 1
	if first {
		n.episodes++
		n.since = time.Now()
	}
	ev := NoSpaceEvent{Start: true, Since: n.since, Err: err}
	n.mu.Unlock()
	if first && n.notify != nil {
		n.notify(ev)
	}
}

// end records a request that stops waiting.
func (n *NoSpace) end(spaceBack bool) {
	n.mu.Lock()
	n.waiting--
	last := n.waiting == 0
	ev := NoSpaceEvent{SpaceBack: spaceBack, Since: n.since}
	n.mu.Unlock()
	if last && n.notify != nil {
		n.notify(ev)
	}
}

// IsNoSpace reports whether err is the engine's clean, retryable
// full-disk failure. A bare ENOSPC is not: the engine keeps only the
// errno when the failure needs more than space to clear (a journal that
// must be reopened), and waiting for it would never end.
func IsNoSpace(err error) bool { return errors.Is(err, vhdx.ErrNoSpace) }

// SetStop gives the handler the channel that is closed when its queue
// stops; a request held for space is abandoned then (ErrStopped). Without
// one, NoSpaceWait cannot hold a request and reports it instead.
func (h *Handler) SetStop(stop <-chan struct{}) { h.stop = stop }

// holdForSpace applies the out-of-space policy to err, the failure of a
// disk call that retry repeats: it returns err unchanged unless err
// IsNoSpace and the policy is NoSpaceWait; then it retries until retry
// returns something else, or returns ErrStopped when the queue stops.
func (h *Handler) holdForSpace(err error, retry func() error) error {
	if !IsNoSpace(err) {
		return err
	}
	ns := h.opts.NoSpace
	if ns == nil || ns.policy != NoSpaceWait || h.stop == nil {
		ns.countReported()
		return err
	}
	ns.begin(err)
	delay := retryFirst
	for {
		select {
		case <-h.stop:
			ns.end(false)
			return fmt.Errorf("%w: %w", ErrStopped, err)
		case <-ns.after(delay):
		}
		if err = retry(); !IsNoSpace(err) {
			ns.end(true)
			return err
		}
		delay = min(2*delay, retryMax)
	}
}
