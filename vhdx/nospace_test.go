package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// fullDisk is an in-memory Storage that accounts for host space the way a
// file system does: a 4 KiB page takes space from the first write into it
// or from allocate (fallocate), and gives it back when a hole is punched
// over it or the file is cut. A call that needs new pages beyond limit
// fails with ENOSPC after writing what fit, as write(2) does; allocate is
// all or nothing, as fallocate(2) on ext4 and tmpfs is.
//
// Calls that take space (a write or allocate touching an unallocated page,
// a Truncate that extends the file) are numbered from 1; failAt = N fails
// the N-th with ENOSPC once, after writing the first half of a write, so
// every place where the engine can meet a full disk is visited by
// enumerating N.
type fullDisk struct {
	mu     sync.Mutex
	data   []byte
	pages  []bool // pages[i]: page i holds host space
	used   int    // pages holding space
	limit  int    // most pages that may hold space; < 0: no limit
	ops    int    // space-taking calls so far
	failAt int
	// What a power loss keeps: the file as of the last Sync, and the
	// changes since (faultstorage_test.go's operations).
	durable []byte
	pending []faultOp
}

const fullDiskPage = 4096

// newFullDisk starts from img; its non-zero pages hold space, zero pages
// are holes (the engine creates images sparse).
func newFullDisk(img []byte) *fullDisk {
	d := &fullDisk{data: bytes.Clone(img), durable: bytes.Clone(img), limit: -1}
	d.pages = make([]bool, (len(img)+fullDiskPage-1)/fullDiskPage)
	for i := range d.pages {
		end := min((i+1)*fullDiskPage, len(img))
		if bytes.ContainsFunc(img[i*fullDiskPage:end], func(r rune) bool { return r != 0 }) {
			d.pages[i] = true
			d.used++
		}
	}
	return d
}

func errNoSpaceLeft(op string) error {
	return &os.PathError{Op: op, Path: "fulldisk", Err: syscall.ENOSPC}
}

// newPages counts the pages of [off, off+n) that hold no space.
func (d *fullDisk) newPages(off, n int64) int {
	c := 0
	for p := off / fullDiskPage; p*fullDiskPage < off+n; p++ {
		if p >= int64(len(d.pages)) || !d.pages[p] {
			c++
		}
	}
	return c
}

// grow extends the file to size bytes (reads as zeros, no space).
func (d *fullDisk) grow(size int64) {
	if size > int64(len(d.data)) {
		d.data = append(d.data, make([]byte, size-int64(len(d.data)))...)
	}
	d.growPages(size)
}

// growPages makes room in pages for a file of size bytes.
func (d *fullDisk) growPages(size int64) {
	if need := int((size + fullDiskPage - 1) / fullDiskPage); need > len(d.pages) {
		d.pages = append(d.pages, make([]bool, need-len(d.pages))...)
	}
}

// take gives page p space; false when the limit is reached.
func (d *fullDisk) take(p int64, ignoreLimit bool) bool {
	if d.pages[p] {
		return true
	}
	if !ignoreLimit && d.limit >= 0 && d.used >= d.limit {
		return false
	}
	d.pages[p] = true
	d.used++
	return true
}

// step counts a space-taking call and reports whether it is the injected
// failure.
func (d *fullDisk) step() bool {
	d.ops++
	return d.ops == d.failAt
}

func (d *fullDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("fulldisk: negative offset %d", off)
	}
	return readImageAt(d.data, p, off)
}

func (d *fullDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off > 1<<32 {
		return 0, fmt.Errorf("fulldisk: write at %d out of range", off)
	}
	n := int64(len(p))
	inject := d.newPages(off, n) > 0 && d.step()
	limit := n
	if inject {
		limit = n / 2
	}
	d.growPages(off + limit)
	// Take space page by page, as far as it goes.
	done := int64(0)
	for done < limit {
		pg := (off + done) / fullDiskPage
		if !d.take(pg, inject) {
			break
		}
		done = min((pg+1)*fullDiskPage-off, limit)
	}
	if off+done > int64(len(d.data)) {
		d.data = append(d.data, make([]byte, off+done-int64(len(d.data)))...)
	}
	copy(d.data[off:off+done], p[:done])
	if done > 0 {
		d.pending = append(d.pending, faultOp{off: off, data: bytes.Clone(p[:done])})
	}
	if done < n {
		return int(done), errNoSpaceLeft("write")
	}
	return int(n), nil
}

