package vhdx

// Commit: merging a differencing image's data into its parent, so that the
// parent alone reads what the chain read (`vhost-vhdx commit CHILD`).
//
// Crash safety rests on parent_linkage2 (§2.6.2.6.3: a parent whose
// DataWriteGuid equals either linkage key is the child's parent) and on the
// child hiding, sector by sector, every parent sector the merge changes:
//
//  1. Open the child alone read-write (exclusive lock, held to the end) and
//     its parent read-write (exclusive lock) with OpenOptions.DataWriteGUID
//     = G, a new GUID: the parent's first data write sets its DataWriteGuid
//     to G, not to a random one.
//  2. SetParentLinkage(current, G) on the child, journaled and flushed:
//     the child now accepts the parent before and after its first write.
//  3. Copy every run the child's own layer defines (LayerExtents: its
//     sectors, and zeros where it defines zeros) into the parent, then
//     flush and close the parent (which clears its LogGuid).
//  4. SetParentLinkage(G, Nil) on the child and close it.
//
// At every instant both files are valid VHDX files, the child's linkage
// matches the parent's DataWriteGuid, and the chain reads the same: the
// sectors of the parent that change are exactly those the child holds, and
// the child is not modified except for its locator. A crash in step 3
// leaves the parent with a log to replay (any read-write open, `check
// --repair`, or running Commit again, does it); running Commit again after
// a crash at any step completes the merge.
//
// The child keeps its data and stays linked to the updated parent: the
// chain reads the same as before, and the child may be deleted or kept.
// Other children of the parent (siblings of the child) no longer match the
// parent's new DataWriteGuid and are refused afterwards, as they must be:
// the data under them changed.

import (
	"fmt"
	"os"
	"sync"

	"github.com/google/uuid"
)

// commitStep names the points of Commit at which a hook of commitHooks is called.
type commitStep int

const (
	commitOpened       commitStep = iota // both files open, nothing changed
	commitLinked2                        // child's parent_linkage2 = G is durable
	commitCopied                         // one more piece of the child's data written to the parent
	commitFlushed                        // the parent's data is durable
	commitParentClosed                   // the parent is closed (LogGuid cleared)
	commitRelinked                       // child's parent_linkage = G, linkage2 dropped
)

func (s commitStep) String() string {
	switch s {
	case commitOpened:
		return "opened"
	case commitLinked2:
		return "linked2"
	case commitCopied:
		return "copied"
	case commitFlushed:
		return "flushed"
	case commitParentClosed:
		return "parent-closed"
	case commitRelinked:
		return "relinked"
	}
	return fmt.Sprintf("commitStep(%d)", int(s))
}

// commitHooks maps the child path a Commit was given to a function (tests
// only) called at each step of that Commit while the files are in the
// state the step names: the crash tests copy the files there. An error
// from it makes Commit fail at that point, as an I/O error would (the
// files are then closed). Keyed by path so that tests committing other
// files may run beside one that hooks its own.
var commitHooks sync.Map // string → func(commitStep) error

// commitPiece is the largest read and write of the copy.
const commitPiece = 4 * mib

// Commit merges the differencing image at childPath into its parent (see
// above for the protocol). progress, if not nil, is called after each piece
// with the bytes of the child's layer copied so far and the total.
func Commit(childPath string, progress func(done, total int64)) error {
	child, err := openFile(childPath, OpenOptions{})
	if err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if !child.l.hasParent {
		child.Close()
		return fmt.Errorf("commit %s: not a differencing image (it has no parent to commit into): %w", childPath, ErrInvalidArgument)
	}
	c := &committer{child: child, childPath: childPath, progress: progress}
	err = c.run()
	if c.parent != nil {
		if cerr := c.parent.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("commit %s: close parent %s: %w", childPath, c.parentPath, cerr)
		}
	}
	if cerr := child.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("commit %s: %w", childPath, cerr)
	}
	return err
}

type committer struct {
	child      *Image
	childPath  string
	parent     *Image // nil once closed
	parentPath string
	progress   func(done, total int64)
}

func (c *committer) hook(step commitStep) error {
	if f, ok := commitHooks.Load(c.childPath); ok {
		return f.(func(commitStep) error)(step)
	}
	return nil
}

