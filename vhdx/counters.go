package vhdx

import "sync/atomic"

// counters are an open image's activity counts since Open, kept with
// atomic adds where the work happens (under im.mu, but read without it).
type counters struct {
	allocations    atomic.Uint64 // payload blocks allocated in this file
	journalCommits atomic.Uint64 // log entries committed (metadata updates)
	allocBatches   atomic.Uint64 // journal entries that published allocations (groupcommit.go)
	syncs          atomic.Uint64 // fdatasyncs issued (after coalescing)
}

// Counters is a snapshot of Image activity since Open, for statistics.
type Counters struct {
	// Allocations counts payload blocks this image allocated (a block
	// becoming FULLY_PRESENT in this file).
	Allocations uint64 `json:"allocations"`
	// JournalCommits counts log entries committed: every BAT, bitmap or
	// locator update goes through one (§2.3).
	JournalCommits uint64 `json:"journal_commits"`
	// AllocBatches counts the group commits that published allocations
	// of a base image, or first writes of a differencing image (some of
	// which only set bitmap bits); for a base image
	// Allocations/AllocBatches is the mean batch size.
	AllocBatches uint64 `json:"alloc_batches"`
	// Syncs counts fdatasyncs issued on the file, after coalescing
	// (concurrent flushes and journal commits share one).
	Syncs uint64 `json:"syncs"`
}

// Counters returns this image's (the top layer's) counts since Open. Safe
// for concurrent use with I/O.
func (im *Image) Counters() Counters {
	return Counters{
		Allocations:    im.counters.allocations.Load(),
		JournalCommits: im.counters.journalCommits.Load(),
		AllocBatches:   im.counters.allocBatches.Load(),
		Syncs:          im.counters.syncs.Load(),
	}
}

// Add returns c plus o, field by field: the counts of several images (a
// daemon's tops, one after another across checkpoints and resizes).
func (c Counters) Add(o Counters) Counters {
	return Counters{
		Allocations:    c.Allocations + o.Allocations,
		JournalCommits: c.JournalCommits + o.JournalCommits,
		AllocBatches:   c.AllocBatches + o.AllocBatches,
		Syncs:          c.Syncs + o.Syncs,
	}
}