func (d *fullDisk) Truncate(size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if size < 0 || size > 1<<32 {
		return fmt.Errorf("fulldisk: truncate to %d out of range", size)
	}
	if size > int64(len(d.data)) {
		if d.step() {
			return errNoSpaceLeft("truncate")
		}
		d.grow(size)
		d.pending = append(d.pending, faultOp{truncate: true, off: size})
		return nil
	}
	d.pending = append(d.pending, faultOp{truncate: true, off: size})
	keep := int((size + fullDiskPage - 1) / fullDiskPage)
	for _, held := range d.pages[keep:] {
		if held {
			d.used--
		}
	}
	d.pages = d.pages[:keep]
	d.data = d.data[:size]
	return nil
}

// allocate is fallocate mode 0 (allocator).
func (d *fullDisk) allocate(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	need := d.newPages(off, n)
	if need == 0 {
		return nil
	}
	if d.step() || d.limit >= 0 && d.used+need > d.limit {
		return fmt.Errorf("fallocate: %w", syscall.ENOSPC)
	}
	if off+n > int64(len(d.data)) {
		d.pending = append(d.pending, faultOp{truncate: true, off: off + n})
	}
	d.grow(off + n)
	for p := off / fullDiskPage; p*fullDiskPage < off+n; p++ {
		d.take(p, true)
	}
	return nil
}

// zeroRange punches a hole (rangeZeroer): whole pages give their space
// back, partial ones are zeroed.
func (d *fullDisk) zeroRange(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	end := min(off+n, int64(len(d.data)))
	if off >= end {
		return nil
	}
	clear(d.data[off:end])
	d.pending = append(d.pending, faultOp{off: off, data: make([]byte, end-off)})
	for p := (off + fullDiskPage - 1) / fullDiskPage; (p+1)*fullDiskPage <= end; p++ {
		if d.pages[p] {
			d.pages[p] = false
			d.used--
		}
	}
	return nil
}

// zeroKeep is FALLOC_FL_ZERO_RANGE (allocZeroer): the range reads zeros
// and holds space, all or nothing.
func (d *fullDisk) zeroKeep(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	need := d.newPages(off, n)
	if need > 0 && (d.step() || d.limit >= 0 && d.used+need > d.limit) {
		return fmt.Errorf("fallocate zero range: %w", syscall.ENOSPC)
	}
	d.grow(off + n)
	clear(d.data[off : off+n])
	d.pending = append(d.pending, faultOp{off: off, data: make([]byte, n)})
	for p := off / fullDiskPage; p*fullDiskPage < off+n; p++ {
		d.take(p, true)
	}
	return nil
}

func (d *fullDisk) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, op := range d.pending {
		d.durable = applyFaultOp(d.durable, op)
	}
	d.pending = nil
	return nil
}

// afterPowerLoss is the file a power loss leaves now: what the last Sync
// made durable.
func (d *fullDisk) afterPowerLoss() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.durable)
}

func (d *fullDisk) Size() (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return int64(len(d.data)), nil
}

func (d *fullDisk) bytes() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.data)
}

func (d *fullDisk) opCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ops
}

// failAfter fails the n-th space-taking call from now (n ≥ 1) once.
func (d *fullDisk) failAfter(n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.failAt = d.ops + n
}

// setLimit allows at most extra more pages than are used now.
func (d *fullDisk) setLimit(extra int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.limit = d.used + extra
}

// freeSpace lifts the limit: the operator made room.
func (d *fullDisk) freeSpace() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.limit = -1
}

func TestFullDiskModelsPartialWritesAndHoles(t *testing.T) {
	d := newFullDisk(make([]byte, 4*fullDiskPage))
	d.setLimit(2)
	n, err := d.WriteAt(bytes.Repeat([]byte{1}, 3*fullDiskPage), 0)
	if n != 2*fullDiskPage || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write of 3 pages with room for 2 = %d, %v; want %d, ENOSPC", n, err, 2*fullDiskPage)
	}
	if err := d.zeroRange(0, fullDiskPage); err != nil || d.used != 1 {
		t.Fatalf("punch one page: %v, %d pages used, want 1", err, d.used)
	}
	if err := d.allocate(0, 3*fullDiskPage); !errors.Is(err, syscall.ENOSPC) || d.used != 1 {
		t.Fatalf("allocate 2 new pages with room for 1 = %v, %d pages used; want ENOSPC and 1 (all or nothing)", err, d.used)
	}
	d.freeSpace()
	if err := d.allocate(0, 4*fullDiskPage); err != nil || d.used != 4 {
		t.Fatalf("allocate after freeing: %v, %d pages used, want 4", err, d.used)
	}
	if err := d.Truncate(fullDiskPage); err != nil || d.used != 1 {
		t.Fatalf("truncate to one page: %v, %d pages used, want 1", err, d.used)
	}
}

