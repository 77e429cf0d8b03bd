package vhdx

// Live merge: folding the top of an open chain into its parent while guest
// I/O goes on (Hyper-V's merge when a checkpoint is deleted). The offline
// Commit (commit.go) does the same on closed files; this is its online
// form, with the same crash-safe ordering.
//
// The protocol, for a top T over its parent P:
//
//  1. Start (the caller has quiesced I/O on T): P, held by the chain
//     read-only with a shared lock, is closed and reopened read-write with
//     the exclusive lock and OpenOptions.DataWriteGUID = G, a new GUID (the
//     lock fails, and the merge is refused, when another process uses P,
//     e.g. serves a sibling of T). T then gets parent_linkage2 = G
//     (§2.6.2.6.3), journaled and flushed, before anything is written to P:
//     T accepts P before and after P's DataWriteGuid becomes G. Every block
//     T holds anything in is marked dirty. From here on every write,
//     discard and write-zeroes reaching T must go through the LiveMerge
//     (it is a blk.Disk): it marks the blocks it touched dirty once the
//     operation is over.
//  2. Run (I/O goes on): each dirty block is cleaned, then the sectors T
//     holds in it (whole block, or the set runs of its sector bitmap; zeros
//     where T defines zeros) are read from T and written to P, at a bounded
//     rate. A write landing in a block after its bit was cleaned marks it
//     again: the mark follows the write's completion, so either the copy
//     read the new data or the block is copied again. Passes repeat until
//     few blocks are dirty (or a pass limit, for a guest that never stops
//     writing the same blocks).
//  3. Finish (I/O excluded by the LiveMerge itself, and by the caller's
//     quiesce): the dirty blocks left are copied, P is flushed (P now reads
//     what the chain reads), T is unlinked and its directory synced, P's
//     next data write is set to give it a fresh random DataWriteGuid (so a
//     T brought back by a file system that lost the unlink can never be
//     taken for P's child again), T is closed, and P is the new top.
//
// Why every instant is safe: P only ever changes in sectors T holds (T's
// held set only grows; a discard in a differencing image moves a block to
// ZERO, which T still defines), so the chain T→P reads the same whether a
// write to P happened, half happened or not; T itself changes only by guest
// writes (durable as usual) and by its linkage, set before P's first write.
// After a crash or SIGKILL before step 3's unlink the files are the chain
// T→P with P possibly holding a log (it was open read-write): opening T
// read-write (a restarted `serve`, with T's path as before) replays P's log
// first (replayInterruptedParent, livemerge_recover.go) and serves T→P:
// the merge is abandoned cleanly and `merge` (or the offline `commit`)
// starts it again. After the unlink the merged file is P alone: restart
// with P's path.
//
// Concurrency: the LiveMerge's I/O methods hold io for reading around each
// operation and its dirty mark; Finish and Abandon hold it for writing, so
// no operation is in flight while the top changes, and operations after
// Finish go to P. The copier (Run) is one goroutine; it takes no lock of
// the LiveMerge for its copy but registers each piece in T's epoch
// (epoch.go), so the range it loaded from T's BAT is not handed to another
// block while it reads. Progress is read with atomics from any goroutine.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// ErrMergeState: a live merge operation that its state does not allow
// (Finish before Run ended, a second Finish, I/O after Abandon).
var ErrMergeState = errors.New("vhdx: live merge is not in a state that allows this")

// LiveMergeOptions control StartLiveMerge.
type LiveMergeOptions struct {
	// Rate bounds the background copy in bytes per second; 0 is unbounded.
	Rate int64

	// Tests: reopen replaces reopening the parent by path (it must close
	// old and return the parent opened read-write with DataWriteGUID g);
	// removeTop replaces unlinking the top's file.
	reopen    func(old *Image, g uuid.UUID) (*Image, error)
	removeTop func() error
}

