package vhdx

import (
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// Reads for a caller that must not wait for the disk.
//
// A queue's owner (vhostuser) runs reads inline, one after another, which
// is what makes cached reads cheap. A read whose data is not in the page
// cache would hold every request queued behind it for a disk read, and a
// queue of cold reads would reach the disk one at a time: a cold 16 GiB
// image served 15 k random 4 KiB reads/s at QD32 where qemu-storage-daemon,
// with its reads in parallel, served 33–39 k.
//
// So the owner may ask for what the page cache holds (ReadVecCached) and
// hand a miss to a goroutine that may block, which reads it with
// ReadVecCold. ReadVecCold never uses the file view: a thread blocked in
// a system call lets the Go scheduler run other goroutines on its P, and
// one blocked in a page fault of the view does not, so on a host with
// fewer cores than waiting readers, cold reads through the view would run
// at most GOMAXPROCS at a time. (On this 2-core machine's disk the two
// measured the same, 23–35 k through the view against 30–35 k with
// preadv, 32 readers: the disk, not the Ps, was the limit there.)

// readMode says how readRun reads a run of payload.
type readMode uint8

const (
	readAny     readMode = iota // the view for a small run, else preadv (ReadVec)
	readCached                  // preadv2(RWF_NOWAIT): errNotCached on a miss
	readSyscall                 // preadv, never the view (ReadVecCold)
)

// errNotCached reports a run not all in the page cache (readCached). It
// never leaves the package: ReadVecCached turns it into false.
var errNotCached = errors.New("vhdx: payload not in the page cache")

// noWaitStorage is the file's side of readCached.
type noWaitStorage interface {
	readvAtNoWait(bufs [][]byte, off int64, want uint64) error
}

// readvAtNoWait reads want bytes into bufs from off if the page cache holds
// them all, else errNotCached (bufs may then hold part of them). A file
// system that cannot answer without waiting (EOPNOTSUPP) reads normally.
func (s osStorage) readvAtNoWait(bufs [][]byte, off int64, want uint64) error {
	for {
		n, err := rawPreadvNoWait(int(s.f.Fd()), bufs, off) // vector_unsafe.go
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return errNotCached
		case errors.Is(err, unix.EOPNOTSUPP):
			got, err := s.ReadvAt(bufs, off)
			return runResult(uint64(got), want, uint64(off), err)
		case err != nil:
			return fmt.Errorf("read payload at offset %#x: preadv2: %w", off, err)
		case uint64(n) != want:
			// Part cached, or the file ends: the blocking read that
			// follows tells which.
			return errNotCached
		}
		return nil
	}
}

// runResult is readRun's verdict on a run of want bytes at file offset off
// of which got were read: a file ending inside it is corruption.
func runResult(got, want, off uint64, err error) error {
	if got == want && err == nil {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return errAt(ErrCorrupt, off, "payload block data", "file ends after %d of %d bytes", got, want)
	}
	return fmt.Errorf("read payload at offset %#x: %w", off, err)
}

// ReadVecCached is ReadVec for a caller that must not wait for the disk.
// It reads the payload with preadv2(RWF_NOWAIT) and reports false when
// some of it is not in the page cache: bufs then hold anything, and the
// caller reads them again, with ReadVecCold, where waiting is fine. An
// image that cannot tell (a differencing chain, a Storage that is not a
// file) reads as ReadVec does and reports true.
func (im *Image) ReadVecCached(bufs [][]byte, off int64) (bool, error) {
	if im.parent != nil || vectorOf(im.s) == nil {
		return true, im.ReadVec(bufs, off)
	}
	if err := im.checkRange("read", off, vecLen(bufs)); err != nil {
		return true, err
	}
	defer im.ep.exit(im.ep.enter())
	err := im.readVecv(vectorOf(im.s), bufs, uint64(off), readCached)
	if errors.Is(err, errNotCached) {
		return false, nil
	}
	return true, err
}

// ReadVecCold is ReadVec with every payload run read by preadv, never
// through the file view (see above: for goroutines that expect to wait for
// the disk). A differencing chain reads as ReadVec does.
func (im *Image) ReadVecCold(bufs [][]byte, off int64) error {
	if im.parent != nil || vectorOf(im.s) == nil {
		return im.ReadVec(bufs, off)
	}
	if err := im.checkRange("read", off, vecLen(bufs)); err != nil {
		return err
	}
	defer im.ep.exit(im.ep.enter())
	return im.readVecv(vectorOf(im.s), bufs, uint64(off), readSyscall)
}