// wantNoSpace fails unless err is the engine's full-disk error that still
// carries the errno.
func wantNoSpace(t *testing.T, err error, where string) {
	t.Helper()
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("%s: error %v, want ErrNoSpace wrapping ENOSPC", where, err)
	}
}

// noSpaceCase is an image and a workload whose writes need host space.
type noSpaceCase struct {
	name  string
	img   []byte
	open  func(t *testing.T, s Storage, ro bool) (*Image, error)
	base  []byte // the virtual disk before the workload
	work  []imageWrite
	child bool
}

func noSpaceCases(t *testing.T) []noSpaceCase {
	o := CreateOptions{Size: 64 * mib, BlockSize: mib}
	dyn := newMemStorage(nil)
	if err := CreateStorage(dyn, o); err != nil {
		t.Fatal(err)
	}
	openDyn := func(t *testing.T, s Storage, ro bool) (*Image, error) {
		return OpenStorage(s, OpenOptions{ReadOnly: ro})
	}
	// Blocks 1 and 2 discarded: their ranges are free inside the file, so
	// the first allocations reuse them (punched, then written).
	reuse := newMemStorage(bytes.Clone(dyn.bytes()))
	reuseBase := make([]byte, 64*mib)
	func() {
		im, err := OpenStorage(reuse, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		for b := int64(0); b < 4; b++ {
			if _, err := im.WriteAt(pattern(50+b, mib), b*mib); err != nil {
				t.Fatal(err)
			}
		}
		if err := im.Discard(mib, 2*mib); err != nil {
			t.Fatal(err)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		copy(reuseBase, pattern(50, mib))
		copy(reuseBase[3*mib:], pattern(53, mib))
	}()
	reuseWork := []imageWrite{
		{10 * mib, pattern(61, 4096)},     // reuses block 1's range
		{11*mib + 512, pattern(62, 8192)}, // reuses block 2's range
		{12 * mib, pattern(63, 4096)},     // fresh space at the end
		{3*mib + 4096, pattern(64, 4096)}, // an allocated block
	}
	co := CreateOptions{Size: 16 * mib, BlockSize: mib}
	baseData := pattern(1, 12*mib)
	mc := newMemChain(t, co, []imageWrite{{0, baseData}})
	openChild := func(t *testing.T, s Storage, ro bool) (*Image, error) { return mc.openChild(t, s, ro) }
	return []noSpaceCase{
		{name: "dynamic", img: dyn.bytes(), open: openDyn, base: make([]byte, 64*mib), work: imageWorkload()},
		{name: "dynamic-reuse", img: reuse.bytes(), open: openDyn, base: reuseBase, work: reuseWork},
		{name: "differencing", img: mc.child, open: openChild,
			base: append(bytes.Clone(baseData), make([]byte, 4*mib)...), work: childWorkload(), child: true},
	}
}

// verifyNoSpaceImage checks, after the image on d was closed, that it opens
// again, reads want, has no problem and no leaked tail, and is size bytes
// long (no range was leaked by the failed attempts).
func verifyNoSpaceImage(t *testing.T, c noSpaceCase, d *fullDisk, want []byte, size int, where string) {
	t.Helper()
	img := d.bytes()
	if size >= 0 && len(img) != size {
		t.Errorf("%s: file is %d bytes, a run without failures leaves %d: a failed attempt leaked space", where, len(img), size)
	}
	ck := &checker{collect: true}
	im, err := openStorage(newMemStorage(bytes.Clone(img)), OpenOptions{ReadOnly: true}, ck)
	if err != nil {
		t.Fatalf("%s: check open: %v", where, err)
	}
	im.Close()
	if len(ck.problems) > 0 || ck.dirtyLog {
		t.Fatalf("%s: check found %v (dirty log %v)", where, ck.problems, ck.dirtyLog)
	}
	if end := roundUp(ck.usedEnd, alignment); uint64(len(img)) > end {
		t.Errorf("%s: %d bytes leaked past the last used structure at %#x", where, uint64(len(img))-end, end)
	}
	im, err = c.open(t, newMemStorage(img), true)
	if err != nil {
		t.Fatalf("%s: reopen: %v", where, err)
	}
	defer im.Close()
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatalf("%s: read back: %v", where, err)
	}
	if !sameBytes(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: the disk differs from what was acknowledged at byte %#x", where, i)
	}
}

// verifyKilledImage checks img, the file as a killed daemon leaves it (every
// completed write kept, nothing closed): a read-write open replays its log
// and reads want, except that the range of failed, a write that was not
// acknowledged, may read its new data in part, and the closed image has no
// problem.
func verifyKilledImage(t *testing.T, c noSpaceCase, img, want []byte, failed imageWrite, where string) {
	t.Helper()
	rs := newMemStorage(img)
	im, err := c.open(t, rs, false)
	if err != nil {
		t.Fatalf("%s: reopen: %v", where, err)
	}
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatalf("%s: read: %v", where, err)
	}
	// Sector by sector, then byte by byte where a sector differs: a
	// byte loop over the whole disk is most of this test's time under -race.
	for sec := 0; sec < len(got); sec += 512 {
		end := min(sec+512, len(got))
		if sameBytes(got[sec:end], want[sec:end]) {
			continue
		}
		for i := sec; i < end; i++ {
			if got[i] == want[i] {
				continue
			}
			if j := int64(i) - failed.off; j >= 0 && j < int64(len(failed.data)) && got[i] == failed.data[j] {
				continue // the unacknowledged write got that far
			}
			t.Fatalf("%s: byte %#x reads %#x: neither what was acknowledged (%#x) nor the failed write", where, i, got[i], want[i])
		}
	}
	if err := im.Close(); err != nil {
		t.Fatalf("%s: close: %v", where, err)
	}
	ck := &checker{collect: true}
	im, err = openStorage(newMemStorage(rs.bytes()), OpenOptions{ReadOnly: true}, ck)
	if err != nil {
		t.Fatalf("%s: check open: %v", where, err)
	}
	im.Close()
	if len(ck.problems) > 0 || ck.dirtyLog {
		t.Fatalf("%s: check found %v (dirty log %v)", where, ck.problems, ck.dirtyLog)
	}
}

