package vhdx

// Rewriting a child's parent locator: Rebase (point a child at another
// parent without touching data) and SetParentLinkage (the linkage keys, for
// a merge). Both are journaled metadata updates (§2.3) and leave
// DataWriteGuid alone: what the child's own layer holds does not change.

import (
	"encoding/binary"
	"fmt"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

// SetParentLinkage rewrites parent_linkage and parent_linkage2 of a child
// opened read-write (uuid.Nil linkage2 removes that key), through the log.
// A merge uses it to keep the child valid while the parent's DataWriteGuid
// changes (§2.6.2.6.3, footnote 12).
func (im *Image) SetParentLinkage(linkage, linkage2 uuid.UUID) error {
	if im.readOnly {
		return fmt.Errorf("set parent linkage: %w", ErrReadOnly)
	}
	if !im.l.hasParent {
		return fmt.Errorf("set parent linkage: image has no parent: %w", ErrInvalidArgument)
	}
	if linkage == uuid.Nil {
		return fmt.Errorf("set parent linkage: parent_linkage must not be zero: %w", ErrInvalidArgument)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	pl := im.l.locator.clone()
	pl.set(keyParentLinkage, formatLinkage(linkage))
	pl.linkage = linkage
	l2 := ""
	if linkage2 != uuid.Nil {
		l2 = formatLinkage(linkage2)
	}
	pl.set(keyParentLinkage2, l2)
	pl.linkage2 = linkage2
	return im.rewriteLocatorLocked(pl)
}

func (pl *parentLocator) clone() *parentLocator {
	c := *pl
	c.entries = append([]locatorEntry(nil), pl.entries...)
	return &c
}

// Rebase points the differencing image at childPath to newParentPath
// (an unsafe rebase, as qemu-img calls it: the data of neither file is read
// or changed). The locator gets relative_path and absolute_win32_path for the new parent and
// parent_linkage = its DataWriteGuid; parent_linkage2 and volume_path, stale
// now, are dropped; other keys are kept. The old parent need not exist. The
// new parent's chain must open, have the child's virtual and logical sector
// size, and not contain the child.
func Rebase(childPath, newParentPath string) error {
	im, err := openFile(childPath, OpenOptions{})
	if err != nil {
		return fmt.Errorf("rebase: %w", err)
	}
	if !im.l.hasParent {
		im.Close()
		return fmt.Errorf("rebase %s: not a differencing image: %w", childPath, ErrInvalidArgument)
	}
	parent, err := Open(newParentPath, OpenOptions{ReadOnly: true})
	if err != nil {
		im.Close()
		return fmt.Errorf("rebase %s: new parent: %w", childPath, err)
	}
	err = rebaseOnto(im, childPath, parent, newParentPath)
	parent.Close()
	if cerr := im.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("rebase %s: %w", childPath, cerr)
	}
	return err
}

func rebaseOnto(im *Image, childPath string, parent *Image, parentPath string) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(im.f.Fd()), &st); err != nil {
		return fmt.Errorf("rebase %s: stat: %w", childPath, err)
	}
	for p := parent; p != nil; p = p.parent {
		var ps unix.Stat_t
		if err := unix.Fstat(int(p.f.Fd()), &ps); err != nil {
			return fmt.Errorf("rebase %s: stat %s: %w", childPath, p.path, err)
		}
		if ps.Dev == st.Dev && ps.Ino == st.Ino {
			return fmt.Errorf("rebase %s: %s is the child itself or one of its layers: %w", childPath, p.path, ErrChainLoop)
		}
	}
	if parent.l.logicalSector != im.l.logicalSector || parent.l.size != im.l.size {
		return fmt.Errorf("rebase %s: new parent %s has virtual size %d and logical sector size %d, the child %d and %d: %w",
			childPath, parentPath, parent.l.size, parent.l.logicalSector, im.l.size, im.l.logicalSector, ErrParentGeometry)
	}
	pl, err := newParentLocator(childPath, parentPath, parent.l.hdr.dataWriteGUID)
	if err != nil {
		return fmt.Errorf("rebase %s: %w", childPath, err)
	}
	for _, e := range im.l.locator.entries {
		switch e.key {
		case keyParentLinkage, keyParentLinkage2, keyRelativePath, keyVolumePath, keyAbsolutePath:
		default:
			pl.set(e.key, e.value)
		}
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.rewriteLocatorLocked(pl); err != nil {
		return fmt.Errorf("rebase %s: %w", childPath, err)
	}
	return nil
}

// rewriteLocatorLocked replaces the parent locator item with pl in one
// journal entry: in place when it fits the old item, else after the last
// item of the metadata region, with the table entry updated. Caller holds
// im.mu.
func (im *Image) rewriteLocatorLocked(pl *parentLocator) error {
	if im.closed.Load() {
		return fmt.Errorf("parent locator: %w", ErrClosed)
	}
	nb, err := pl.encode()
	if err != nil {
		return err
	}
	if err := im.beginSessionLocked(); err != nil {
		return err
	}
	meta := im.l.meta
	table := make([]byte, metadataTableSize)
	if err := readFull(im.s, table, meta.offset, "metadata table"); err != nil {
		return err
	}
	le := binary.LittleEndian
	count := int(le.Uint16(table[mdOffEntryCount:])) // validated at open
	old := im.l.locatorItem
	entry := int(old.entryOff - meta.offset)
	newOff := uint64(old.offset)
	if uint32(len(nb)) > old.length {
		end := uint64(mdItemMinOffset)
		for i := 0; i < count; i++ {
			e := table[mdHeaderSize+i*mdEntrySize:]
			end = max(end, uint64(le.Uint32(e[mdeOffOffset:]))+uint64(le.Uint32(e[mdeOffLength:])))
		}
		newOff = end
		if newOff+uint64(len(nb)) > uint64(meta.length) {
			return fmt.Errorf("parent locator of %d bytes does not fit the metadata region (free space from %#x of %#x): %w",
				len(nb), newOff, meta.length, ErrUnsupported)
		}
	}
	// The sectors to rewrite: the table sector holding the entry and those
	// the new item covers, each read, patched and journaled whole.
	var updates []logUpdate
	sector := func(off uint64) ([]byte, error) {
		sec := off &^ (logSectorSize - 1)
		for _, u := range updates {
			if u.offset == meta.offset+sec {
				return u.data, nil
			}
		}
		b := make([]byte, logSectorSize)
		if err := readFull(im.s, b, meta.offset+sec, "metadata region"); err != nil {
			return nil, err
		}
		updates = append(updates, logUpdate{offset: meta.offset + sec, data: b})
		return b, nil
	}
	eb, err := sector(uint64(entry))
	if err != nil {
		return err
	}
	ein := entry % logSectorSize
	le.PutUint32(eb[ein+mdeOffOffset:], uint32(newOff))
	le.PutUint32(eb[ein+mdeOffLength:], uint32(len(nb)))
	for i := 0; i < len(nb); {
		off := newOff + uint64(i)
		b, err := sector(off)
		if err != nil {
			return err
		}
		i += copy(b[off%logSectorSize:], nb[i:])
	}
	if err := im.growTo(im.fileEnd); err != nil {
		return err
	}
	if err := im.journal.commit(updates, im.fileEnd, im.fileEnd); err != nil {
		return fmt.Errorf("parent locator: commit through the log: %w", err)
	}
	im.l.locator = pl
	im.l.locatorItem.offset, im.l.locatorItem.length = uint32(newOff), uint32(len(nb))
	return nil
}