// Merge states, as Progress reports them.
const (
	MergeCopying    = "copying"     // first pass over the top's blocks
	MergeCatchingUp = "catching-up" // re-copying blocks written meanwhile
	MergeReady      = "ready"       // Run ended; Finish does the rest
	MergeDone       = "done"        // the parent is the top, the child is gone
	MergeAbandoned  = "abandoned"   // stopped; the chain is served as it is
	MergeFailed     = "failed"      // an error; the chain is served as it is
)

// MergeProgress is a snapshot of a live merge.
type MergeProgress struct {
	State       string `json:"state"`
	Top         string `json:"top"`
	Parent      string `json:"parent"`
	Done        int64  `json:"done"`         // bytes of the first pass copied
	Total       int64  `json:"total"`        // bytes the first pass copies (what the top held at the start, grown by writes to blocks not reached yet)
	Recopied    int64  `json:"recopied"`     // bytes copied again after guest writes
	DirtyBlocks int64  `json:"dirty_blocks"` // blocks waiting for a copy
	Rate        int64  `json:"rate"`         // bytes/s, 0 unbounded
	Error       string `json:"error,omitempty"`
}

// mergeCatchUpPasses bounds the passes over blocks written during the
// copy; what is left after them is copied by Finish with I/O paused.
const mergeCatchUpPasses = 4

// mergeReadyBlocks: Run ends early when at most this many blocks are dirty
// after a pass (Finish copies them with I/O paused).
const mergeReadyBlocks = 8

// LiveMerge is a merge of a chain's top into its parent in progress. It is
// a blk.Disk (with Discard and WriteZeroes) serving the chain, and after
// Finish, the parent.
type LiveMerge struct {
	io     sync.RWMutex
	cur    *Image // the image I/O goes to: the top, the parent after Finish; under io
	top    *Image
	parent *Image
	rate   int64
	remove func() error

	tracking bool // under io: mark blocks after writes
	dirty    []atomic.Uint64
	nDirty   atomic.Int64
	blocks   uint64

	state    atomic.Pointer[string]
	errMsg   atomic.Pointer[string]
	done     atomic.Int64
	total    atomic.Int64
	recopied atomic.Int64
	running  atomic.Bool

	// Test hooks, nil in production: afterRead runs between reading a
	// block's piece from the top and writing it to the parent; afterBlock
	// after a block was copied by Run; inFinish in Finish after the
	// final copy and before the parent's flush.
	afterRead  func(block uint64)
	afterBlock func(block uint64)
	inFinish   func()
}

// StartLiveMerge begins merging top (a read-write differencing image) into
// its parent: steps 1 above. The caller has quiesced every I/O on top and
// from now on sends all of it through the returned LiveMerge. On error
// nothing was written to the parent and top serves the same data as
// before: with its parent opened read-only again if reopening it failed
// (if even that failed, the error says so and reads of what the parent
// holds fail), or still open read-write under it if a later step failed.
func StartLiveMerge(top *Image, o LiveMergeOptions) (*LiveMerge, error) {
	if top.closed.Load() {
		return nil, fmt.Errorf("live merge: %w", ErrClosed)
	}
	if top.readOnly {
		return nil, fmt.Errorf("live merge %s: %w", top.path, ErrReadOnly)
	}
	if !top.l.hasParent || top.parent == nil {
		return nil, fmt.Errorf("live merge %s: not a differencing image (it has no parent to merge into): %w", top.path, ErrInvalidArgument)
	}
	if o.Rate < 0 {
		return nil, fmt.Errorf("live merge %s: rate %d is negative: %w", top.path, o.Rate, ErrInvalidArgument)
	}
	cur := top.parent.l.hdr.dataWriteGUID
	g := uuid.New()
	reopen := o.reopen
	if reopen == nil {
		reopen = top.reopenParentRW
	}
	parent, err := reopen(top.parent, g)
	if err != nil {
		return nil, fmt.Errorf("live merge %s: %w", top.path, err)
	}
	top.parent = parent
	if err = top.SetParentLinkage(cur, g); err == nil {
		err = top.Flush()
	} else {
		err = fmt.Errorf("set parent_linkage2: %w", err)
	}
	if err != nil {
		// Nothing was written to the parent: the chain is as before.
		return nil, fmt.Errorf("live merge %s: %w", top.path, err)
	}
	m := &LiveMerge{cur: top, top: top, parent: parent, rate: o.Rate, remove: o.removeTop, tracking: true}
	if m.remove == nil {
		m.remove = func() error { return removeSynced(top.path) }
	}
	bs := uint64(top.l.blockSize)
	m.blocks = (top.l.size + bs - 1) / bs
	m.dirty = make([]atomic.Uint64, (m.blocks+63)/64)
	var total int64
	for b := uint64(0); b < m.blocks; b++ {
		held, err := m.heldBytes(b)
		if err != nil {
			return nil, fmt.Errorf("live merge %s: %w", top.path, err)
		}
		if held > 0 {
			m.mark(b)
			total += held
		}
	}
	m.total.Store(total)
	m.setState(MergeCopying)
	return m, nil
}