// TestNoSpaceAtEveryGrowthCallFailsCleanlyAndRetrySucceeds injects ENOSPC
// into each call that takes host space during each write of a workload
// (the header update of the first write, the file extension, the payload
// write into fresh space, the log and the BAT sector and bitmap blocks the
// journal reserves) on a dynamic and a differencing image. The write fails
// with ErrNoSpace, the same write succeeds once space is back without a
// reopen, the rest of the workload goes on, everything acknowledged reads
// back, the image checks clean and the file is as long as after a run
// that never failed. The file as a daemon killed, or a power loss, right
// after the failure would leave it opens, reads what was acknowledged
// (every write is flushed) and checks clean.
func TestNoSpaceAtEveryGrowthCallFailsCleanlyAndRetrySucceeds(t *testing.T) {
	parallelSweep(t)
	for _, c := range noSpaceCases(t) {
		t.Run(c.name, func(t *testing.T) {
			want := bytes.Clone(c.base)
			for _, w := range c.work {
				copy(want[w.off:], w.data)
			}
			// Reference: how many space-taking calls each write makes.
			ref := newFullDisk(c.img)
			im, err := c.open(t, ref, false)
			if err != nil {
				t.Fatal(err)
			}
			calls := make([]int, len(c.work))
			for i, w := range c.work {
				before := ref.opCount()
				if _, err := im.WriteAt(w.data, w.off); err != nil {
					t.Fatalf("reference write %d: %v", i, err)
				}
				if err := im.Flush(); err != nil {
					t.Fatalf("reference flush %d: %v", i, err)
				}
				calls[i] = ref.opCount() - before
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			refSize := len(ref.bytes())
			total := 0
			for _, n := range calls {
				total += n
			}
			if total < len(c.work) {
				t.Fatalf("the workload makes %d space-taking calls for %d writes: it does not exercise growth", total, len(c.work))
			}

			for wi := range c.work {
				for n := 1; n <= calls[wi]; n++ {
					where := fmt.Sprintf("write %d, space call %d of %d", wi, n, calls[wi])
					d := newFullDisk(c.img)
					im, err := c.open(t, d, false)
					if err != nil {
						t.Fatal(err)
					}
					acked := bytes.Clone(c.base)
					for i, w := range c.work {
						if i == wi {
							d.failAfter(n)
							_, err := im.WriteAt(w.data, w.off)
							wantNoSpace(t, err, where)
							verifyKilledImage(t, c, d.bytes(), acked, w, where+", killed right after the failure")
							verifyKilledImage(t, c, d.afterPowerLoss(), acked, w, where+", power lost right after the failure")
						}
						copy(acked[w.off:], w.data)
						if _, err := im.WriteAt(w.data, w.off); err != nil {
							t.Fatalf("%s: write %d once space is back: %v", where, i, err)
						}
						if err := im.Flush(); err != nil {
							t.Fatalf("%s: flush %d: %v", where, i, err)
						}
					}
					if err := im.Flush(); err != nil {
						t.Fatalf("%s: flush: %v", where, err)
					}
					if err := im.Close(); err != nil {
						t.Fatalf("%s: close: %v", where, err)
					}
					verifyNoSpaceImage(t, c, d, want, refSize, where)
				}
			}
		})
	}
}

// TestFullDiskRetriesNeitherGrowTheFileNorWedgeTheImage fills a size-limited
// disk by writing block after block: the write that does not fit fails with
// ErrNoSpace, retrying it many times while the disk stays full changes
// neither the file size nor the space used, every write acknowledged before
// still reads back, and once space is freed the same image (no reopen)
// takes the failed write and more.
func TestFullDiskRetriesNeitherGrowTheFileNorWedgeTheImage(t *testing.T) {
	parallelSweep(t)
	for _, c := range noSpaceCases(t) {
		t.Run(c.name, func(t *testing.T) {
			d := newFullDisk(c.img)
			// Room for the log, a few blocks and part of the next.
			d.setLimit(256 + 3*257 + 100)
			im, err := c.open(t, d, false)
			if err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(c.base)
			bs := int64(mib)
			var failed imageWrite
			for b := int64(0); ; b++ {
				// Half a block from the middle: the differencing image
				// takes its bitmap path, the dynamic one a fresh block.
				w := imageWrite{b*bs + bs/4, pattern(100+b, int(bs/2))}
				if w.off+int64(len(w.data)) > int64(len(want)) {
					t.Fatal("the disk never filled")
				}
				if _, err := im.WriteAt(w.data, w.off); err != nil {
					wantNoSpace(t, err, fmt.Sprintf("write to block %d", b))
					failed = w
					break
				}
				copy(want[w.off:], w.data)
			}
			size, used := len(d.bytes()), d.used
			for i := range 50 {
				_, err := im.WriteAt(failed.data, failed.off)
				wantNoSpace(t, err, fmt.Sprintf("retry %d while full", i))
				if len(d.bytes()) != size || d.used != used {
					t.Fatalf("retry %d: file %d bytes, %d pages used; after the first failure %d bytes, %d pages",
						i, len(d.bytes()), d.used, size, used)
				}
			}
			got := make([]byte, len(want))
			if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("while full, acknowledged writes do not read back (%v)", err)
			}
			d.freeSpace()
			if _, err := im.WriteAt(failed.data, failed.off); err != nil {
				t.Fatalf("the failed write once space is freed: %v", err)
			}
			copy(want[failed.off:], failed.data)
			next := imageWrite{failed.off + bs, pattern(99, int(bs/2))}
			if _, err := im.WriteAt(next.data, next.off); err != nil {
				t.Fatalf("a write to a new block once space is freed: %v", err)
			}
			copy(want[next.off:], next.data)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			verifyNoSpaceImage(t, c, d, want, -1, "after space was freed")
		})
	}
}

