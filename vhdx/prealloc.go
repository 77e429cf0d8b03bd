package vhdx

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Preallocation says how a new image's payload blocks get their space, with
// qemu-img's names and meanings.
type Preallocation int

const (
	// PreallocDefault: falloc for fixed images (Hyper-V allocates a fixed
	// disk in full, so it can never run out of space), off for dynamic ones.
	PreallocDefault Preallocation = iota
	// PreallocOff: blocks are allocated on first write (dynamic), or laid
	// out in the BAT over a sparse range (fixed).
	PreallocOff
	// PreallocFalloc: every payload block is mapped in the BAT and its
	// space reserved with fallocate(2), which reads as zeros and costs no
	// writes. A dynamic image stays dynamic: discards give space back.
	PreallocFalloc
	// PreallocFull: as falloc, and zeros are written over every block.
	PreallocFull
)

func (p Preallocation) String() string {
	switch p {
	case PreallocDefault:
		return "default"
	case PreallocOff:
		return "off"
	case PreallocFalloc:
		return "falloc"
	case PreallocFull:
		return "full"
	}
	return fmt.Sprintf("Preallocation(%d)", int(p))
}

// ParsePreallocation parses qemu-img's option values off, falloc and full.
func ParsePreallocation(s string) (Preallocation, error) {
	switch s {
	case "off":
		return PreallocOff, nil
	case "falloc":
		return PreallocFalloc, nil
	case "full":
		return PreallocFull, nil
	}
	return 0, fmt.Errorf("preallocation %q: want off, falloc or full: %w", s, ErrInvalidArgument)
}

// effective resolves the default for an image type.
func (p Preallocation) effective(t ImageType) Preallocation {
	if p != PreallocDefault {
		return p
	}
	if t == Fixed {
		return PreallocFalloc
	}
	return PreallocOff
}

// mapsAllBlocks reports whether create maps every payload block in the BAT.
func mapsAllBlocks(o CreateOptions) bool {
	return o.Type == Fixed || o.Preallocation.effective(o.Type) != PreallocOff
}

// allocator is a Storage that can reserve space for a range without
// writing it (osStorage: fallocate mode 0, the range reads as zeros).
type allocator interface {
	allocate(off, n int64) error
}

func (s osStorage) allocate(off, n int64) error {
	for {
		err := unix.Fallocate(int(s.f.Fd()), 0, off, n)
		if !errors.Is(err, unix.EINTR) {
			if err != nil {
				return fmt.Errorf("fallocate %#x+%#x: %w", off, n, err)
			}
			return nil
		}
	}
}

// preallocate gives [off, off+n) of a new image its space as p says.
// falloc on a file system without fallocate writes zeros instead, as
// posix_fallocate does; a Storage that is no file (tests) has nothing to
// reserve.
func preallocate(s Storage, p Preallocation, off, n uint64) error {
	if n == 0 || p == PreallocOff {
		return nil
	}
	if p == PreallocFalloc {
		a, ok := s.(allocator)
		if !ok {
			return nil
		}
		err := a.allocate(int64(off), int64(n))
		if err == nil || !(errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)) {
			return err
		}
	}
	return writeZeroChunks(s, int64(off), int64(n))
}

// allocate forwards to the wrapped storage (allocator).
func (s *syncLatch) allocate(off, n int64) error {
	if a, ok := s.Storage.(allocator); ok {
		return a.allocate(off, n)
	}
	return nil
}
