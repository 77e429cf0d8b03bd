package blk

import (
	"errors"
	"fmt"
	"sync/atomic"
)

// ErrSwapMismatch: DiskRef.Swap was given a disk the device cannot switch
// to under a running driver (different sector sizes or optional methods).
var ErrSwapMismatch = errors.New("blk: replacement disk differs in sector size or capabilities")

// DiskRef is a Disk that forwards every call to a current disk which can
// be replaced while the device runs (a live checkpoint switches writes to
// a new differencing child).
//
// Each request loads the current disk once, with one atomic load; nothing
// is written on the request path, so queues share no cache line. Swap
// itself does not wait for requests that already loaded the old disk:
// the caller must quiesce them first (vhostuser.Monitor.Quiesce holds the
// dispatch lock so no queue is inside a batch) and may then close the old
// disk. Discard and WriteZeroes are forwarded when the current disk has
// them (see discarderOf); Swap refuses a disk whose capabilities or sector
// sizes differ, since the driver negotiated features for the first one.
type DiskRef struct {
	cur     atomic.Pointer[diskBox]
	retired func(old Disk) // OnSwap; set before the first Swap
}

type diskBox struct {
	d    Disk
	disc Discarder
	zero WriteZeroer
}

func box(d Disk) *diskBox {
	b := &diskBox{d: d}
	b.disc, _ = d.(Discarder)
	b.zero, _ = d.(WriteZeroer)
	return b
}

// NewDiskRef returns a DiskRef serving d.
func NewDiskRef(d Disk) *DiskRef {
	r := new(DiskRef)
	r.cur.Store(box(d))
	return r
}

// OnSwap makes every successful Swap call f with the disk it replaced,
// before Swap returns (so still under the caller's quiesce). The daemon
// uses it to keep the counters of images a checkpoint or resize retired
// (control.go), whoever swaps. Call it before the first Swap.
func (r *DiskRef) OnSwap(f func(old Disk)) { r.retired = f }

// Load returns the current disk.
func (r *DiskRef) Load() Disk { return r.cur.Load().d }

// Swap makes d the current disk and returns the previous one. The caller
// has quiesced every request (see the type's doc).
func (r *DiskRef) Swap(d Disk) (Disk, error) {
	old := r.cur.Load()
	nb := box(d)
	if d.LogicalSectorSize() != old.d.LogicalSectorSize() || d.PhysicalSectorSize() != old.d.PhysicalSectorSize() ||
		(nb.disc == nil) != (old.disc == nil) || (nb.zero == nil) != (old.zero == nil) {
		return nil, fmt.Errorf("swap: %w", ErrSwapMismatch)
	}
	r.cur.Store(nb)
	if r.retired != nil {
		r.retired(old.d)
	}
	return old.d, nil
}

func (r *DiskRef) ReadVec(bufs [][]byte, off int64) error  { return r.cur.Load().d.ReadVec(bufs, off) }
func (r *DiskRef) WriteVec(bufs [][]byte, off int64) error { return r.cur.Load().d.WriteVec(bufs, off) }
func (r *DiskRef) Flush() error                            { return r.cur.Load().d.Flush() }
func (r *DiskRef) Size() int64                             { return r.cur.Load().d.Size() }
func (r *DiskRef) LogicalSectorSize() uint32               { return r.cur.Load().d.LogicalSectorSize() }
func (r *DiskRef) PhysicalSectorSize() uint32              { return r.cur.Load().d.PhysicalSectorSize() }

// refDiscarder and refZeroer forward to the DiskRef's current disk.
type refDiscarder struct{ r *DiskRef }

func (f refDiscarder) Discard(off, n int64) error { return f.r.cur.Load().disc.Discard(off, n) }

type refZeroer struct{ r *DiskRef }

func (f refZeroer) WriteZeroes(off, n int64, unmap bool) error {
	return f.r.cur.Load().zero.WriteZeroes(off, n, unmap)
}

// discarderOf returns d's Discard, nil without one. For a DiskRef it is
// the current disk's, forwarded (Swap keeps the capability).
func discarderOf(d Disk) Discarder {
	if r, ok := d.(*DiskRef); ok {
		if r.cur.Load().disc == nil {
			return nil
		}
		return refDiscarder{r}
	}
	x, _ := d.(Discarder)
	return x
}

// writeZeroerOf is discarderOf for WriteZeroes.
func writeZeroerOf(d Disk) WriteZeroer {
	if r, ok := d.(*DiskRef); ok {
		if r.cur.Load().zero == nil {
			return nil
		}
		return refZeroer{r}
	}
	x, _ := d.(WriteZeroer)
	return x
}
