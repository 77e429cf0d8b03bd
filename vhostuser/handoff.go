package vhostuser

import (
	"context"
	"fmt"
	"sync"
)

// RingGate lets the queues of only one front-end run at a time across the
// Serve calls that share it (Options.Gate): one image served on two
// sockets, QEMU's migration source on one and its destination on the
// other, as qemu-storage-daemon does with two exports of one node.
//
// The rule: a connection owns the gate from the moment its first ring
// starts (SET_VRING_KICK) until none of its rings is started any more
// (GET_VRING_BASE, RESET_DEVICE, or the end of the connection, which
// stop rings after their in-flight requests complete). A connection that
// wants to start a ring while another owns the gate waits, in
// SET_VRING_KICK, until the owner lets go or its Serve is cancelled.
//
// Live migration meets the rule without waiting: the source QEMU stops
// its device (GET_VRING_BASE on every ring, so every request it took is
// complete and on disk) before it sends its last state, and the
// destination starts its rings only after it has loaded that state. If a
// migration fails before the switch, the destination never started a ring
// and the source resumes. A destination that starts a ring too early is
// held until the source stops, so the two front-ends never write the disk
// at once.
type RingGate struct {
	mu      sync.Mutex
	owner   uint64        // connection id; 0: free
	waiting int           // connections waiting in acquire
	changed chan struct{} // closed and replaced when the gate is freed
}

// NewRingGate returns a free gate.
func NewRingGate() *RingGate { return &RingGate{changed: make(chan struct{})} }

// Owner returns the connection id that owns the gate, 0 if free.
func (g *RingGate) Owner() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.owner
}

// Waiting returns how many connections wait to start a ring.
func (g *RingGate) Waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

// acquire makes id the owner, waiting while another connection owns the
// gate.
func (g *RingGate) acquire(ctx context.Context, id uint64) error {
	for {
		g.mu.Lock()
		if g.owner == 0 || g.owner == id {
			g.owner = id
			g.mu.Unlock()
			return nil
		}
		ch, owner := g.changed, g.owner
		g.waiting++
		g.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = ctx.Err()
		}
		g.mu.Lock()
		g.waiting--
		g.mu.Unlock()
		if err != nil {
			return fmt.Errorf("waiting for connection %d to stop its rings: %v: %w", owner, err, ErrState)
		}
	}
}

// release frees the gate if id owns it.
func (g *RingGate) release(id uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.owner == id {
		g.owner = 0
		close(g.changed)
		g.changed = make(chan struct{})
	}
}

// gateAcquire is called before a ring's worker starts. Preconditions:
// control goroutine.
func (s *session) gateAcquire() error {
	if s.opts.Gate == nil {
		return nil
	}
	ctx := s.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	return s.opts.Gate.acquire(ctx, s.id)
}

// gateReleaseIfIdle frees the gate once no ring of s is started.
// Preconditions: control goroutine (or teardown).
func (s *session) gateReleaseIfIdle() {
	if s.opts.Gate != nil && !s.anyStarted() {
		s.opts.Gate.release(s.id)
	}
}
