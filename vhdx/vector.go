package vhdx

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"golang.org/x/sys/unix"
)

// vectorStorage is an optional Storage upgrade: one preadv/pwritev moves a
// list of buffers to or from consecutive bytes of the file. ReadVec and
// WriteVec use it for each run of (buffer ∩ block) pieces that lie back to
// back in the file, so a request of many guest segments costs one system
// call per run instead of one per segment. A Storage without it (the
// fault-injecting test storage, the in-memory log replay overlay) gets
// one ReadAt/WriteAt per piece, so it still sees every write.
//
// Both transfer all of bufs or fail: a short transfer is continued, and
// EINTR retried. They may reslice the elements of bufs (never their
// contents), which therefore must be the caller's scratch list.
type vectorStorage interface {
	ReadvAt(bufs [][]byte, off int64) (int, error)
	WritevAt(bufs [][]byte, off int64) (int, error)
}

// iovMax is Linux's IOV_MAX (UIO_MAXIOV): the most buffers one
// preadv/pwritev takes. Longer runs are split.
const iovMax = 1024

// vectorOf returns s's vectored view, or nil. The sync latch wraps the
// file only to remember a failed Sync; reads and writes pass through it
// unchanged, so its inner Storage is asked.
func vectorOf(s Storage) vectorStorage {
	if l, ok := s.(*syncLatch); ok {
		s = l.Storage
	}
	v, _ := s.(vectorStorage)
	return v
}

// ReadvAt fills bufs from the file at off with preadv(2), continuing short
// reads; it returns io.EOF if the file ends first.
func (s osStorage) ReadvAt(bufs [][]byte, off int64) (int, error) {
	fd := int(s.f.Fd())
	done := 0
	for len(bufs) > 0 {
		n, err := rawPreadv(fd, bufs, off) // vector_unsafe.go: no allocation
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("preadv at %#x: %w", off, err)
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
		off += int64(n)
		bufs = advanceIov(bufs, n)
	}
	return done, nil
}

// WritevAt writes bufs to the file at off with pwritev(2), continuing
// short writes.
func (s osStorage) WritevAt(bufs [][]byte, off int64) (int, error) {
	fd := int(s.f.Fd())
	done := 0
	for len(bufs) > 0 {
		n, err := rawPwritev(fd, bufs, off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("pwritev at %#x: %w", off, err)
		}
		if n == 0 {
			return done, fmt.Errorf("pwritev at %#x: wrote nothing: %w", off, io.ErrShortWrite)
		}
		done += n
		off += int64(n)
		bufs = advanceIov(bufs, n)
	}
	return done, nil
}

// advanceIov drops the first n bytes of bufs: whole buffers, then the
// head of a partly transferred one (resliced in place). Empty buffers at
// the front are dropped too, so a caller's loop always moves on.
func advanceIov(bufs [][]byte, n int) [][]byte {
	for len(bufs) > 0 && n >= len(bufs[0]) {
		n -= len(bufs[0])
		bufs = bufs[1:]
	}
	if len(bufs) > 0 && n > 0 {
		bufs[0] = bufs[0][n:]
	}
	return bufs
}

// iovPool holds the run lists of ReadVec and WriteVec, so the steady state
// allocates nothing per call (the iovec arrays are pooled too,
// vector_unsafe.go).
var iovPool = sync.Pool{New: func() any {
	s := make([][]byte, 0, 64)
	return &s
}}

// fileRun is a list of pieces lying back to back in the file from off.
type fileRun struct {
	bufs     [][]byte
	off, end uint64 // file offsets of its first byte and past its last
}

// adds reports whether a piece at file offset fo continues r.
func (r *fileRun) adds(fo uint64) bool {
	return len(r.bufs) > 0 && fo == r.end && len(r.bufs) < iovMax
}

func (r *fileRun) add(p []byte, fo uint64) {
	if len(r.bufs) == 0 {
		r.off = fo
	}
	r.bufs = append(r.bufs, p)
	r.end = fo + uint64(len(p))
}

