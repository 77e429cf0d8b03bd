package vhdx

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

// ImageType is the kind of VHDX image.
type ImageType int

const (
	Dynamic ImageType = iota
	Fixed
	Differencing
)

func (t ImageType) String() string {
	switch t {
	case Dynamic:
		return "dynamic"
	case Fixed:
		return "fixed"
	case Differencing:
		return "differencing"
	}
	return fmt.Sprintf("ImageType(%d)", int(t))
}

// MarshalText makes Info.Type appear as "dynamic"/"fixed" in JSON.
func (t ImageType) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// OpenOptions control Open and OpenStorage.
type OpenOptions struct {
	ReadOnly bool
	NoLock   bool // skip the file lock (inspection tools, tests)
	// ReplayLogInMemory: a read-only open of an image whose log holds
	// updates replays them in memory instead of refusing with ErrDirtyLog.
	// The file is not modified. For inspection tools (info, map) looking at
	// an image a daemon is serving, or at a dirty image.
	ReplayLogInMemory bool
	// DataWriteGUID, when non-zero, is the DataWriteGuid written before the
	// first data write of this session instead of a random one (§2.2.2; a
	// merge keeps a child linked through parent_linkage2 with it).
	DataWriteGUID uuid.UUID
}

// Image is an open VHDX image. ReadAt/WriteAt/ReadVec/WriteVec and Flush are
// safe for concurrent use; Close must not race with them.
type Image struct {
	s        Storage
	latch    *syncLatch // s for read-write opens (storage.go); nil read-only
	hostIO   hostIOCounters
	f        *os.File // nil for OpenStorage
	view     fileView // small payload reads copied from a mapping of f (fileview.go)
	readOnly bool
	closed   atomic.Bool

	l           layout
	bat         *batTable // indexed by BAT entry index; read without locks (battable.go)
	logReplayed bool
	allocated   atomic.Uint64 // FULLY_PRESENT payload blocks, for Info
	counters    counters      // for Counters (counters.go)

	// mu serialises block allocation, header updates and Close. Data I/O to
	// allocated blocks never takes it.
	// Differencing images (chain.go): the parent layer, opened read-only
	// and owned by this image (closed with it), and the sector bitmap cache.
	parent  *Image
	path    string // as opened; "" for OpenStorage
	depth   int    // layers below this one
	bitmaps *bitmapCache
	opts    OpenOptions

	mu          sync.Mutex
	session     atomic.Bool // headers updated for this session (§2.2.2.1); set under mu
	dataSession atomic.Bool // DataWriteGuid rotated for this session; set under mu
	journal     *journal    // created with the session's log GUID; under mu
	fileEnd     uint64      // next free 1 MiB-aligned offset; under mu
	modified    bool        // any write happened this session; under mu

	ep    epochs       // grace periods for reusing freed space (epoch.go)
	space freeSpace    // free file space (space.go); under mu
	trims pendingTrims // trimmed blocks awaiting their group commit (discard.go); under mu
	ag    allocGroup   // allocation batches (groupcommit.go); under mu

	// Test hooks, nil in production: hookLoaded runs in ReadAt and WriteAt
	// after a FULLY_PRESENT entry was loaded and before its range is used;
	// beforeReuse when reserveBlock hands out freed space;
	// beforeTrimCommit just before a discard's BAT commit.
	hookLoaded       func(entry uint64)
	beforeReuse      func(off uint64)
	beforeTrimCommit func()
}

func isCorrupt(err error) bool { return errors.Is(err, ErrCorrupt) }

// Open opens the image at path. A read-write open takes an exclusive OFD lock
// on the whole file and a read-only open a shared one, unless NoLock is set.
// A differencing image opens its parents too, read-only (see chain.go).
func Open(path string, opts OpenOptions) (*Image, error) {
	return openChain(path, opts, &chainState{})
}

// openFile opens one file of a chain (no parents).
func openFile(path string, opts OpenOptions) (*Image, error) {
	return openFileWith(path, opts, openStorage)
}

// openFileWith opens the file at path and reads it with open: openStorage,
// or openMetadata for callers that need no BAT.
func openFileWith(path string, opts OpenOptions, open func(Storage, OpenOptions, *checker) (*Image, error)) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if !opts.NoLock {
		if err := lockFile(f, !opts.ReadOnly); err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	im, err := open(osStorage{f}, opts, nil)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	im.f = f
	im.path = path
	return im, nil
}

