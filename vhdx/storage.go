package vhdx

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Storage is what the engine needs from the file holding an image. *os.File
// satisfies it through osStorage; tests substitute a fault-injecting layer
// that drops or tears writes not yet made durable by Sync.
//
// ReadAt and WriteAt carry their own offset (pread/pwrite): there is no shared
// file position, so I/O to different blocks can run in parallel.
type Storage interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Size returns the current file size in bytes.
	Size() (int64, error)
	// Truncate sets the file size (used to extend the file).
	Truncate(size int64) error
}

// osStorage adapts *os.File to Storage with fdatasync semantics.
type osStorage struct{ f *os.File }

func (s osStorage) ReadAt(p []byte, off int64) (int, error)  { return s.f.ReadAt(p, off) }
func (s osStorage) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }
func (s osStorage) Truncate(size int64) error                { return s.f.Truncate(size) }

func (s osStorage) Sync() error {
	for {
		err := unix.Fdatasync(int(s.f.Fd()))
		if !errors.Is(err, unix.EINTR) {
			if err != nil {
				return fmt.Errorf("fdatasync: %w", err)
			}
			return nil
		}
	}
}

func (s osStorage) Size() (int64, error) {
	fi, err := s.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// syncLatch keeps a failed fdatasync from being forgotten. After fdatasync
// reports a writeback error, Linux marks the dirty pages clean: writes that
// completed before it may never reach the disk, and the next fdatasync
// succeeds (QEMU's file-posix makes every later flush fail for that reason;
// PostgreSQL panics). Whoever saw the error (a guest Flush, an allocation's
// journal commit, a header update), a later Flush must not tell the guest
// that lost writes are durable. The rules (package doc, "Host I/O errors"):
//
//   - The latch knows whether guest payload written in place (into blocks
//     the guest could already read back) completed since the last Sync began
//     (dirty). Payload written into a block not yet published in the BAT is
//     not counted: its journal commit syncs it before the block becomes
//     visible, and a failed commit fails that write.
//   - A failed Sync with such payload at risk loses it for good: nothing
//     can re-create it, so every later Sync fails (lost) until a reopen.
//   - A failed Sync with only metadata at risk opens an episode: metadata
//     is owned in memory and can be written again. Internal Syncs go on
//     (the journal and the two-header update keep the file consistent by
//     themselves); a guest Flush is refused (flush reports errRecoveryNeeded)
//     until Image.recoverLocked has re-written the metadata and a Sync has
//     succeeded with no failure since the episode began (endRecovery).
//
// Syncs are serialised so that none can start before an earlier failure is
// recorded, and concurrent callers share one fdatasync (syncGroup,
// groupcommit.go).
type syncLatch struct {
	Storage
	group syncGroup
	mu    sync.Mutex
	err   error  // failure of the open episode, nil if none; under mu
	gen   uint64 // failures so far; under mu
	lost  bool   // payload at risk when a Sync failed: permanent; under mu

	dirty    atomic.Bool   // in-place payload completed since the last Sync began
	episodes atomic.Uint64 // failed Syncs that opened an episode or lost payload
	recovers atomic.Uint64 // episodes closed by a recovery point
}

// errRecoveryNeeded: a guest flush found an open episode; the caller must
// establish a recovery point (Image.recoverLocked) instead.
var errRecoveryNeeded = errors.New("an earlier sync failed: metadata must be written again before a flush can succeed")

func (s *syncLatch) lostErr() error {
	return fmt.Errorf("an earlier sync failed with guest writes pending, which may be lost; every flush fails until the image is reopened: %w", s.err)
}

// Sync is fdatasync for internal use (journal, headers, file growth),
// shared with concurrent callers (syncGroup).
func (s *syncLatch) Sync() error { return s.group.do(s.syncOnce) }

func (s *syncLatch) syncOnce() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.syncLocked()
}

func (s *syncLatch) syncLocked() error {
	if s.lost {
		return s.lostErr()
	}
	atRisk := s.dirty.Swap(false)
	err := s.Storage.Sync()
	if err == nil {
		return nil
	}
	// Writes that completed while the failed fdatasync ran may have been
	// in its writeback too: count them.
	atRisk = atRisk || s.dirty.Load()
	if s.err == nil || atRisk {
		s.episodes.Add(1)
	}
	s.err, s.gen, s.lost = err, s.gen+1, atRisk
	return err
}

// flush is Sync for a guest flush: it fails while an episode is open,
// including one that opened while it waited for its shared sync.
func (s *syncLatch) flush() error {
	if err := s.episodeErr(); err != nil {
		return err
	}
	if err := s.group.do(s.syncOnce); err != nil {
		return err
	}
	return s.episodeErr()
}

// episodeErr reports an open episode (errRecoveryNeeded), nil if none or if
// payload was lost (every sync reports that itself).
func (s *syncLatch) episodeErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil && !s.lost {
		return fmt.Errorf("%w: %w", errRecoveryNeeded, s.err)
	}
	return nil
}

// markDirty records a completed in-place payload write (see syncLatch).
func (s *syncLatch) markDirty() {
	if !s.dirty.Load() {
		s.dirty.Store(true)
	}
}

// beginRecovery starts a recovery point; it returns the failure count to
// hand to endRecovery, or the lost error when no recovery is possible.
func (s *syncLatch) beginRecovery() (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lost {
		return 0, s.lostErr()
	}
	return s.gen, nil
}

// endRecovery syncs and closes the episode if that succeeds and nothing
// failed since beginRecovery returned gen.
func (s *syncLatch) endRecovery(gen uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.syncLocked(); err != nil {
		return err
	}
	if s.gen != gen {
		return fmt.Errorf("another sync failed during recovery: %w", s.err)
	}
	if s.err != nil {
		s.err = nil
		s.recovers.Add(1)
	}
	return nil
}

// state reports the latch for HostIOErrors.
func (s *syncLatch) state() (open, lost bool, last error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err != nil, s.lost, s.err
}

// zeroRange zeroes [off, off+n) of the file by punching a hole: it reads as
// zeros at once, whatever its length, and frees the space (rangeZeroer).
// File systems without hole punching get zeros written.
func (s osStorage) zeroRange(off, n int64) error {
	err := unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOSYS):
		return writeZeroChunks(s, off, n)
	}
	return fmt.Errorf("punch hole at %#x+%#x: %w", off, n, err)
}

// zeroRange forwards to the wrapped storage's one-step zeroing when it has
// one (rangeZeroer).
func (s *syncLatch) zeroRange(off, n int64) error {
	if z, ok := s.Storage.(rangeZeroer); ok {
		return z.zeroRange(off, n)
	}
	return writeZeroChunks(s.Storage, off, n)
}