func TestNoSpaceWrapsOnlySpaceErrnos(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{syscall.ENOSPC, true},
		{&os.PathError{Op: "write", Path: "x", Err: syscall.EDQUOT}, true},
		{syscall.EFBIG, false}, // freeing space does not cure it
		{syscall.EIO, false},
		{io.EOF, false},
	}
	for _, tt := range tests {
		err := noSpace(tt.err)
		if got := errors.Is(err, ErrNoSpace); got != tt.want {
			t.Errorf("noSpace(%v) is ErrNoSpace: %v, want %v", tt.err, got, tt.want)
		}
		if !errors.Is(err, tt.err) {
			t.Errorf("noSpace(%v) = %v lost the original error", tt.err, err)
		}
	}
}

// TestRealSmallFileSystemFullFailsWritesAndRecoversWhenSpaceIsFreed fills
// a real size-limited file system (a tmpfs with size=, a loop-mounted
// ext4) with an image and a filler file: the write that does not fit fails
// with ErrNoSpace, retries while full change neither the file's size nor
// its host blocks, removing the filler lets the same open image take the
// write and more, and the closed image checks clean with everything
// acknowledged readable.
func TestRealSmallFileSystemFullFailsWritesAndRecoversWhenSpaceIsFreed(t *testing.T) {
	for _, fs := range []struct {
		name  string
		mount func(testing.TB, int64) string
	}{
		{"tmpfs", vhdxtest.SmallFS},
		{"ext4", vhdxtest.SmallExt4},
	} {
		t.Run(fs.name, func(t *testing.T) { fillRealFileSystem(t, fs.mount(t, 12*mib)) })
	}
}