// lockFile takes an OFD lock (F_OFD_SETLK) over the whole file: write for
// read-write opens, read for read-only ones. QEMU uses OFD locks too, so the
// two exclude each other. The lock goes away when the file is closed.
func lockFile(f *os.File, exclusive bool) error {
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 0, Len: 0}
	if exclusive {
		lk.Type = unix.F_WRLCK
	}
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EACCES):
			return fmt.Errorf("image is in use by another process: %w", ErrInUse)
		}
		return fmt.Errorf("lock image: %w", err)
	}
}

// OpenStorage opens an image on s without locking (tests, fault injection).
// A differencing image cannot find its parent without a path and is refused
// with ErrParentNotFound.
func OpenStorage(s Storage, opts OpenOptions) (*Image, error) {
	im, err := openStorage(s, opts, nil)
	if err != nil {
		return nil, err
	}
	if im.l.hasParent {
		im.Close()
		return nil, fmt.Errorf("differencing image on a storage without a path: parent_linkage %v: %w", im.l.locator.linkage, ErrParentNotFound)
	}
	return im, nil
}

func fileSizeOf(s Storage) (uint64, error) {
	sz, err := s.Size()
	if err != nil {
		return 0, fmt.Errorf("file size: %w", err)
	}
	if sz < 0 {
		return 0, fmt.Errorf("file size %d is negative: %w", sz, ErrCorrupt)
	}
	return uint64(sz), nil
}

// openStorage runs every validation of MS-VHDX §2 in order. With a
// collecting checker (Check) it records what it can and continues; it still
// stops when the next step would depend on a broken structure.
func openStorage(s Storage, opts OpenOptions, c *checker) (*Image, error) {
	im, err := openMetadata(s, opts, c)
	if err != nil {
		return nil, err
	}
	l := &im.l
	res, err := loadBAT(im.s, l, c)
	if err != nil {
		return nil, err
	}
	im.bat = res.entries
	if l.hasParent {
		im.bitmaps = newBitmapCache()
	}
	im.allocated.Store(res.allocated)
	im.fileEnd = roundUp(max(l.fileSize, res.usedEnd), alignment)
	if c != nil {
		c.usedEnd = res.usedEnd
	}
	return im, nil
}

// openMetadata is openStorage up to, not including, the BAT: the headers,
// the log, the region table and the metadata (geometry, parent locator).
// The Image it returns has no BAT and serves no I/O; it is for callers that
// only need the layout (ChainFiles follows locators with it: reading a
// 512 MiB BAT to learn a parent's path would dominate a chain walk).
func openMetadata(s Storage, opts OpenOptions, c *checker) (*Image, error) {
	im := &Image{readOnly: opts.ReadOnly, opts: opts}
	if !opts.ReadOnly {
		latch := &syncLatch{Storage: s}
		latch.group.syncs = &im.counters.syncs
		im.latch = latch
		s = latch
	}
	im.s = s
	l := &im.l
	var err error
	if l.fileSize, err = fileSizeOf(s); err != nil {
		return nil, err
	}
	if l.creator, err = readFileID(s); err != nil {
		return nil, err
	}
	if l.hdr, l.hdrSlot, err = readHeaders(s, c); err != nil {
		return nil, err
	}
	if err := validateHeader(l.hdr, l.hdrSlot, l.fileSize); err != nil {
		return nil, err
	}

	// §2.3.3: the log must be replayed before any other structure is read.
	if l.hdr.logGUID != uuid.Nil {
		// Replaying writes to the file; first make sure the image that
		// replay produces passes every check, by replaying in memory and
		// validating that. An image we refuse is left exactly as it was.
		if !opts.ReadOnly && c == nil {
			dry, err := openStorage(s, OpenOptions{ReadOnly: true, ReplayLogInMemory: true}, nil)
			if err != nil {
				return nil, err
			}
			dry.Close()
		}
		if err := im.handleLog(opts, c); err != nil {
			return nil, err
		}
		// An in-memory replay swaps im.s for an overlay; everything after
		// the log reads through it.
		s = im.s
		if l.fileSize, err = fileSizeOf(s); err != nil {
			return nil, err
		}
	}

	if err := readRegionTables(s, l, c); err != nil {
		return nil, err
	}
	if err := readMetadata(s, l); err != nil {
		return nil, err
	}
	return im, nil
}

func (im *Image) logRegion() logRegion {
	return logRegion{offset: im.l.hdr.logOffset, length: im.l.hdr.logLength, guid: im.l.hdr.logGUID}
}

