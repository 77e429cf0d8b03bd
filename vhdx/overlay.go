package vhdx

import (
	"errors"
	"fmt"
	"io"
	"math"
)

// overlayStorage lets a read-only open replay a pending log in memory: the
// replay's writes and file extensions land here, reads see them on top of
// the untouched base file. It serves inspection tools (`vhost-vhdx info`
// and `map` on an image a running daemon is writing, or on a dirty image)
// without ever modifying the file.
//
// Writes are kept as an ordered list and applied to each read in order, so
// a later write wins. The list is bounded by the replay: at most one record
// per data descriptor or run of them and one per zero descriptor (zeroRange),
// limited by the log size validated before the replay runs.
type overlayStorage struct {
	base   Storage
	size   int64
	writes []overlayWrite
}

type overlayWrite struct {
	off  int64
	n    int64
	data []byte // nil: zeros
}

func newOverlayStorage(base Storage) (*overlayStorage, error) {
	size, err := base.Size()
	if err != nil {
		return nil, fmt.Errorf("file size: %w", err)
	}
	return &overlayStorage{base: base, size: size}, nil
}

func (o *overlayStorage) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || int64(len(p)) > math.MaxInt64-off {
		return 0, fmt.Errorf("overlay read at %#x+%#x: %w", off, len(p), ErrInvalidArgument)
	}
	end := off + int64(len(p))
	// The base file shorter than the overlay's size reads as zeros there,
	// as a file extended by Truncate would.
	n, err := o.base.ReadAt(p, off)
	if n < len(p) {
		if err != nil && !errors.Is(err, io.EOF) {
			return n, fmt.Errorf("overlay read at %#x: %w", off, err)
		}
		clear(p[n:])
	}
	for _, w := range o.writes {
		lo, hi := max(off, w.off), min(end, w.off+w.n)
		if lo >= hi {
			continue
		}
		dst := p[lo-off : hi-off]
		if w.data == nil {
			clear(dst)
		} else {
			copy(dst, w.data[lo-w.off:hi-w.off])
		}
	}
	if end > o.size {
		if off >= o.size {
			return 0, fmt.Errorf("overlay read at %#x beyond size %#x: %w", off, o.size, ErrCorrupt)
		}
		return int(o.size - off), fmt.Errorf("overlay read at %#x crosses size %#x: %w", off, o.size, ErrCorrupt)
	}
	return len(p), nil
}

func (o *overlayStorage) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || int64(len(p)) > math.MaxInt64-off {
		return 0, fmt.Errorf("overlay write at %#x+%#x: %w", off, len(p), ErrInvalidArgument)
	}
	w := overlayWrite{off: off, n: int64(len(p))}
	if !allZero(p) {
		w.data = append([]byte(nil), p...)
	}
	o.writes = append(o.writes, w)
	o.size = max(o.size, off+int64(len(p)))
	return len(p), nil
}

// zeroRange records [off, off+n) as zeros with one record (rangeZeroer).
func (o *overlayStorage) zeroRange(off, n int64) error {
	if off < 0 || n < 0 || n > math.MaxInt64-off {
		return fmt.Errorf("overlay zero at %#x+%#x: %w", off, n, ErrInvalidArgument)
	}
	o.writes = append(o.writes, overlayWrite{off: off, n: n})
	o.size = max(o.size, off+n)
	return nil
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func (o *overlayStorage) Sync() error          { return nil }
func (o *overlayStorage) Size() (int64, error) { return o.size, nil }

func (o *overlayStorage) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("overlay truncate to %d: %w", size, ErrInvalidArgument)
	}
	if size < o.size {
		// Replay only ever extends; shrinking would need the base hidden.
		return fmt.Errorf("overlay cannot shrink %#x to %#x: %w", o.size, size, ErrInvalidArgument)
	}
	o.size = size
	return nil
}