// readVecv is ReadVec of an image without a parent on a vectored storage:
// one preadv per run of FULLY_PRESENT pieces contiguous in the file;
// other pieces read as zeros (as in ReadAt). mode says how runs are read
// (cachedread.go).
func (im *Image) readVecv(vs vectorStorage, bufs [][]byte, pos uint64, mode readMode) error {
	sp := iovPool.Get().(*[][]byte)
	r := fileRun{bufs: (*sp)[:0]}
	defer func() {
		clear(r.bufs[:cap(r.bufs)]) // keep no reference to guest memory
		*sp = r.bufs[:0]
		iovPool.Put(sp)
	}()
	for _, buf := range bufs {
		for len(buf) > 0 {
			_, e, in, left := im.locate(pos)
			n := min(uint64(len(buf)), left)
			if batState(e) == stateFullyPresent {
				fo := batFileOffset(e) + in
				if len(r.bufs) > 0 && !r.adds(fo) {
					if err := im.readRun(vs, &r, mode); err != nil {
						return err
					}
				}
				r.add(buf[:n], fo)
			} else {
				clear(buf[:n])
			}
			buf = buf[n:]
			pos += n
		}
	}
	return im.readRun(vs, &r, mode)
}

// readRun reads r and empties it; a file ending inside it is corruption,
// as in readPayload. With readCached, a run not all in the page cache is
// errNotCached (cachedread.go).
func (im *Image) readRun(vs vectorStorage, r *fileRun, mode readMode) error {
	if len(r.bufs) == 0 {
		return nil
	}
	want := r.end - r.off
	switch mode {
	case readCached:
		if nw, ok := vs.(noWaitStorage); ok {
			err := nw.readvAtNoWait(r.bufs, int64(r.off), want)
			r.bufs = r.bufs[:0]
			return err
		}
	case readAny:
		if im.readFromView(r.bufs, r.off, r.end) { // fileview.go
			r.bufs = r.bufs[:0]
			return nil
		}
	}
	n, err := vs.ReadvAt(r.bufs, int64(r.off))
	r.bufs = r.bufs[:0]
	return runResult(uint64(n), want, r.off, err) // cachedread.go
}

// writeVecv is WriteVec's loop on a vectored storage: pieces landing in
// FULLY_PRESENT blocks are gathered into runs contiguous in the file, one
// pwritev each; any other piece (allocation, a partly present block of a
// differencing image) first writes the run so far, then goes through
// writeChunk on its own, exactly as without vectors.
func (im *Image) writeVecv(vs vectorStorage, bufs [][]byte, pos uint64) error {
	sp := iovPool.Get().(*[][]byte)
	r := fileRun{bufs: (*sp)[:0]}
	defer func() {
		clear(r.bufs[:cap(r.bufs)])
		*sp = r.bufs[:0]
		iovPool.Put(sp)
	}()
	for _, buf := range bufs {
		for len(buf) > 0 {
			idx, e, in, left := im.locate(pos)
			n := min(uint64(len(buf)), left)
			if batState(e) == stateFullyPresent {
				if im.hookLoaded != nil {
					im.hookLoaded(e)
				}
				fo := batFileOffset(e) + in
				if len(r.bufs) > 0 && !r.adds(fo) {
					if err := im.writeRun(vs, &r); err != nil {
						return err
					}
				}
				r.add(buf[:n], fo)
			} else {
				if err := im.writeRun(vs, &r); err != nil {
					return err
				}
				if err := im.writeChunk(buf[:n], pos, idx, e, in); err != nil {
					return err
				}
			}
			buf = buf[n:]
			pos += n
		}
	}
	return im.writeRun(vs, &r)
}

// writeRun writes r and empties it. The run lies in FULLY_PRESENT blocks:
// data written in place, which a failing sync may lose (markDirty, as
// writePayload), and which a full host disk may refuse in a sparse file
// (noSpace, as writePayload).
func (im *Image) writeRun(vs vectorStorage, r *fileRun) error {
	if len(r.bufs) == 0 {
		return nil
	}
	_, err := vs.WritevAt(r.bufs, int64(r.off))
	off := r.off
	r.bufs = r.bufs[:0]
	if err != nil {
		return fmt.Errorf("write payload at offset %#x: %w", off, noSpace(err))
	}
	im.markDirty()
	return nil
}