// handleLog deals with a non-zero LogGuid at open (§2.3.3). Read-only opens
// refuse an active log, as QEMU does; read-write opens replay it after giving
// the file a new FileWriteGuid (§2.2.2: before any modification, including
// log playback) and then clear LogGuid so the image reads as clean.
func (im *Image) handleLog(opts OpenOptions, c *checker) error {
	lr := im.logRegion()
	off := headerOffset(im.l.hdrSlot)
	if im.readOnly {
		active, err := hasActiveLog(im.s, lr)
		if err != nil {
			return err
		}
		if active && opts.ReplayLogInMemory {
			ov, err := newOverlayStorage(im.s)
			if err != nil {
				return err
			}
			if im.logReplayed, err = replayLog(ov, lr); err != nil {
				return err
			}
			im.s = ov
			return nil
		}
		if active {
			err := errAt(ErrDirtyLog, off, headerName(im.l.hdrSlot),
				"log %v holds updates that were not applied; run `vhost-vhdx check --repair IMAGE` to replay it", lr.guid)
			if c != nil && c.collect {
				c.dirtyLog = true
			}
			return err
		}
		return nil
	}
	if err := im.updateHeaders(func(h *header) { h.fileWriteGUID = uuid.New() }); err != nil {
		return err
	}
	replayed, err := replayLog(im.s, lr)
	if err != nil {
		return err
	}
	im.logReplayed = replayed
	return im.updateHeaders(func(h *header) { h.logGUID = uuid.Nil })
}

// updateHeaders applies mut to the current header and writes it twice as
// §2.2.2.1 describes: first over the non-current header with SequenceNumber
// + 1, flushed, which makes it current; then over the other one, flushed, so
// both copies are up to date. Callers hold im.mu (or are still in open).
func (im *Image) updateHeaders(mut func(*header)) error {
	h := im.l.hdr
	mut(&h)
	for range 2 {
		if im.l.hdr.seq == math.MaxUint64 {
			return errAt(ErrUnsupported, headerOffset(im.l.hdrSlot), headerName(im.l.hdrSlot),
				"sequence number %d cannot be incremented", im.l.hdr.seq)
		}
		h.seq = im.l.hdr.seq + 1
		slot := 1 - im.l.hdrSlot
		if _, err := im.s.WriteAt(h.encode(), int64(headerOffset(slot))); err != nil {
			return fmt.Errorf("write %s at offset %#x: %w", headerName(slot), headerOffset(slot), err)
		}
		if err := im.s.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", headerName(slot), err)
		}
		im.l.hdr, im.l.hdrSlot = h, slot
	}
	return nil
}

