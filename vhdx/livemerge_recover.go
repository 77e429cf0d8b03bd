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
//
// Once the chain is open, a read-write open also settles the linkage when
// the parent's DataWriteGuid is parent_linkage2 (the merge had written the
// parent): parent_linkage becomes it and parent_linkage2 is dropped, as
// Commit's last step does. The old parent_linkage can never match again
// (DataWriteGuids are not reused), so nothing is lost, and readers that
// only know parent_linkage (libvhdi) read the chain again. A linkage2
// set ahead of a parent's change (the parent still has the old
// DataWriteGuid) is left alone.

import (
	"errors"
	"fmt"

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
		open := func(o OpenOptions) (*Image, error) {
			o.NoLock = opts.NoLock
			return openFile(pp, o)
		}
		if replayLinkedParent(pl, open) {
			return
		}
	}
}

// replayLinkedParent replays the log of the candidate parent open opens
// (with the options given) if it has one that must be replayed and its
// DataWriteGuid, replayed in memory, is one of pl's linkage keys. It
// reports whether it did.
func replayLinkedParent(pl *parentLocator, open func(OpenOptions) (*Image, error)) bool {
	q, err := open(OpenOptions{ReadOnly: true})
	if err == nil {
		q.Close()
		return false
	}
	if !errors.Is(err, ErrDirtyLog) {
		return false
	}
	if q, err = open(OpenOptions{ReadOnly: true, ReplayLogInMemory: true}); err != nil {
		return false
	}
	dw := q.l.hdr.dataWriteGUID
	q.Close()
	if dw != pl.linkage && dw != pl.linkage2 {
		return false
	}
	p, err := open(OpenOptions{})
	if err != nil {
		return false
	}
	return p.Close() == nil
}

// settleInterruptedLinkage: see above. Read-write opens of a child only.
func (im *Image) settleInterruptedLinkage() error {
	pl := im.l.locator
	if im.readOnly || im.parent == nil || pl == nil || pl.linkage2 == uuid.Nil {
		return nil
	}
	dw := im.parent.l.hdr.dataWriteGUID
	if dw != pl.linkage2 || dw == pl.linkage {
		return nil
	}
	if err := im.SetParentLinkage(dw, uuid.Nil); err != nil {
		return fmt.Errorf("%s: settle parent_linkage after an interrupted merge: %w", im.path, err)
	}
	return nil
}
