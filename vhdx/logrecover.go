package vhdx

// Recovery of the journal after a failed commit (rule 3 of "Host I/O
// errors" in the package doc).
//
// A commit writes its entry, syncs, applies the updates in place and syncs
// again (§2.3). Where it failed says what the file may hold:
//
//   - before the entry was written (the first sync, the scan): nothing of
//     the commit is in the file; the journal is unchanged.
//   - writing or syncing the entry (or a bridge entry): the entry may or may
//     not be valid in the log; no target was touched.
//   - reading the targets, applying or the last sync: the entry is durable
//     and valid, and the targets may hold old, new or torn contents; a
//     crash now would replay the entry, so the file is consistent, but the
//     next entry would make this one obsolete and leave the targets as they
//     are.
//
// The caller keeps its in-memory state from before the failed commit, so
// recovery puts the file back to that state: it reads the log back to learn
// which entry is the newest (a log that does not read back as the journal
// left it makes recovery unsafe), then commits a compensating entry holding
// the targets' contents from before the failed commit (an empty entry when
// no target was touched). Once that entry is durable the failed one is
// obsolete, and the targets match memory again. Should the compensating
// commit fail too, recovery is pending as before, still with the original
// contents (never those of the failed compensation).

import (
	"errors"
	"fmt"
	"io"
)

// failedCommit is what a failed commit may have left in the file.
type failedCommit struct {
	entryUnsure bool   // the entry write or its sync failed
	pos, length uint32 // that entry's extent in the log (entryUnsure)

	applyStarted bool        // targets may have been written
	pre          []logUpdate // the targets' contents before the commit
	noPre        bool        // a zero update's old contents were not kept

	flushed, last uint64 // the failed commit's FlushedFileOffset and LastFileOffset
}

// checkAdvice ends the message of every error that makes a journal dead.
const checkAdvice = "the image must be checked: stop using it and run `vhost-vhdx check --repair IMAGE`"

// noteFailure records a failed commit: pending when it may have written.
func (j *journal) noteFailure(err error, flushed, last uint64) {
	if j.failed == nil {
		return // nothing reached the file: the journal is as it was
	}
	j.failed.flushed, j.failed.last = flushed, last
	j.err = err
	if j.pending != nil {
		j.pending.Store(true)
	}
}

// preimages reads the current contents of every data update's target
// (zeros past the end of the file). noPre reports a zero update, whose old
// contents are not kept: it may span a huge sparse range.
func (j *journal) preimages(updates []logUpdate) (pre []logUpdate, noPre bool, err error) {
	n := 0
	for _, u := range updates {
		if u.data != nil {
			n++
		}
	}
	if cap(j.preBuf) < n*logSectorSize {
		j.preBuf = make([]byte, n*logSectorSize)
	}
	buf := j.preBuf[:n*logSectorSize]
	pre = j.preList[:0]
	for _, u := range updates {
		if u.data == nil {
			noPre = true
			continue
		}
		b := buf[:logSectorSize:logSectorSize]
		buf = buf[logSectorSize:]
		got, err := j.s.ReadAt(b, int64(u.offset))
		if got < len(b) {
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, false, fmt.Errorf("log: commit: read target at offset %#x before applying: %w", u.offset, err)
			}
			clear(b[got:])
		}
		pre = append(pre, logUpdate{offset: u.offset, data: b})
	}
	j.preList = pre
	return pre, noPre, nil
}

// recover runs the recovery of a pending failed commit. It returns nil
// when the journal is usable again.
func (j *journal) recover() error {
	if j.dead != nil {
		return fmt.Errorf("log: journal offline after a failed commit (%w): %w", j.err, j.dead)
	}
	f := j.failed
	if err := j.verifyLog(f); err != nil {
		return fmt.Errorf("log: recovery after a failed commit (%w): %w", j.err, err)
	}
	var updates []logUpdate
	if f.applyStarted {
		if f.noPre {
			j.dead = errAt(ErrCorrupt, j.lr.offset, "log",
				"a failed commit zeroed ranges whose old contents were not kept; %s", checkAdvice)
			return fmt.Errorf("log: journal offline after a failed commit (%w): %w", j.err, j.dead)
		}
		updates = f.pre
	}
	entryLen, dataCount, err := j.checkCommit(updates, f.flushed, f.last)
	if err != nil {
		return fmt.Errorf("log: recovery after a failed commit: %w", err)
	}
	j.preBuf, j.preList = nil, nil // f.pre lives there; the compensating commit must not overwrite it
	if err := j.doCommit(updates, entryLen, dataCount, f.flushed, f.last, true, true); err != nil {
		if nf := j.failed; nf != nil { // it wrote: keep its log extent, the original contents
			nf.applyStarted, nf.pre, nf.noPre = f.applyStarted, f.pre, f.noPre
			nf.flushed, nf.last = f.flushed, f.last
		} else {
			j.failed = f
		}
		return fmt.Errorf("log: recovery after a failed commit: %w", err)
	}
	j.failed, j.err = nil, nil
	if j.pending != nil {
		j.pending.Store(false)
	}
	if j.recoveries != nil {
		j.recoveries.Add(1)
	}
	return nil
}

// verifyLog reads the log back and checks that its newest valid entry is
// the one the journal last wrote, or, when the failed entry's write is
// unsure, that entry; it then continues after whichever it is. Anything
// else means the file is not what this process wrote, and recovery would
// build on a guess: the journal goes dead. An I/O error leaves the failure
// pending, to be tried again.
func (j *journal) verifyLog(f *failedCommit) error {
	sc, err := newLogScan(j.s, j.lr)
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			j.dead = fmt.Errorf("%w; %s", err, checkAdvice)
			return j.dead
		}
		return err
	}
	var newest logEntry
	for p := uint32(0); p < sc.sectors; p++ {
		n, err := sc.node(p * logSectorSize)
		if err != nil {
			return err
		}
		if n.valid && n.e.seq > newest.seq {
			newest = n.e
		}
	}
	isPrev := newest.seq == j.seq && (j.seq == 0 || newest.pos == j.prevPos && newest.length == j.prevLen)
	switch {
	case isPrev:
	case f.entryUnsure && j.seq < newest.seq && newest.seq-j.seq == 1 && newest.pos == f.pos && newest.length == f.length:
		j.seq, j.prevPos, j.prevLen = newest.seq, newest.pos, newest.length // the failed entry landed
	default:
		j.dead = errAt(ErrCorrupt, j.lr.offset+uint64(newest.pos), "log",
			"after a failed commit the newest entry is sequence %d, but the journal last wrote %d at log offset %#x; %s",
			newest.seq, j.seq, j.prevPos, checkAdvice)
		return j.dead
	}
	f.entryUnsure = false
	return nil
}