func (c *committer) run() error {
	child := c.child
	g := uuid.New()
	parent, cur, err := c.openParent(g)
	if err != nil {
		return err
	}
	c.parent = parent
	path := c.parentPath
	runs, err := child.LayerExtents()
	if err != nil {
		return fmt.Errorf("commit %s: %w", c.childPath, err)
	}
	if err := c.hook(commitOpened); err != nil {
		return err
	}

	// Step 2: the child accepts the parent before and after its first write.
	if err := child.SetParentLinkage(cur, g); err != nil {
		return fmt.Errorf("commit %s: set parent_linkage2: %w", c.childPath, err)
	}
	if err := child.Flush(); err != nil {
		return fmt.Errorf("commit %s: %w", c.childPath, err)
	}
	if err := c.hook(commitLinked2); err != nil {
		return err
	}

	// Step 3: copy the child's layer.
	if err := c.copyLayer(runs); err != nil {
		return err
	}
	if err := parent.Flush(); err != nil {
		return fmt.Errorf("commit %s: flush parent %s: %w", c.childPath, path, err)
	}
	if err := c.hook(commitFlushed); err != nil {
		return err
	}
	// A child holding nothing leaves the parent unwritten: its
	// DataWriteGuid did not change, and the final linkage is the old one.
	final := parent.Info().DataWriteGUID
	c.parent = nil
	if err := parent.Close(); err != nil {
		return fmt.Errorf("commit %s: close parent %s: %w", c.childPath, path, err)
	}
	if err := c.hook(commitParentClosed); err != nil {
		return err
	}

	// Step 4.
	if err := child.SetParentLinkage(final, uuid.Nil); err != nil {
		return fmt.Errorf("commit %s: set parent_linkage: %w", c.childPath, err)
	}
	if err := child.Flush(); err != nil {
		return fmt.Errorf("commit %s: %w", c.childPath, err)
	}
	return c.hook(commitRelinked)
}

// openParent opens read-write, with DataWriteGUID g, the first file the
// child's locator names (§2.6.2.6.3 order, as Open tries them) that is the
// child's parent: its DataWriteGuid, returned as cur, is parent_linkage or
// parent_linkage2, and its geometry matches.
func (c *committer) openParent(g uuid.UUID) (parent *Image, cur uuid.UUID, err error) {
	child := c.child
	pl := child.l.locator
	tried := pl.parentCandidates(c.childPath)
	var firstErr error
	for _, pp := range tried {
		if fi, err := os.Stat(pp); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		p, err := Open(pp, OpenOptions{DataWriteGUID: g})
		if err != nil {
			err = fmt.Errorf("commit %s: open parent read-write: %w", c.childPath, err)
		} else {
			err = c.linksTo(p, pp)
		}
		if err != nil {
			if p != nil {
				p.Close()
			}
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		c.parentPath = pp
		return p, p.Info().DataWriteGUID, nil
	}
	if firstErr != nil {
		return nil, uuid.Nil, firstErr
	}
	return nil, uuid.Nil, fmt.Errorf("commit %s: parent_linkage %v: %s: %w", c.childPath, pl.linkage, describeTried(pl, tried), ErrParentNotFound)
}

// linksTo checks p (opened from pp) as the child's parent.
func (c *committer) linksTo(p *Image, pp string) error {
	child, pl := c.child, c.child.l.locator
	cur := p.Info().DataWriteGUID
	if cur != pl.linkage && (pl.linkage2 == uuid.Nil || cur != pl.linkage2) {
		return fmt.Errorf("commit %s: parent %s: its DataWriteGuid %v matches neither parent_linkage %v nor parent_linkage2 %v: %w",
			c.childPath, pp, cur, pl.linkage, pl.linkage2, ErrParentLinkage)
	}
	if p.l.size != child.l.size || p.l.logicalSector != child.l.logicalSector {
		return fmt.Errorf("commit %s: parent %s has virtual size %d and logical sector size %d, the child %d and %d: %w",
			c.childPath, pp, p.l.size, p.l.logicalSector, child.l.size, child.l.logicalSector, ErrParentGeometry)
	}
	return nil
}

// copyLayer writes the child's runs into the parent: its sectors (Data
// runs, read straight from the child's file) and zeros where the child
// defines zeros (Layer -1), skipping pieces the parent already reads as
// zeros. Runs the child leaves to the parent (Layer 1) are not touched.
func (c *committer) copyLayer(runs []Extent) error {
	var total, done int64
	for _, r := range runs {
		if r.Data || r.Layer < 0 {
			total += r.Length
		}
	}
	if c.progress != nil {
		c.progress(0, total)
	}
	buf := make([]byte, commitPiece)
	for _, r := range runs {
		if !r.Data && r.Layer >= 0 {
			continue
		}
		for off := int64(0); off < r.Length; off += commitPiece {
			n := min(commitPiece, r.Length-off)
			p := buf[:n]
			pos := r.Offset + off
			write := true
			if r.Data {
				if err := c.child.readPayload(p, uint64(r.FileOffset+off)); err != nil {
					return fmt.Errorf("commit %s: read the child at %#x: %w", c.childPath, pos, err)
				}
			} else {
				if _, err := c.parent.ReadAt(p, pos); err != nil {
					return fmt.Errorf("commit %s: read parent %s at %#x: %w", c.childPath, c.parentPath, pos, err)
				}
				write = !allZero(p)
				clear(p)
			}
			if write {
				if _, err := c.parent.WriteAt(p, pos); err != nil {
					return fmt.Errorf("commit %s: write parent %s at %#x: %w", c.childPath, c.parentPath, pos, err)
				}
			}
			done += n
			if c.progress != nil {
				c.progress(done, total)
			}
			if err := c.hook(commitCopied); err != nil {
				return err
			}
		}
	}
	return nil
}
