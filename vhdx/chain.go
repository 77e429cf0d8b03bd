package vhdx

// Differencing chains: opening a child's parents and reading through them.
//
// A child (HasParent, §2.6.2.1) names its parent in the parent locator
// (§2.6.2.6). Open resolves it (locator.go), opens it read-only with a
// shared lock, recursively, and validates each link once: the parent's
// DataWriteGuid is the child's parent_linkage or parent_linkage2, the logical
// sector sizes and virtual sizes agree, no file appears twice (device and
// inode), and there are at most MaxChainDepth parents. The child owns its
// parent: closing it closes the chain.

import (
	"fmt"
	"os"
	"strings"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

type fileID struct{ dev, ino uint64 }

// chainState is what one Open of a chain carries down the layers.
type chainState struct {
	seen []fileID
}

func (cs *chainState) has(id fileID) bool {
	for _, s := range cs.seen {
		if s == id {
			return true
		}
	}
	return false
}

func fileIDOf(f *os.File) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileID{}, err
	}
	return fileID{uint64(st.Dev), uint64(st.Ino)}, nil
}

func openChain(path string, opts OpenOptions, cs *chainState) (*Image, error) {
	im, err := openFile(path, opts)
	if err != nil {
		return nil, err
	}
	id, err := fileIDOf(im.f)
	if err != nil {
		im.Close()
		return nil, fmt.Errorf("%s: stat: %w", path, err)
	}
	cs.seen = append(cs.seen, id)
	if im.l.hasParent {
		if !opts.ReadOnly {
			im.replayInterruptedParent(opts) // livemerge_recover.go
		}
		if err := im.attachParent(opts, cs); err != nil {
			im.Close()
			return nil, err
		}
		if err := im.refreshLocator(); err != nil {
			im.Close()
			return nil, err
		}
		if err := im.settleInterruptedLinkage(); err != nil { // livemerge_recover.go
			im.Close()
			return nil, err
		}
	}
	return im, nil
}