// beginSession runs once before the first modification of a read-write
// session (§2.2.2, §2.2.2.1): a new FileWriteGuid, and a new non-zero
// LogGuid, which the log needs before its space may be overwritten. It
// leaves DataWriteGuid alone: metadata-only sessions (a repair truncating
// leaked space, a locator update, log replay) do not change what a reader
// of the virtual disk sees, and a parent's DataWriteGuid is what its
// children are linked to (§2.6.2.6.3). beginDataSession changes it.
func (im *Image) beginSession() error {
	if im.session.Load() {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.beginSessionLocked()
}

func (im *Image) beginSessionLocked() error {
	if im.session.Load() {
		return nil
	}
	if im.closed.Load() {
		return fmt.Errorf("write: %w", ErrClosed)
	}
	logGUID := uuid.New()
	err := im.updateHeaders(func(h *header) {
		h.fileWriteGUID = uuid.New()
		h.logGUID = logGUID
	})
	if err != nil {
		return err
	}
	return im.startJournalLocked()
}

// startJournalLocked finishes the start of a write session once its header
// update is durable: it opens the journal. Every journal entry of the
// session records im.fileEnd as its FlushedFileOffset and LastFileOffset
// (§2.3.1.1), which must not exceed the file's size. Allocation at the end
// of the file extends it that far, but a block reused from freed space, a
// discard or a locator rewrite does not, so a file whose size is not 1 MiB
// aligned (other writers leave such files) is extended to im.fileEnd here
// (sparse; what it adds is unused tail, which Check reports as a harmless
// leak). Caller holds im.mu.
func (im *Image) startJournalLocked() error {
	sz, err := fileSizeOf(im.s)
	if err != nil {
		return err
	}
	if sz < im.fileEnd {
		if err := im.s.Truncate(int64(im.fileEnd)); err != nil {
			return fmt.Errorf("extend file to %#x: %w", im.fileEnd, err)
		}
	}
	im.journal = newJournal(im.s, im.logRegion())
	im.journal.commits = &im.counters.journalCommits
	im.journal.recoveries = &im.hostIO.journalRecoveries
	im.journal.pending = &im.hostIO.journalPending
	im.modified = true
	im.session.Store(true)
	return nil
}

// beginDataSession runs once before the first guest data write of a
// session: §2.2.2 asks for a new DataWriteGuid "before the first
// modification is made to user-visible data" (and §2.2.2.1 not before). It
// is OpenOptions.DataWriteGUID when set. The first write of a session does
// both updates with one header update.
func (im *Image) beginDataSession() error {
	if im.dataSession.Load() {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.dataSession.Load() {
		return nil
	}
	if im.closed.Load() {
		return fmt.Errorf("write: %w", ErrClosed)
	}
	dw := im.opts.DataWriteGUID
	if dw == uuid.Nil {
		dw = uuid.New()
	}
	if im.session.Load() {
		if err := im.updateHeaders(func(h *header) { h.dataWriteGUID = dw }); err != nil {
			return err
		}
	} else {
		logGUID := uuid.New()
		err := im.updateHeaders(func(h *header) {
			h.fileWriteGUID = uuid.New()
			h.dataWriteGUID = dw
			h.logGUID = logGUID
		})
		if err != nil {
			return err
		}
		if err := im.startJournalLocked(); err != nil {
			return err
		}
	}
	im.dataSession.Store(true)
	return nil
}

// Flush makes every completed write and every journaled metadata update
// durable (fdatasync). After a host I/O error it succeeds only at a
// recovery point (recover.go), or never again if guest writes may have been
// lost (package doc, "Host I/O errors").
func (im *Image) Flush() error {
	if im.closed.Load() {
		return fmt.Errorf("flush: %w", ErrClosed)
	}
	if im.readOnly {
		return fmt.Errorf("flush: %w", ErrReadOnly)
	}
	if err := im.commitPendingTrims(); err != nil { // discard.go
		return fmt.Errorf("flush: %w", err)
	}
	if !im.needsRecovery() {
		err := im.latch.flush()
		if !errors.Is(err, errRecoveryNeeded) {
			return err
		}
	}
	im.lockJournal() // groupcommit.go: recovery commits through the journal
	defer im.mu.Unlock()
	if err := im.recoverLocked(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	return nil
}

// Close flushes, clears LogGuid if this session modified the image (so a
// cleanly closed image needs no replay, and qemu-img sees it clean), and
// releases the lock.
func (im *Image) Close() error {
	im.lockJournal() // groupcommit.go: after a batch in flight, if any
	defer im.mu.Unlock()
	if im.closed.Swap(true) {
		return fmt.Errorf("close: %w", ErrClosed)
	}
	var err error
	if !im.readOnly && im.session.Load() {
		if im.journal != nil && im.journal.err != nil {
			im.recoverLocked() // on failure journal.err stays set: the log is kept below
		}
		switch {
		case im.journal != nil && im.journal.err != nil:
			// A commit failed part-way: an entry may be durable in the log
			// but not applied. Keep LogGuid so the next open replays it
			// (§2.3.3) instead of abandoning it.
			err = fmt.Errorf("close: log kept for replay on the next open after an earlier failure: %w", im.journal.err)
		default:
			if err = im.commitTrimsLocked(); err != nil { // discard.go
				break
			}
			if err = im.s.Sync(); err == nil {
				err = im.updateHeaders(func(h *header) { h.logGUID = uuid.Nil })
			}
			if err == nil {
				err = im.truncateFreeTail() // space.go
			}
		}
	}
	if verr := im.view.close(); err == nil && verr != nil { // fileview.go
		err = fmt.Errorf("close: unmap: %w", verr)
	}
	if im.f != nil {
		if cerr := im.f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close: %w", cerr)
		}
	}
	if im.parent != nil {
		if perr := im.parent.Close(); err == nil && perr != nil {
			err = fmt.Errorf("close parent %s: %w", im.parent.path, perr)
		}
	}
	return err
}

// Size is the virtual disk size in bytes.
func (im *Image) Size() int64 { return int64(im.l.size) }

// LogicalSectorSize is the sector size exposed to the guest (§2.6.2.4).
func (im *Image) LogicalSectorSize() uint32 { return im.l.logicalSector }

// PhysicalSectorSize is the physical sector size hint (§2.6.2.5).
func (im *Image) PhysicalSectorSize() uint32 { return im.l.physicalSector }

// BlockSize is the payload block size (§2.6.2.1).
func (im *Image) BlockSize() uint32 { return im.l.blockSize }

// DiskID is the page 83 identifier (§2.6.2.3).
func (im *Image) DiskID() uuid.UUID { return im.l.diskID }

func (im *Image) imageType() ImageType {
	if im.l.hasParent {
		return Differencing
	}
	if im.l.leaveAllocated {
		return Fixed
	}
	return Dynamic
}
