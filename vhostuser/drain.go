package vhostuser

import (
	"sync"
	"sync/atomic"
)

// requestGate counts the requests of one session that are in flight on any
// queue (popped from a ring, not yet published to its used ring) and lets
// the control path and Monitor.Quiesce hold new ones off and wait for the
// count to reach zero. It is what keeps guest memory mapped while a request
// uses it: the table is swapped (SET_MEM_TABLE, ADD/REM_MEM_REG) only
// between drain and resume, when no request holds a slice of it, so the
// workers need no session lock while their requests do I/O.
//
// The admit/drain handshake is Dekker's: admit increments n, then reads
// closed; drain increments closed, then reads n. Go's atomics are
// sequentially consistent, so at least one side sees the other: either the
// request backs out, or the drainer waits for it.
type requestGate struct {
	n      atomic.Int64 // requests in flight, all queues
	closed atomic.Int32 // drains in progress; > 0: admit refuses

	mu     sync.Mutex
	zero   *sync.Cond    // broadcast (under mu) when n drops to 0 while closed
	reopen chan struct{} // +checklocks:mu; closed when the last drain resumes
}

// waitHook, nil outside tests, is called when a drain or a ring stop has
// to wait for requests in flight ("drain", "stop"), so tests can release a
// parked request exactly then instead of sleeping (export_test.go). A ring
// stop also calls it with "stop-check" while it holds the queue's qmu to
// look at what is still in flight, and a completion with "left" when it
// found qmu held and left its publication to the holder, so a test can
// make the two meet. A ring's owner calls it with "poll" before each look
// of a poll window, "poll-found" when the window found work, and "sleep"
// just before it waits for a kick.
var waitHook func(what string)

func newRequestGate() *requestGate {
	g := &requestGate{}
	g.zero = sync.NewCond(&g.mu)
	return g
}

// admit counts one request in flight and reports true, or reports false
// without counting it while a drain is in progress (wait on reopened).
func (g *requestGate) admit() bool {
	g.n.Add(1)
	if g.closed.Load() == 0 {
		return true
	}
	g.leave(1)
	return false
}

// leave uncounts k requests after their completions were published (or
// after admit backed out), waking a drainer when none is left.
func (g *requestGate) leave(k int) {
	if k == 0 {
		return
	}
	if g.n.Add(-int64(k)) == 0 && g.closed.Load() > 0 {
		g.mu.Lock()
		g.zero.Broadcast()
		g.mu.Unlock()
	}
}

// reopened returns a channel closed once no drain is in progress (nil, which
// the caller must not wait on, if none is now).
func (g *requestGate) reopened() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed.Load() == 0 {
		return nil
	}
	return g.reopen
}

// drain holds new requests off and waits until every request in flight has
// been completed and published. Drains nest; each must be paired with one
// resume. Preconditions: the caller holds no session lock (a worker
// publishing a completion takes the dispatch lock for reading).
func (g *requestGate) drain() {
	g.mu.Lock()
	if g.closed.Add(1) == 1 {
		g.reopen = make(chan struct{})
	}
	if g.n.Load() != 0 && waitHook != nil {
		waitHook("drain")
	}
	for g.n.Load() != 0 {
		g.zero.Wait()
	}
	g.mu.Unlock()
}

// resume ends one drain; when the last one ends, waiting workers go on.
func (g *requestGate) resume() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed.Add(-1) == 0 {
		close(g.reopen)
		g.reopen = nil
	}
}
