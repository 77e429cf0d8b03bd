package vhdx

// Recovery after a live merge (or an offline Commit) was interrupted by a
// crash: the parent was open read-write, so its header still names a log
// (§2.3.3), and the chain's read-only open of a parent refuses a log that
// must be replayed (ErrDirtyLog). A child whose parent_linkage2 is set is
// the mark of such a merge (livemerge.go step 1, commit.go step 2).
//
// A read-write open of that child replays the parent's log first: the
// parent is opened alone read-write (which replays and clears LogGuid, a
// metadata-only session: DataWriteGuid is kept, so the link holds) and
// closed, and the chain then opens as usual. What the log holds are BAT
// and bitmap updates of blocks the merge wrote, all in sectors the child
// defines, so the chain reads what it read before the crash: the merge is
// abandoned cleanly. A candidate is replayed only if, replayed in memory,
// its DataWriteGuid is one of the child's two linkage keys: an unrelated
// file a stale locator path names is never written.

import (
	"errors"

	"github.com/google/uuid"
)

// replayInterruptedParent replays the log of im's parent when im's
// parent_linkage2 is set and the parent needs it. Failures are left for
// attachParent to report (it meets the same parent and says why).
func (im *Image) replayInterruptedParent(opts OpenOptions) {
	pl := im.l.locator
	if pl == nil || pl.linkage2 == uuid.Nil {
		return
	}
	for _, pp := range pl.parentCandidates(im.path) {
		q, err := openFile(pp, OpenOptions{ReadOnly: true, NoLock: opts.NoLock})
		if err == nil {
			q.Close()
			continue
		}
		if !errors.Is(err, ErrDirtyLog) {
			continue
		}
		q, err = openFile(pp, OpenOptions{ReadOnly: true, NoLock: opts.NoLock, ReplayLogInMemory: true})
		if err != nil {
			continue
		}
		dw := q.l.hdr.dataWriteGUID
		q.Close()
		if dw != pl.linkage && dw != pl.linkage2 {
			continue
		}
		if p, err := openFile(pp, OpenOptions{NoLock: opts.NoLock}); err == nil {
			p.Close()
		}
		return
	}
}
