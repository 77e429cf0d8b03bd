package vhdx

import "sync/atomic"

// epochs is the grace-period scheme that makes reuse of freed file space
// safe while data I/O stays lock-free.
//
// Data I/O (ReadAt, WriteAt, ReadVec, WriteVec, Discard, WriteZeroes) loads
// BAT entries without a lock and then touches the file range an entry points
// to. Once a discard has moved a block's range out of the BAT, an I/O that
// loaded the old entry may still read or write that range. Giving the range
// to another block is safe only after every such I/O has finished.
//
// Every I/O registers in the current epoch for its whole duration (enter,
// exit): two counters, one per epoch parity. A range freed while the epoch
// is T (tag T, read after the BAT entry was changed in memory) may be reused
// once the epoch is T+2. The epoch moves from E to E+1 only when no I/O of
// epoch E-1 is still registered (same parity as E+1), so reaching T+2 means
// that, at the move from T+1, every I/O of epoch T had finished, and at the
// move from T every I/O of T-1 had; by induction so had every earlier one.
// An I/O that could hold the freed range's old entry registered before the
// entry changed, so in an epoch ≤ T: it has finished.
//
// enter and exit are two atomic additions and a load; nobody waits. advance
// never waits either: when I/O of the previous epoch is still running it
// does nothing and the allocator grows the file instead of reusing.
type epochs struct {
	cur    atomic.Uint64
	active [2]atomic.Int64
}

// enter registers an I/O in the current epoch and returns it for exit.
// The re-check makes sure the I/O is counted under the epoch it saw: an
// increment that races with an advance is undone and retried, so advance
// never misses an I/O that went on to load BAT entries.
func (e *epochs) enter() uint64 {
	for {
		c := e.cur.Load()
		e.active[c&1].Add(1)
		if e.cur.Load() == c {
			return c
		}
		e.active[c&1].Add(-1)
	}
}

// exit ends an I/O registered in epoch c.
func (e *epochs) exit(c uint64) { e.active[c&1].Add(-1) }

// advance moves to the next epoch if no I/O of the previous one remains.
// Callers hold im.mu, so advances do not race each other.
func (e *epochs) advance() {
	c := e.cur.Load()
	if e.active[(c+1)&1].Load() == 0 {
		e.cur.Store(c + 1)
	}
}

// reusable reports whether a range tagged with epoch tag may be reused.
func (e *epochs) reusable(tag uint64) bool { return e.cur.Load() >= tag+2 }