func fillRealFileSystem(t *testing.T, dir string) {
	path := filepath.Join(dir, "disk.vhdx")
	if err := Create(path, CreateOptions{Size: 64 * mib, BlockSize: mib}); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	vhdxtest.Fill(t, filler, 4*mib)
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	want := make([]byte, 64*mib)
	var failed imageWrite
	for b := int64(0); ; b++ {
		w := imageWrite{b * mib, pattern(200+b, mib)}
		if b == 64 {
			t.Fatal("the file system never filled")
		}
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			wantNoSpace(t, err, fmt.Sprintf("write to block %d", b))
			failed = w
			break
		}
		copy(want[w.off:], w.data)
	}
	stat := func() (size, blocks int64) {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Size, st.Blocks
	}
	size, blocks := stat()
	for i := range 10 {
		_, err := im.WriteAt(failed.data, failed.off)
		wantNoSpace(t, err, fmt.Sprintf("retry %d while full", i))
		if s, b := stat(); s != size || b != blocks {
			t.Fatalf("retry %d: file %d bytes in %d blocks; after the first failure %d in %d", i, s, b, size, blocks)
		}
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for _, w := range []imageWrite{failed, {failed.off + mib, pattern(300, mib)}} {
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			t.Fatalf("write at %#x once space is freed: %v", w.off, err)
		}
		copy(want[w.off:], w.data)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	rep, err := Check(path, false)
	if err != nil || rep.Damaged() || rep.LeakedBytes != 0 {
		t.Fatalf("check: %v, problems %+v, leaked %d", err, rep, rep.LeakedBytes)
	}
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("acknowledged writes do not read back (%v)", err)
	}
}

// TestZeroingThatNeedsSpaceFailsCleanlyAndDiscardNeedsNone: write-zeroes
// without unmap keeps a block allocated, so over the holes of a thin block
// it needs host space: on a full disk it fails with ErrNoSpace and leaves
// the data, and succeeds once space is freed. A discard gives space back
// and works on the full disk.
func TestZeroingThatNeedsSpaceFailsCleanlyAndDiscardNeedsNone(t *testing.T) {
	c := noSpaceCases(t)[0]
	d := newFullDisk(c.img)
	im, err := c.open(t, d, false)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64*mib)
	for _, w := range []imageWrite{{0, pattern(7, 4096)}, {2 * mib, pattern(8, 8192)}} {
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], w.data)
	}
	d.setLimit(0)
	wantNoSpace(t, im.WriteZeroes(0, mib, false), "write-zeroes (keep allocated) over a thin block")
	if err := im.Discard(2*mib, mib); err != nil {
		t.Fatalf("discard on a full disk: %v", err)
	}
	clear(want[2*mib : 3*mib])
	if err := im.Flush(); err != nil {
		t.Fatalf("flush on a full disk: %v", err)
	}
	d.freeSpace()
	if err := im.WriteZeroes(0, mib, false); err != nil {
		t.Fatalf("write-zeroes once space is freed: %v", err)
	}
	clear(want[:mib])
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	verifyNoSpaceImage(t, c, d, want, -1, "after zeroing and discarding")
}

// BenchmarkJournalReserveOneSector is what reserving host space adds to a
// commit of one BAT sector in steady state (the log already reserved, the
// sector allocated): one fstat and one fallocate over an allocated range.
func BenchmarkJournalReserveOneSector(b *testing.B) {
	p := createFile(b, CreateOptions{Size: 64 * mib, BlockSize: mib})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil { // starts the journal, reserves the log
		b.Fatal(err)
	}
	u := []logUpdate{{offset: im.l.bat.offset, data: make([]byte, logSectorSize)}}
	im.mu.Lock()
	defer im.mu.Unlock()
	for b.Loop() {
		if err := im.journal.reserve(u); err != nil {
			b.Fatal(err)
		}
	}
}
