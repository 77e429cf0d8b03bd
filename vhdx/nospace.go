package vhdx

// Running out of host space.
//
// A dynamic or differencing image takes host space as the guest writes:
// fresh payload blocks, sector bitmap blocks, and the first write into any
// hole of the file (the log, the BAT and fresh blocks are sparse until
// written). When the host file system or the user's quota is full, the
// write that needs space fails with ENOSPC or EDQUOT. The rules:
//
//   - The error wraps ErrNoSpace and the errno (noSpace), so the device
//     can tell "full" from "broken" and hold or fail the request.
//     ErrNoSpace promises more than the errno: the request failed cleanly
//     and may be retried as it is. An ENOSPC that leaves the journal
//     unusable (a log write on a file system that cannot reserve space)
//     keeps only the errno, so a device waiting for space does not wait
//     for a journal that needs a reopen.
//   - An allocation that fails before its journal entry was written gives
//     the file range it reserved back (giveBack): the tail of the file is
//     truncated off again, a range inside the file returns to the free set,
//     which zeroes it before its next use. Retrying every second while the
//     disk stays full therefore neither grows the file nor leaks ranges,
//     and no half-written block can show through a later one.
//   - The journal reserves the host space of the log, and of every sector
//     an entry will write in place, before it writes the entry
//     (journal.reserve). A full disk is therefore met before anything is
//     written: the commit fails cleanly, wraps errLogUntouched, and the
//     journal stays usable. Without that, ENOSPC while applying an entry
//     that already reached the log would leave the journal refusing every
//     later commit until a reopen (journal.go: a failure after the entry may
//     be on disk is sticky).
//   - The in-memory BAT changes only after a successful commit, as for any
//     other failure, so nothing acknowledged is lost and the next attempt
//     starts from the same state.
//
// EFBIG (the file would exceed the file system's limit) takes the same
// clean path but is not ErrNoSpace: freeing space does not cure it.

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// errLogUntouched marks a journal commit that failed before writing
// anything: whatever the caller reserved for it is still unowned on disk.
var errLogUntouched = errors.New("the log was not written")

// noSpace wraps err with ErrNoSpace when it reports a full file system or
// quota (ENOSPC, EDQUOT); other errors are returned as they are.
func noSpace(err error) error {
	if err == nil || errors.Is(err, ErrNoSpace) {
		return err
	}
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}

// giveBack returns [off, off+n), reserved by an allocation that failed
// before its journal entry was written, so no BAT entry on disk or in
// memory owns it. At the end of the file the file is cut back (the range
// then reads as zeros when it is taken again); elsewhere, or if the cut
// fails, the range joins the free set, which zeroes it when it is taken
// (reserveBlock), so data of the failed write never shows. Caller holds
// im.mu.
func (im *Image) giveBack(off, n uint64) {
	if n == 0 {
		return
	}
	if off+n == im.fileEnd {
		if err := im.s.Truncate(int64(off)); err == nil {
			im.fileEnd = off
			return
		}
	}
	im.initSpace()
	im.space.setFree(off, n)
}

// giveBackAfterCommit gives the ranges back when err says the journal
// wrote nothing (errLogUntouched). After any other commit failure the entry
// may be on disk and replay may make the ranges owned: they stay reserved
// for the rest of the session. Caller holds im.mu.
func (im *Image) giveBackAfterCommit(err error, spans ...ownedSpan) {
	if errors.Is(err, errLogUntouched) {
		im.giveBackAll(spans)
	}
}

// giveBackAll gives back spans, reserved in file order. Caller holds im.mu.
func (im *Image) giveBackAll(spans []ownedSpan) {
	// Latest first, so that tail ranges shrink the file in turn.
	for i := len(spans) - 1; i >= 0; i-- {
		im.giveBack(spans[i].start, spans[i].end-spans[i].start)
	}
}

// journalSpace is what journal.reserve has done so far in a session.
type journalSpace struct {
	logReserved bool // the whole log region has its host space
	unsupported bool // the file system cannot reserve space: do not try
}

// reserve gives the host space of the log and of every sector updates will
// write in place before the entry is written (see the file comment). Zero
// descriptors need no space (a hole reads as zeros). A Storage that cannot
// reserve (no allocator, or a file system without fallocate) is left as it
// is: ENOSPC then surfaces where it happens.
func (j *journal) reserve(updates []logUpdate) error {
	a, ok := j.s.(allocator)
	if !ok || j.space.unsupported {
		return nil
	}
	size, err := j.s.Size()
	if err != nil {
		return fmt.Errorf("file size: %w", err)
	}
	alloc := func(off, n uint64, what string) error {
		// Only the part inside the file: allocation must not change the
		// file size, which the entry's FlushedFileOffset is checked against.
		if off >= uint64(size) {
			return nil
		}
		n = min(n, uint64(size)-off)
		err := a.allocate(int64(off), int64(n))
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			j.space.unsupported = true
			return nil
		}
		if err != nil {
			return fmt.Errorf("reserve host space for %s at %#x+%#x: %w", what, off, n, noSpace(err))
		}
		return nil
	}
	if !j.space.logReserved {
		if err := alloc(j.lr.offset, uint64(j.lr.length), "the log"); err != nil {
			return err
		}
		j.space.logReserved = true
	}
	for i := 0; i < len(updates) && !j.space.unsupported; {
		u := updates[i]
		if u.data == nil {
			i++
			continue
		}
		// One call per run of consecutive sectors, as doCommit writes them.
		k := i + 1
		for k < len(updates) && updates[k].data != nil && updates[k].offset == updates[k-1].offset+logSectorSize {
			k++
		}
		if err := alloc(u.offset, uint64(k-i)*logSectorSize, "a metadata sector"); err != nil {
			return err
		}
		i = k
	}
	return nil
}
