package vhdx

import (
	"fmt"
	"sync/atomic"
)

// Recovery from host I/O errors (rules in the package doc, "Host I/O
// errors"). The pieces: syncLatch (storage.go) remembers a failed
// fdatasync and whether guest payload was at risk; the journal
// (logrecover.go) puts a failed commit's targets back; recoverLocked below
// ties them into one recovery point.

// HostIOErrors reports the host I/O error episodes of an open image, for
// the control socket and logs.
type HostIOErrors struct {
	// Episodes counts failed fdatasyncs that opened an episode (or lost
	// payload), whoever issued them.
	Episodes uint64 `json:"episodes"`
	// Recovered counts episodes closed by a recovery point.
	Recovered uint64 `json:"recovered"`
	// JournalRecoveries counts failed journal commits recovered.
	JournalRecoveries uint64 `json:"journal_recoveries"`
	// Open: a sync failed and no recovery point followed yet; the next
	// Flush tries one.
	Open bool `json:"open"`
	// PayloadLost: a sync failed while guest writes were not yet durable;
	// they may be lost and every Flush fails until the image is reopened.
	PayloadLost bool `json:"payload_lost"`
	// JournalOffline: recovery of a failed journal commit was not safe;
	// allocation and Flush fail until `vhost-vhdx check --repair`.
	JournalOffline bool `json:"journal_offline"`
	// Last is the newest error of an open episode, "" if none.
	Last string `json:"last,omitempty"`
}

// hostIOCounters live in Image (recover.go's counts not kept by the latch).
type hostIOCounters struct {
	journalRecoveries atomic.Uint64
	journalOffline    atomic.Bool
	journalPending    atomic.Bool // a failed commit awaits recovery (journal.err != nil)
}

// HostIOErrors returns the image's host I/O error state. Safe for
// concurrent use with I/O.
func (im *Image) HostIOErrors() HostIOErrors {
	r := HostIOErrors{
		JournalRecoveries: im.hostIO.journalRecoveries.Load(),
		JournalOffline:    im.hostIO.journalOffline.Load(),
	}
	if im.latch != nil {
		var last error
		r.Open, r.PayloadLost, last = im.latch.state()
		r.Episodes = im.latch.episodes.Load()
		r.Recovered = im.latch.recovers.Load()
		if last != nil {
			r.Last = last.Error()
		}
	}
	return r
}

// markDirty records an in-place payload write that completed (syncLatch):
// a later failed sync may have lost it.
func (im *Image) markDirty() {
	if im.latch != nil {
		im.latch.markDirty()
	}
}

// needsRecovery reports, without locks, whether a Flush must first
// establish a recovery point.
func (im *Image) needsRecovery() bool {
	return im.hostIO.journalPending.Load()
}

// recoverLocked establishes a recovery point: the journal's failed commit
// is compensated, the headers (owned in memory) are written again through
// the two-copy update of §2.2.2.1, and a sync succeeds with no failure
// since the recovery began. Payload at risk when a sync failed cannot be
// re-created: then it fails with the latch's lost error. Caller holds
// im.mu.
func (im *Image) recoverLocked() error {
	if im.latch == nil {
		return nil
	}
	gen, err := im.latch.beginRecovery()
	if err != nil {
		return err
	}
	if im.journal != nil && im.journal.err != nil {
		err := im.journal.recover()
		if im.journal.dead != nil {
			im.hostIO.journalOffline.Store(true)
		}
		if err != nil {
			return err
		}
	}
	if im.session.Load() {
		if err := im.updateHeaders(func(*header) {}); err != nil {
			return fmt.Errorf("recovery: rewrite headers: %w", err)
		}
	}
	if err := im.latch.endRecovery(gen); err != nil {
		return fmt.Errorf("recovery: %w", err)
	}
	return nil
}