// refreshLocator: §2.6.2.6.3 asks that, once a chain opens, stale path
// entries be updated to the current parent. A read-write open whose parent
// was not found through relative_path rewrites relative_path and
// absolute_win32_path (a metadata-only update: DataWriteGuid is kept);
// other keys, volume_path included, are left as they are. A read-only
// open never writes.
func (im *Image) refreshLocator() error {
	if im.readOnly || im.parent == nil {
		return nil
	}
	pl := im.l.locator
	if rel, ok := pl.get(keyRelativePath); ok && rel != "" {
		if c := pl.parentCandidates(im.path); len(c) > 0 && c[0] == im.parent.path {
			return nil
		}
	}
	fresh, err := newParentLocator(im.path, im.parent.path, pl.linkage)
	if err != nil {
		return nil // a path we cannot express: keep the locator as it is
	}
	np := pl.clone()
	for _, k := range []string{keyRelativePath, keyAbsolutePath} {
		v, _ := fresh.get(k)
		np.set(k, v)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.rewriteLocatorLocked(np); err != nil {
		return fmt.Errorf("%s: update the stale parent locator paths: %w", im.path, err)
	}
	return nil
}

// parentOpenOptions: parents are read-only, share the lock mode and the
// in-memory replay choice of the top.
func parentOpenOptions(opts OpenOptions) OpenOptions {
	return OpenOptions{ReadOnly: true, NoLock: opts.NoLock, ReplayLogInMemory: opts.ReplayLogInMemory}
}

// attachParent finds, opens and validates im's parent. Each locator path
// naming an existing file is tried in order (§2.6.2.6.3) until one is the
// parent: a stale relative_path naming another image must not hide a good
// absolute_win32_path. A candidate is checked (loop, linkage, geometry)
// before its own parents are opened, and once one passes, a failure further
// down is final, so opening a chain costs one open per layer, whatever the
// locators say. With no candidate passing, the first failure is returned.
func (im *Image) attachParent(opts OpenOptions, cs *chainState) error {
	pl := im.l.locator
	if len(cs.seen) > maxChainDepth {
		return fmt.Errorf("%s: differencing image: more than %d parents below the top (parent_linkage %v): %w", im.path, maxChainDepth, pl.linkage, ErrChainTooDeep)
	}
	tried := pl.parentCandidates(im.path)
	var firstErr error
	for _, pp := range tried {
		if fi, err := os.Stat(pp); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		parent, err := im.openCandidate(pp, pl, tried, opts, cs)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if parent.l.hasParent {
			if err := parent.attachParent(parentOpenOptions(opts), cs); err != nil {
				parent.Close()
				return fmt.Errorf("%s: differencing image: parent %s (%s): %w", im.path, pp, describeTried(pl, tried), err)
			}
		}
		im.parent = parent
		im.depth = parent.depth + 1
		return nil
	}
	if firstErr != nil {
		return firstErr
	}
	return fmt.Errorf("%s: differencing image: %s (parent_linkage %v): %w",
		im.path, describeTried(pl, tried), pl.linkage, ErrParentNotFound)
}

// openCandidate opens the file pp alone and checks it as im's parent (not a
// layer already, linkage, geometry). On success pp is recorded as a layer.
func (im *Image) openCandidate(pp string, pl *parentLocator, tried []string, opts OpenOptions, cs *chainState) (*Image, error) {
	desc := fmt.Sprintf("parent %s (%s)", pp, describeTried(pl, tried))
	// A loop is found before opening the file again: a second open would
	// meet this chain's own (exclusive) lock first.
	var st unix.Stat_t
	if err := unix.Stat(pp, &st); err == nil && cs.has(fileID{uint64(st.Dev), uint64(st.Ino)}) {
		return nil, fmt.Errorf("%s: differencing image: %s: %s (device %d, inode %d) is already a layer of this chain (parent_linkage %v): %w",
			im.path, desc, pp, st.Dev, st.Ino, pl.linkage, ErrChainLoop)
	}
	parent, err := openFile(pp, parentOpenOptions(opts))
	if err != nil {
		return nil, fmt.Errorf("%s: differencing image: %s: %w", im.path, desc, err)
	}
	id, err := fileIDOf(parent.f)
	if err == nil && cs.has(id) { // replaced between the stat and the open
		err = fmt.Errorf("%s: differencing image: %s: %s (device %d, inode %d) is already a layer of this chain (parent_linkage %v, its DataWriteGuid %v): %w",
			im.path, desc, pp, id.dev, id.ino, pl.linkage, parent.l.hdr.dataWriteGUID, ErrChainLoop)
	}
	if err == nil {
		err = im.checkParent(parent, desc)
	}
	if err != nil {
		parent.Close()
		return nil, err
	}
	cs.seen = append(cs.seen, id)
	return parent, nil
}

func describeTried(pl *parentLocator, tried []string) string {
	msg := "locator paths tried: " + strings.Join(quoteAll(tried), ", ")
	if len(tried) == 0 {
		msg = "the locator holds no path usable here"
	}
	if v, ok := pl.get(keyVolumePath); ok {
		msg += fmt.Sprintf("; volume_path %q cannot be resolved here", v)
	}
	return msg
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}

// linkParent validates parent as im's parent and attaches it. On failure
// parent is left open for the caller to close.
func (im *Image) linkParent(parent *Image, desc string) error {
	if err := im.checkParent(parent, desc); err != nil {
		return err
	}
	im.parent = parent
	im.depth = parent.depth + 1
	return nil
}

// checkParent validates parent (its own file; its chain is not needed) as
// im's parent: linkage (§2.6.2.6.3), logical sector and virtual size.
func (im *Image) checkParent(parent *Image, desc string) error {
	pl := im.l.locator
	child := im.path
	if child == "" {
		child = "differencing image"
	}
	pdw := parent.l.hdr.dataWriteGUID
	if pdw != pl.linkage && (pl.linkage2 == uuid.Nil || pdw != pl.linkage2) {
		l2 := "absent"
		if pl.linkage2 != uuid.Nil {
			l2 = pl.linkage2.String()
		}
		return fmt.Errorf("%s: %s: its DataWriteGuid %v matches neither the child's parent_linkage %v nor parent_linkage2 (%s); the parent was modified after the child was made: %w",
			child, desc, pdw, pl.linkage, l2, ErrParentLinkage)
	}
	if parent.l.logicalSector != im.l.logicalSector {
		return fmt.Errorf("%s: %s: logical sector size %d differs from the child's %d (parent DataWriteGuid %v, child parent_linkage %v): %w",
			child, desc, parent.l.logicalSector, im.l.logicalSector, pdw, pl.linkage, ErrParentGeometry)
	}
	if parent.l.size != im.l.size {
		return fmt.Errorf("%s: %s: virtual size %d differs from the child's %d (parent DataWriteGuid %v, child parent_linkage %v): %w",
			child, desc, parent.l.size, im.l.size, pdw, pl.linkage, ErrParentGeometry)
	}
	return nil
}

// openStorageWithParent opens a differencing image on s over an already
// open parent (tests and fault injection, where there are no paths). The
// parent is validated as Open would; on success the child owns it.
func openStorageWithParent(s Storage, opts OpenOptions, parent *Image) (*Image, error) {
	im, err := openStorage(s, opts, nil)
	if err != nil {
		return nil, err
	}
	if !im.l.hasParent {
		im.Close()
		return nil, fmt.Errorf("image has no parent: %w", ErrInvalidArgument)
	}
	if err := im.linkParent(parent, "parent"); err != nil {
		im.Close()
		return nil, err
	}
	return im, nil
}

// Parent returns the image's parent layer, nil for a base image. It is owned
// by im: do not close it.
func (im *Image) Parent() *Image { return im.parent }

// Path is the path the image was opened with ("" for OpenStorage).
func (im *Image) Path() string { return im.path }

// Depth is the number of layers below this one (0 for a base image).
func (im *Image) Depth() int { return im.depth }

// readLayer reads [pos, pos+len(p)) of the virtual disk as this layer and
// the ones below it see it. The range is already validated.
func (im *Image) readLayer(p []byte, pos uint64) error {
	if im.parent == nil {
		return im.readBase(p, pos)
	}
	return im.readChain(p, pos)
}

// readBase reads from an image without parent: FULLY_PRESENT blocks from
// the file, everything else as zeros.
func (im *Image) readBase(p []byte, pos uint64) error {
	for len(p) > 0 {
		_, e, in, left := im.locate(pos)
		n := min(uint64(len(p)), left)
		if batState(e) == stateFullyPresent {
			if err := im.readPayload(p[:n], batFileOffset(e)+in); err != nil {
				return err
			}
		} else {
			clear(p[:n])
		}
		p = p[n:]
		pos += n
	}
	return nil
}

// readChain reads through a differencing image (§2.5.1.1, as for a
// differencing file): FULLY_PRESENT from this file; NOT_PRESENT from the
// parent; PARTIALLY_PRESENT sector run by sector run, set bits from this
// file and clear ones from the parent; ZERO as zeros. UNDEFINED and UNMAPPED
// (3, and 5 of the v0.95 draft) read as zeros too: for every file type their
// contents are "not defined in the file" or "zero or the block's old
// contents", and zeros is the choice that leaks nothing; the parent is not
// consulted, since those states are not "not present".
func (im *Image) readChain(p []byte, pos uint64) error {
	for len(p) > 0 {
		_, e, in, left := im.locate(pos)
		n := min(uint64(len(p)), left)
		var err error
		switch batState(e) {
		case stateFullyPresent:
			err = im.readPayload(p[:n], batFileOffset(e)+in)
		case stateNotPresent:
			err = im.parent.readLayer(p[:n], pos)
		case statePartiallyPresent:
			err = im.readPartial(p[:n], pos, batFileOffset(e)+in)
		default:
			clear(p[:n])
		}
		if err != nil {
			return err
		}
		p = p[n:]
		pos += n
	}
	return nil
}

// readPartial reads p (inside one PARTIALLY_PRESENT block, at fileOff in
// this file) run by run of the sector bitmap.
func (im *Image) readPartial(p []byte, pos, fileOff uint64) error {
	lss := uint64(im.l.logicalSector)
	for len(p) > 0 {
		// A ReadVec buffer may start or end inside a sector.
		sec := pos / lss
		endSec := (pos + uint64(len(p)) + lss - 1) / lss
		run, set, err := im.bitmapRun(sec, endSec-sec)
		if err != nil {
			return err
		}
		n := min(uint64(len(p)), (sec+run)*lss-pos)
		if set {
			err = im.readPayload(p[:n], fileOff)
		} else {
			err = im.parent.readLayer(p[:n], pos)
		}
		if err != nil {
			return err
		}
		p = p[n:]
		pos += n
		fileOff += n
	}
	return nil
}
