package vhdx

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

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

// syncLatch makes a failed Sync fail every later Sync too. After fdatasync
// reports a writeback error, Linux marks the dirty pages clean: writes that
// completed before it may never reach the disk, and the next fdatasync
// succeeds. Whoever saw the error (a guest Flush, an allocation's journal
// commit, a header update), a later Flush must not tell the guest that those
// writes are durable. Only a reopen clears the latch. Syncs are serialised
// so that none can start before an earlier failure is recorded, and
// concurrent callers share one fdatasync (syncGroup, groupcommit.go).
type syncLatch struct {
	Storage
	mu    sync.Mutex
	err   error
	group syncGroup
}

func (s *syncLatch) Sync() error { return s.group.do(s.syncOnce) }

func (s *syncLatch) syncOnce() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return fmt.Errorf("an earlier sync failed, writes before it may be lost (reopen the image): %w", s.err)
	}
	if err := s.Storage.Sync(); err != nil {
		s.err = err
		return err
	}
	return nil
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
