package vhdx

import (
	"errors"
	"fmt"
	"os"
)

// Problem is one finding of Check.
type Problem struct {
	Offset   int64  // file offset of the offending structure, -1 if none
	What     string // the rule broken, naming the structure
	Repaired bool
	// Leak marks unused space at the end of the file. It is not damage:
	// nothing references it, new blocks are allocated after it, and
	// qemu-img creates images with such a tail. --repair truncates it.
	Leak bool
}

// CheckReport is the result of Check.
type CheckReport struct {
	Problems    []Problem
	LogReplayed bool
	LeakedBytes int64 // file bytes past the last used structure (rounded to 1 MiB)
}

// Damaged reports whether any problem other than leaked space remains
// unrepaired.
func (r *CheckReport) Damaged() bool {
	for _, p := range r.Problems {
		if !p.Repaired && !p.Leak {
			return true
		}
	}
	return false
}

// Check validates the image at path, collecting every problem it can rather
// than stopping at the first. Without repair the image is opened read-only
// (shared lock) and an active log is reported. With repair it is opened
// read-write (exclusive lock): the log is replayed and leaked space at the
// end of the file is truncated, provided nothing else is wrong.
//
// The returned error is non-nil when the check could not complete (the file
// cannot be opened, is locked, or a structure the rest depends on is
// broken); the report then still lists what was found, including that error.
func Check(path string, repair bool) (*CheckReport, error) {
	rep := &CheckReport{}
	flag := os.O_RDONLY
	if repair {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("check %s: %w", path, err)
	}
	defer f.Close()
	if err := lockFile(f, repair); err != nil {
		return nil, fmt.Errorf("check %s: %w", path, err)
	}
	c := &checker{collect: true}
	im, err := openStorage(osStorage{f}, OpenOptions{ReadOnly: !repair}, c)
	rep.Problems = c.listProblems()
	if err != nil {
		rep.Problems = append(rep.Problems, Problem{Offset: errorOffset(err), What: err.Error()})
		return rep, fmt.Errorf("check %s: %w", path, err)
	}
	im.f = f
	im.path = path
	if im.l.hasParent {
		// The chain below must open and link (§2.6.2.6.3); a broken link
		// is damage reported like any other, naming the layer at fault.
		cs := &chainState{}
		if id, err := fileIDOf(f); err == nil {
			cs.seen = append(cs.seen, id)
		}
		if err := im.attachParent(OpenOptions{ReadOnly: true, ReplayLogInMemory: !repair}, cs); err != nil {
			rep.Problems = append(rep.Problems, Problem{Offset: -1, What: err.Error()})
		}
	}
	if im.logReplayed {
		rep.LogReplayed = true
		rep.Problems = append(rep.Problems, Problem{
			Offset:   int64(im.l.hdr.logOffset),
			What:     fmt.Sprintf("log at offset %#x held updates that were not applied", im.l.hdr.logOffset),
			Repaired: true,
		})
	}
	damaged := rep.Damaged()

	usedEnd := roundUp(c.usedEnd, alignment)
	if im.l.fileSize > usedEnd {
		rep.LeakedBytes = int64(im.l.fileSize - usedEnd)
		p := Problem{
			Offset: int64(usedEnd),
			What: fmt.Sprintf("%d bytes at offset %#x past the last used structure are leaked",
				rep.LeakedBytes, usedEnd),
			Leak: true,
		}
		// Truncate only an otherwise sound image: a BAT entry we refused
		// may still point into the tail.
		if repair && !damaged {
			if err := im.truncateLeak(usedEnd); err != nil {
				im.Close()
				return rep, fmt.Errorf("check %s: %w", path, err)
			}
			p.Repaired = true
		}
		rep.Problems = append(rep.Problems, p)
	}
	if err := im.Close(); err != nil && !errors.Is(err, ErrClosed) {
		return rep, fmt.Errorf("check %s: %w", path, err)
	}
	return rep, nil
}

// truncateLeak cuts the file to end, after the session header update that
// must precede any modification (§2.2.2.1).
func (im *Image) truncateLeak(end uint64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.beginSessionLocked(); err != nil {
		return err
	}
	if err := im.s.Truncate(int64(end)); err != nil {
		return fmt.Errorf("truncate leaked space at %#x: %w", end, err)
	}
	im.fileEnd = end
	return im.s.Sync()
}