// reopenParentRW closes old (im's parent, read-only) and opens its file
// read-write with DataWriteGUID g and the exclusive lock; it must still be
// im's parent. On failure the parent is opened read-only again.
func (im *Image) reopenParentRW(old *Image, g uuid.UUID) (*Image, error) {
	pp := old.path
	if pp == "" {
		return nil, fmt.Errorf("the parent has no path to reopen: %w", ErrUnsupported)
	}
	if err := old.Close(); err != nil {
		return nil, im.reattachParent(pp, fmt.Errorf("close parent %s: %w", pp, err))
	}
	p, err := openChain(pp, OpenOptions{NoLock: im.opts.NoLock, DataWriteGUID: g}, &chainState{})
	if err != nil {
		return nil, im.reattachParent(pp, fmt.Errorf("open parent %s read-write (is it used by another process, e.g. for a sibling of this image?): %w", pp, err))
	}
	if err := im.checkParent(p, "parent "+pp); err != nil {
		p.Close()
		return nil, im.reattachParent(pp, err)
	}
	return p, nil
}

// reattachParent opens pp read-only again as im's parent after a failed
// reopen, and returns cause (with a note if that failed too).
func (im *Image) reattachParent(pp string, cause error) error {
	p, err := openChain(pp, parentOpenOptions(im.opts), &chainState{})
	if err == nil {
		if err = im.checkParent(p, "parent "+pp); err != nil {
			p.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("%w; reopening the parent read-only failed too, reads of what it holds fail: %v", cause, err)
	}
	im.parent = p
	return cause
}

// removeSynced unlinks path and syncs its directory, so the unlink is
// durable before the caller goes on.
func removeSynced(path string) error {
	if err := os.Remove(path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory of %s: %w", path, err)
	}
	return nil
}

func (m *LiveMerge) setState(s string) { m.state.Store(&s) }

func (m *LiveMerge) fail(err error) error {
	s := err.Error()
	m.errMsg.Store(&s)
	m.setState(MergeFailed)
	return err
}

// Progress reports the merge's state and counters.
func (m *LiveMerge) Progress() MergeProgress {
	p := MergeProgress{State: *m.state.Load(), Top: m.top.path, Parent: m.parent.path,
		Done: m.done.Load(), Total: max(m.total.Load(), m.done.Load()), Recopied: m.recopied.Load(),
		DirtyBlocks: m.nDirty.Load(), Rate: m.rate}
	if e := m.errMsg.Load(); e != nil {
		p.Error = *e
	}
	return p
}

// Top is the image being merged (the chain's top, read-write).
func (m *LiveMerge) Top() *Image { return m.top }

// Parent is the image merged into (read-write while the merge runs).
func (m *LiveMerge) Parent() *Image { return m.parent }

// Current is the image I/O goes to: the top, or the parent after Finish.
func (m *LiveMerge) Current() *Image {
	m.io.RLock()
	defer m.io.RUnlock()
	return m.cur
}

// mark sets block b dirty.
func (m *LiveMerge) mark(b uint64) {
	w, bit := &m.dirty[b/64], uint64(1)<<(b%64)
	for {
		v := w.Load()
		if v&bit != 0 {
			return
		}
		if w.CompareAndSwap(v, v|bit) {
			m.nDirty.Add(1)
			return
		}
	}
}

// clean clears block b's dirty bit and reports whether it was set.
func (m *LiveMerge) clean(b uint64) bool {
	w, bit := &m.dirty[b/64], uint64(1)<<(b%64)
	for {
		v := w.Load()
		if v&bit == 0 {
			return false
		}
		if w.CompareAndSwap(v, v&^bit) {
			m.nDirty.Add(-1)
			return true
		}
	}
}

// markRange marks the blocks of [off, off+n); off and n were validated by
// the operation that just ran on them.
func (m *LiveMerge) markRange(off, n int64) {
	if n <= 0 || off < 0 {
		return
	}
	bs := int64(m.top.l.blockSize)
	last := min(uint64((off+n-1)/bs), m.blocks-1)
	for b := uint64(off / bs); b <= last; b++ {
		m.mark(b)
	}
}

// Run copies dirty blocks into the parent until few are left (step 2), at
// the rate asked. It returns nil when Finish may be called, ctx's error
// when cancelled (the merge can then be Abandoned, or Run again), and an
// I/O error otherwise (the merge is failed: Abandon it).
func (m *LiveMerge) Run(ctx context.Context) error {
	if !m.running.CompareAndSwap(false, true) {
		return fmt.Errorf("live merge: Run is already running: %w", ErrMergeState)
	}
	defer m.running.Store(false)
	if s := *m.state.Load(); s != MergeCopying && s != MergeCatchingUp && s != MergeReady {
		return fmt.Errorf("live merge: Run in state %s: %w", s, ErrMergeState)
	}
	lim := rateLimiter{rate: m.rate, start: time.Now()}
	buf := make([]byte, commitPiece)
	for pass := 0; pass <= mergeCatchUpPasses; pass++ {
		first := *m.state.Load() == MergeCopying
		for b := uint64(0); b < m.blocks; b++ {
			if m.dirty[b/64].Load() == 0 {
				b |= 63 // a word with no dirty block: skip it
				continue
			}
			if !m.clean(b) {
				continue
			}
			var paceErr error
			n, err := m.copyBlock(b, buf, func(k int64) bool {
				paceErr = lim.wait(ctx, k) // per piece: a big block is no burst
				return paceErr == nil
			})
			if err != nil || paceErr != nil {
				m.mark(b) // copied in part at most: again later
				if paceErr != nil {
					return paceErr
				}
				return m.fail(err)
			}
			if first {
				m.done.Add(n)
			} else {
				m.recopied.Add(n)
			}
			if m.afterBlock != nil {
				m.afterBlock(b)
			}
		}
		if first {
			m.setState(MergeCatchingUp)
		}
		if m.nDirty.Load() <= mergeReadyBlocks {
			break
		}
	}
	m.setState(MergeReady)
	return nil
}

// rateLimiter paces the copy at rate bytes/s over the whole run.
type rateLimiter struct {
	rate  int64
	start time.Time
	bytes int64
}

func (l *rateLimiter) wait(ctx context.Context, n int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if l.rate <= 0 {
		return nil
	}
	l.bytes += n
	// bytes/rate seconds, computed without overflowing int64 nanoseconds.
	due := time.Duration(float64(l.bytes) / float64(l.rate) * float64(time.Second))
	d := due - time.Since(l.start)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// heldBytes counts the bytes of block b the top defines (data or zeros).
func (m *LiveMerge) heldBytes(b uint64) (int64, error) {
	var n int64
	err := m.forHeld(b, func(pos, length, fileOff uint64, data bool) error {
		n += int64(length)
		return nil
	})
	return n, err
}

// forHeld calls f for each run of block b the top defines: data at fileOff
// in the top's file, or zeros (data false). The entry and bitmap are
// loaded without a lock: a run changed meanwhile marks the block again.
func (m *LiveMerge) forHeld(b uint64, f func(pos, length, fileOff uint64, data bool) error) error {
	t := m.top
	bs := uint64(t.l.blockSize)
	pos := b * bs
	end := min(pos+bs, t.l.size)
	_, e, _, _ := t.locate(pos)
	switch batState(e) {
	case stateNotPresent:
		return nil
	case stateFullyPresent:
		return f(pos, end-pos, batFileOffset(e), true)
	case statePartiallyPresent:
		base := batFileOffset(e)
		return t.bitmapRuns(pos, end-pos, func(at, k uint64, set bool) error {
			if !set {
				return nil
			}
			return f(at, k, base+(at-pos), true)
		})
	default: // ZERO, UNDEFINED, UNMAPPED: the top defines zeros
		return f(pos, end-pos, 0, false)
	}
}

// errPaced stops a block's copy when pace says so.
var errPaced = errors.New("live merge: copy paused")

// copyBlock writes what the top defines in block b into the parent and
// returns the bytes copied. pace, if not nil, is called after each piece
// and stops the copy by returning false.
func (m *LiveMerge) copyBlock(b uint64, buf []byte, pace func(n int64) bool) (int64, error) {
	var n int64
	err := m.forHeld(b, func(pos, length, fileOff uint64, data bool) error {
		for off := uint64(0); off < length; off += uint64(len(buf)) {
			k := min(uint64(len(buf)), length-off)
			if err := m.copyPiece(b, buf[:k], pos+off, fileOff+off, data); err != nil {
				return err
			}
			n += int64(k)
			if pace != nil && !pace(int64(k)) {
				return errPaced
			}
		}
		return nil
	})
	if errors.Is(err, errPaced) {
		err = nil // the caller has the pacing error
	}
	return n, err
}

// copyPiece copies one piece: read from the top's file (inside an epoch of
// the top, so its range is not reused meanwhile) or zeros, then written to
// the parent unless it reads zeros already where zeros are to be written.
func (m *LiveMerge) copyPiece(b uint64, p []byte, pos, fileOff uint64, data bool) error {
	if data {
		ep := m.top.ep.enter()
		err := m.top.readPayload(p, fileOff)
		m.top.ep.exit(ep)
		if err != nil {
			return fmt.Errorf("live merge: read the top at %#x: %w", pos, err)
		}
	} else {
		if _, err := m.parent.ReadAt(p, int64(pos)); err != nil {
			return fmt.Errorf("live merge: read the parent at %#x: %w", pos, err)
		}
		if allZero(p) {
			return nil
		}
		clear(p)
	}
	if m.afterRead != nil {
		m.afterRead(b)
	}
	if _, err := m.parent.WriteAt(p, int64(pos)); err != nil {
		return fmt.Errorf("live merge: write the parent %s at %#x: %w", m.parent.path, pos, err)
	}
	return nil
}

// Finish ends a merge whose Run returned nil (step 3): the blocks still
// dirty are copied with I/O excluded, the parent is flushed, the top is
// removed and closed, and the parent is returned as the new top (I/O
// through the LiveMerge goes to it from now on). On an error before the
// top is removed, the chain is served as it was and the merge is failed
// (Abandon it); after, the parent is the top and the error is a note
// about closing the removed top.
func (m *LiveMerge) Finish() (*Image, error) {
	m.io.Lock()
	defer m.io.Unlock()
	if s := *m.state.Load(); s != MergeReady || m.running.Load() {
		return nil, fmt.Errorf("live merge: Finish in state %s: %w", s, ErrMergeState)
	}
	buf := make([]byte, commitPiece)
	for b := uint64(0); b < m.blocks; b++ {
		if !m.clean(b) {
			continue
		}
		n, err := m.copyBlock(b, buf, nil)
		if err != nil {
			m.mark(b)
			return nil, m.fail(err)
		}
		m.recopied.Add(n)
	}
	if m.inFinish != nil {
		m.inFinish()
	}
	if err := m.parent.Flush(); err != nil {
		return nil, m.fail(fmt.Errorf("live merge: flush the parent %s: %w", m.parent.path, err))
	}
	if err := m.remove(); err != nil {
		return nil, m.fail(fmt.Errorf("live merge: remove the top %s: %w", m.top.path, err))
	}
	// From here the parent is the disk. Its next data write rotates its
	// DataWriteGuid (§2.2.2), so that a top brought back by a file system
	// that lost the unlink no longer matches it and is refused rather
	// than read over newer data.
	p := m.parent
	p.mu.Lock()
	p.opts.DataWriteGUID = uuid.Nil
	p.dataSession.Store(false)
	p.mu.Unlock()
	m.top.parent = nil // the parent outlives the top
	cerr := m.top.Close()
	m.cur, m.tracking = p, false
	m.setState(MergeDone)
	if cerr != nil {
		return p, fmt.Errorf("live merge: the merge is done; closing the removed top %s: %w", m.top.path, cerr)
	}
	return p, nil
}

// Abandon stops tracking: the chain top→parent stays as it is (the parent
// open read-write under the top, partly updated with data the top hides)
// and is returned; serve it directly from now on. The files form a valid
// chain reading the same; a later merge starts again.
func (m *LiveMerge) Abandon() *Image {
	m.io.Lock()
	defer m.io.Unlock()
	m.tracking = false
	if s := *m.state.Load(); s != MergeFailed && s != MergeDone {
		m.setState(MergeAbandoned)
	}
	return m.cur
}

// The blk.Disk side: every operation goes to the current image; a write,
// discard or write-zeroes on the top marks its blocks after it completed
// (failed ones too: they may have written part).

func (m *LiveMerge) ReadAt(p []byte, off int64) (int, error) {
	m.io.RLock()
	defer m.io.RUnlock()
	return m.cur.ReadAt(p, off)
}

func (m *LiveMerge) ReadVec(bufs [][]byte, off int64) error {
	m.io.RLock()
	defer m.io.RUnlock()
	return m.cur.ReadVec(bufs, off)
}

func (m *LiveMerge) WriteAt(p []byte, off int64) (int, error) {
	m.io.RLock()
	defer m.io.RUnlock()
	n, err := m.cur.WriteAt(p, off)
	if m.tracking {
		m.markRange(off, int64(len(p)))
	}
	return n, err
}

func (m *LiveMerge) WriteVec(bufs [][]byte, off int64) error {
	m.io.RLock()
	defer m.io.RUnlock()
	err := m.cur.WriteVec(bufs, off)
	if m.tracking {
		m.markRange(off, int64(vecLen(bufs)))
	}
	return err
}

func (m *LiveMerge) Discard(off, n int64) error {
	m.io.RLock()
	defer m.io.RUnlock()
	err := m.cur.Discard(off, n)
	if m.tracking {
		m.markRange(off, n)
	}
	return err
}

func (m *LiveMerge) WriteZeroes(off, n int64, unmap bool) error {
	m.io.RLock()
	defer m.io.RUnlock()
	err := m.cur.WriteZeroes(off, n, unmap)
	if m.tracking {
		m.markRange(off, n)
	}
	return err
}

func (m *LiveMerge) Flush() error {
	m.io.RLock()
	defer m.io.RUnlock()
	return m.cur.Flush()
}

func (m *LiveMerge) Size() int64                { return m.top.Size() }
func (m *LiveMerge) LogicalSectorSize() uint32  { return m.top.LogicalSectorSize() }
func (m *LiveMerge) PhysicalSectorSize() uint32 { return m.top.PhysicalSectorSize() }
