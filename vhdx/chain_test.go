package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// makeChain creates base.vhdx (with o) and depth children, each over the
// previous one, in a temp dir; it returns the paths, base first. fill, if
// not nil, is called on each layer before the next is created over it.
func makeChain(t testing.TB, o CreateOptions, depth int, fill func(layer int, path string)) []string {
	t.Helper()
	return makeChainWith(t, o, CreateOptions{}, depth, fill)
}

// makeChainWith is makeChain with the children created with co (plus
// ParentPath).
func makeChainWith(t testing.TB, o, co CreateOptions, depth int, fill func(layer int, path string)) []string {
	t.Helper()
	dir := t.TempDir()
	paths := []string{filepath.Join(dir, "base.vhdx")}
	if err := Create(paths[0], o); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= depth; i++ {
		if fill != nil {
			fill(i-1, paths[i-1])
		}
		p := filepath.Join(dir, fmt.Sprintf("child%d.avhdx", i))
		co.ParentPath = paths[i-1]
		if err := Create(p, co); err != nil {
			t.Fatalf("create child %d: %v", i, err)
		}
		paths = append(paths, p)
	}
	if fill != nil {
		fill(depth, paths[depth])
	}
	return paths
}

func writeImage(t testing.TB, path string, off int64, data []byte) {
	t.Helper()
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(data, off); err != nil {
		t.Fatalf("write %s at %#x: %v", path, off, err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}

func readAll(t testing.TB, im *Image) []byte {
	t.Helper()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatalf("read %s: %v", im.Path(), err)
	}
	return b
}

// TestEmptyChildrenReadTheirBase: children that were never written read
// exactly what their base reads, at every depth, and report the chain.
func TestEmptyChildrenReadTheirBase(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 3, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, mib-512, pattern(1, 3*mib))
		}
	})
	want := make([]byte, 16*mib)
	copy(want[mib-512:], pattern(1, 3*mib))
	for d, p := range paths {
		im, err := Open(p, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("open depth %d: %v", d, err)
		}
		if im.Depth() != d || (d > 0) != (im.Parent() != nil) || im.Path() != p {
			t.Fatalf("depth %d: Depth %d Parent %v Path %s", d, im.Depth(), im.Parent() != nil, im.Path())
		}
		if !bytes.Equal(readAll(t, im), want) {
			t.Fatalf("depth %d reads differently from its base", d)
		}
		if d > 0 && im.Info().Type != Differencing {
			t.Fatalf("type %v", im.Info().Type)
		}
		im.Close()
	}
}

// sparseModel is the flat model of a large virtual disk: 1 MiB pages,
// absent pages read as zeros.
type sparseModel map[int64][]byte

func (m sparseModel) write(off int64, p []byte) {
	for len(p) > 0 {
		pg, in := off/mib, off%mib
		b, ok := m[pg]
		if !ok {
			b = make([]byte, mib)
			m[pg] = b
		}
		n := copy(b[in:], p)
		p, off = p[n:], off+int64(n)
	}
}

func (m sparseModel) read(off int64, n int) []byte {
	out := make([]byte, n)
	for done := 0; done < n; {
		pg, in := (off+int64(done))/mib, (off+int64(done))%mib
		k := min(n-done, int(mib-in))
		if b, ok := m[pg]; ok {
			copy(out[done:done+k], b[in:])
		}
		done += k
	}
	return out
}

// windows lists the ranges worth comparing: each written range widened by
// two sectors... rounded out to whole MiB on each side, plus the start and
// end of the disk.
func (m sparseModel) windows(size int64) [][2]int64 {
	var w [][2]int64
	for pg := range m {
		lo, hi := max(0, (pg-1)*mib), min(size, (pg+2)*mib)
		w = append(w, [2]int64{lo, hi})
	}
	return append(w, [2]int64{0, min(size, mib)}, [2]int64{size - min(size, mib), size})
}

// compareChain reads every window of im (ReadAt, and ReadVec with buffers
// split off sector boundaries) and compares it with the model.
func compareChain(t *testing.T, im *Image, m sparseModel, where string) {
	t.Helper()
	for _, w := range m.windows(im.Size()) {
		want := m.read(w[0], int(w[1]-w[0]))
		got := make([]byte, w[1]-w[0])
		if _, err := im.ReadAt(got, w[0]); err != nil {
			t.Fatalf("%s: read [%#x, %#x): %v", where, w[0], w[1], err)
		}
		if i := vhdxtest.FirstDiff(got, want); i >= 0 {
			t.Fatalf("%s: ReadAt differs from the model at %#x", where, w[0]+int64(i))
		}
		clear(got)
		bufs := [][]byte{got[:100], got[100:5000], got[5000:]}
		if err := im.ReadVec(bufs, w[0]); err != nil {
			t.Fatalf("%s: ReadVec [%#x, %#x): %v", where, w[0], w[1], err)
		}
		if i := vhdxtest.FirstDiff(got, want); i >= 0 {
			t.Fatalf("%s: ReadVec differs from the model at %#x", where, w[0]+int64(i))
		}
	}
}

// TestChainReadsWhatAFlatModelReads: chains of depth 1 to 3, each layer
// written at awkward places (single sectors, runs across block, bitmap page
// and chunk boundaries, whole blocks, rewrites of sectors already present),
// read exactly as a flat byte model where later layers win.
func TestChainReadsWhatAFlatModelReads(t *testing.T) {
	parallelSweep(t)
	type w = imageWrite
	const gb4 = 4 * gib
	tests := []struct {
		name   string
		opts   CreateOptions
		depth  int
		layers [][]imageWrite // writes per layer, base first
		child  CreateOptions  // options of the children
	}{
		{"Depth1SingleSectors", CreateOptions{Size: 64 * mib, BlockSize: mib}, 1, [][]imageWrite{
			{{0, pattern(1, 2*mib)}},
			{{512, pattern(2, 512)}, {mib - 512, pattern(3, 512)}, {1536, pattern(4, 1024)}, {5 * mib, pattern(5, 512)}},
		}, CreateOptions{}},
		{"Depth1RunAcrossBlocksAndWholeBlock", CreateOptions{Size: 64 * mib, BlockSize: mib}, 1, [][]imageWrite{
			{{mib / 2, pattern(1, 3*mib)}},
			{{mib - 1024, pattern(2, mib+4096)}, {3 * mib, pattern(3, mib)}, {10 * mib, pattern(4, mib)}, {mib - 512, pattern(5, 512)}},
		}, CreateOptions{}},
		{"Depth1PartialBlockMadeWhole", CreateOptions{Size: 64 * mib, BlockSize: mib}, 1, [][]imageWrite{
			{{0, pattern(1, 4*mib)}},
			{{mib + 4096, pattern(2, 4096)}, {mib, pattern(3, mib)}, {mib + 8192, pattern(4, 512)}},
		}, CreateOptions{}},
		{"Depth2ChunkBoundary", CreateOptions{Size: gb4 + 8*mib, BlockSize: mib}, 2, [][]imageWrite{
			{{gb4 - mib, pattern(1, 2*mib)}},
			{{gb4 - 2048, pattern(2, 4096)}},
			{{gb4 - 512, pattern(3, 1024)}, {gb4 + 8*mib - 512, pattern(4, 512)}},
		}, CreateOptions{}},
		{"Depth2BitmapPageBoundary", CreateOptions{Size: 256 * mib, BlockSize: 32 * mib}, 2, [][]imageWrite{
			{{0, pattern(1, 40*mib)}},
			{{16*mib - 512, pattern(2, 1024)}, {100 * mib, pattern(3, 512)}},
			{{16*mib - 4096, pattern(4, 8192)}, {32*mib - 512, pattern(5, 1024)}, {100*mib + 512, pattern(6, 512)}},
		}, CreateOptions{}},
		{"Depth3Layered", CreateOptions{Size: 32 * mib, BlockSize: mib}, 3, [][]imageWrite{
			{{0, pattern(1, 8*mib)}},
			{{4096, pattern(2, 512)}, {2 * mib, pattern(3, mib)}},
			{{4096 + 512, pattern(4, 512)}, {2*mib + 512, pattern(5, 512)}},
			{{0, pattern(6, 512)}, {4096, pattern(7, 1024)}, {20 * mib, pattern(8, 512)}},
		}, CreateOptions{}},
		{"Sector4096Depth2", CreateOptions{Size: 64 * mib, BlockSize: mib, LogicalSectorSize: 4096}, 2, [][]imageWrite{
			{{0, pattern(1, 3*mib)}},
			{{4096, pattern(2, 4096)}, {mib - 4096, pattern(3, 8192)}},
			{{8192, pattern(4, 4096)}, {2*mib + 4096, pattern(5, 4096)}, {mib, pattern(6, mib)}},
		}, CreateOptions{}},
		{"ChildBlocksLargerThanParents", CreateOptions{Size: 64 * mib, BlockSize: mib}, 2, [][]imageWrite{
			{{0, pattern(1, 6*mib)}},
			{{3*mib - 512, pattern(2, 2048)}, {9 * mib, pattern(3, 512)}},
			{{3*mib + 512, pattern(4, 512)}, {4 * mib, pattern(5, 4*mib)}, {8*mib - 512, pattern(6, 1024)}},
		}, CreateOptions{BlockSize: 4 * mib}},
		{"Sector4096ChunkBoundary", CreateOptions{Size: 32*gib + 4*mib, BlockSize: 4 * mib, LogicalSectorSize: 4096}, 1, [][]imageWrite{
			{{32*gib - 4096, pattern(1, 8192)}},
			{{32*gib - 8192, pattern(2, 16384)}},
		}, CreateOptions{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			model := sparseModel{}
			paths := makeChainWith(t, tc.opts, tc.child, tc.depth, func(layer int, p string) {
				for _, wr := range tc.layers[layer] {
					writeImage(t, p, wr.off, wr.data)
					model.write(wr.off, wr.data)
				}
			})
			im, err := Open(paths[tc.depth], OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			compareChain(t, im, model, "top")
			// A second pass over a cache too small for the bitmaps
			// evicts pages on every lookup and must read the same.
			im2, err := Open(paths[tc.depth], OpenOptions{ReadOnly: true, NoLock: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im2.Close()
			shrinkBitmapCaches(im2, 1)
			compareChain(t, im2, model, "one-page cache")
			for l := im2; l != nil; l = l.parent {
				if c := l.bitmaps; c != nil && len(c.pages) > 1 {
					t.Errorf("layer %d's bitmap cache holds %d pages after the pass, want at most 1", l.depth, len(c.pages))
				}
			}
		})
	}
}

// TestChildWriteLaysOutBitmapPerSpec decodes a child's file by hand after
// one-sector writes: the payload entry is PARTIALLY_PRESENT (7), the chunk's
// sector bitmap entry (k+1)*(ChunkRatio+1)-1 is SB_BLOCK_PRESENT (6), and the
// written sectors' bits are set LSB first (§2.4), nothing else.
func TestChildWriteLaysOutBitmapPerSpec(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 4*gib + 64*mib, BlockSize: mib}, 1, nil)
	// Sector 1 of block 0, sector 9 of block 2, and sector 3 of the first
	// block of chunk 1 (4 GiB, chunk ratio 4096).
	for _, off := range []int64{512, 2*mib + 9*512, 4*gib + 3*512} {
		writeImage(t, paths[1], off, pattern(off, 512))
	}
	b, err := os.ReadFile(paths[1])
	if err != nil {
		t.Fatal(err)
	}
	const cr = 4096
	bat := int64(3 * mib) // layout of Create: log 1 MiB, metadata 1 MiB, BAT
	entry := func(i int64) uint64 { return le.Uint64(b[bat+8*i:]) }
	for _, c := range []struct {
		idx   int64
		state uint64
	}{{0, statePartiallyPresent}, {1, stateNotPresent}, {2, statePartiallyPresent}, {cr, stateFullyPresent},
		{cr + 1, statePartiallyPresent}, {2*(cr+1) - 1, stateFullyPresent}} {
		if got := batState(entry(c.idx)); got != c.state {
			t.Fatalf("BAT entry %d has state %d, want %d", c.idx, got, c.state)
		}
	}
	sb0 := b[batFileOffset(entry(cr)):][:mib]
	sb1 := b[batFileOffset(entry(2*(cr+1)-1)):][:mib]
	// Block 2 starts at sector 2*2048 of the chunk.
	want0 := map[int]byte{0: 0x02, (2*2048 + 9) / 8: 1 << ((2*2048 + 9) % 8)}
	for i, v := range sb0 {
		if v != want0[i] {
			t.Fatalf("chunk 0 bitmap byte %d is %#x, want %#x", i, v, want0[i])
		}
	}
	for i, v := range sb1 {
		if want := map[int]byte{0: 0x08}[i]; v != want {
			t.Fatalf("chunk 1 bitmap byte %d is %#x, want %#x", i, v, want)
		}
	}
}

// TestChildSurvivesParentRepairAndIdleSessions: §2.2.2 DataWriteGuid
// discipline. A repair that truncates leaked space, and a read-write open
// closed without writing, leave the parent's DataWriteGuid alone, so its
// child still opens; the first guest write changes it (to
// OpenOptions.DataWriteGUID when given), which orphans the child.
func TestChildSurvivesParentRepairAndIdleSessions(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 64 * mib, BlockSize: mib}, 1, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, 0, pattern(1, mib))
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := f.Stat()
			if err := f.Truncate(fi.Size() + 3*mib); err != nil { // leaked tail
				t.Fatal(err)
			}
			f.Close()
		}
	})
	childOpens := func(step string) error {
		im, err := Open(paths[1], OpenOptions{ReadOnly: true})
		if err == nil {
			im.Close()
		}
		return err
	}
	rep, err := Check(paths[0], true)
	if err != nil || rep.LeakedBytes == 0 || !rep.Problems[len(rep.Problems)-1].Repaired {
		t.Fatalf("repair: %v %+v", err, rep)
	}
	if err := childOpens("repair"); err != nil {
		t.Fatalf("child after the parent's repair: %v", err)
	}
	im, err := Open(paths[0], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if err := childOpens("idle session"); err != nil {
		t.Fatalf("child after an idle read-write session of the parent: %v", err)
	}
	want := uuid.New()
	im, err = Open(paths[0], OpenOptions{DataWriteGUID: want})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if got := im.Info().DataWriteGUID; got != want {
		t.Fatalf("DataWriteGuid after a write %v, want OpenOptions.DataWriteGUID %v", got, want)
	}
	im.Close()
	if err := childOpens("write"); !errors.Is(err, ErrParentLinkage) || !strings.Contains(err.Error(), want.String()) {
		t.Fatalf("child after a write to its parent: %v, want ErrParentLinkage naming %v", err, want)
	}
}

// relink points the child at path to parent, whatever the parent is (a
// test's way to build broken chains Rebase refuses).
func relink(t *testing.T, child, parent string, linkage uuid.UUID) {
	t.Helper()
	pl, err := newParentLocator(child, parent, linkage)
	if err != nil {
		t.Fatal(err)
	}
	rewriteLocator(t, child, func(*parentLocator) *parentLocator { return pl })
}

// setLocatorAbsolutePath points absolute_win32_path of the child at path to
// parent (written the Windows way), leaving the other locator entries alone.
func setLocatorAbsolutePath(t *testing.T, child, parent string) {
	t.Helper()
	rewriteLocator(t, child, func(old *parentLocator) *parentLocator {
		pl := old.clone()
		pl.set(keyAbsolutePath, strings.ReplaceAll(parent, "/", `\`))
		return pl
	})
}

// rewriteLocator replaces the parent locator of the image at path with
// what edit makes of the current one.
func rewriteLocator(t *testing.T, path string, edit func(*parentLocator) *parentLocator) {
	t.Helper()
	im, err := openFile(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pl := edit(im.l.locator)
	im.mu.Lock()
	err = im.rewriteLocatorLocked(pl)
	im.mu.Unlock()
	if err != nil {
		im.Close()
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}

func dataWriteGUID(t *testing.T, path string) uuid.UUID {
	t.Helper()
	im, err := openFile(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	return im.l.hdr.dataWriteGUID
}

func childLinkage(t *testing.T, path string) uuid.UUID {
	t.Helper()
	im, err := openFile(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	return im.l.locator.linkage
}

// replaceWithImpostor puts an image made with o at path, its DataWriteGuid
// set to linkage so that only the geometry differs.
func replaceWithImpostor(t *testing.T, path string, o CreateOptions, linkage uuid.UUID) {
	t.Helper()
	tmp := path + ".new"
	if err := Create(tmp, o); err != nil {
		t.Fatal(err)
	}
	im, err := Open(tmp, OpenOptions{DataWriteGUID: linkage})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	im.Close()
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestOpenRefusesEachBrokenChain: every way a chain can be broken is
// refused with its own error, naming the child, the paths tried and the
// GUIDs; a refused open leaves every file as it was.
func TestOpenRefusesEachBrokenChain(t *testing.T) {
	base := CreateOptions{Size: 64 * mib, BlockSize: mib}
	tests := []struct {
		name     string
		depth    int
		breakIt  func(t *testing.T, paths []string)
		sentinel error
		want     func(paths []string) []string
	}{
		{"MissingParent", 1, func(t *testing.T, p []string) { os.Remove(p[0]) }, ErrParentNotFound,
			func(p []string) []string {
				return []string{p[1], `"` + p[0] + `"`, childLinkage(t, p[1]).String()}
			}},
		{"ParentWrittenAfterChildWasMade", 1, func(t *testing.T, p []string) { writeImage(t, p[0], 0, make([]byte, 512)) }, ErrParentLinkage,
			func(p []string) []string {
				return []string{p[1], p[0], childLinkage(t, p[1]).String(), dataWriteGUID(t, p[0]).String()}
			}},
		{"ParentVirtualSizeDiffers", 1, func(t *testing.T, p []string) {
			replaceWithImpostor(t, p[0], CreateOptions{Size: 32 * mib, BlockSize: mib}, childLinkage(t, p[1]))
		}, ErrParentGeometry, func(p []string) []string { return []string{p[1], p[0], "virtual size 33554432 differs"} }},
		{"ParentSectorSizeDiffers", 1, func(t *testing.T, p []string) {
			replaceWithImpostor(t, p[0], CreateOptions{Size: 64 * mib, BlockSize: mib, LogicalSectorSize: 4096}, childLinkage(t, p[1]))
		}, ErrParentGeometry, func(p []string) []string { return []string{p[1], "logical sector size 4096 differs"} }},
		{"ChildIsItsOwnParent", 1, func(t *testing.T, p []string) {
			relink(t, p[1], p[1], dataWriteGUID(t, p[1]))
		}, ErrChainLoop, func(p []string) []string { return []string{p[1], "already a layer"} }},
		{"TwoChildrenParentEachOther", 2, func(t *testing.T, p []string) {
			relink(t, p[1], p[2], dataWriteGUID(t, p[2]))
		}, ErrChainLoop, func(p []string) []string { return []string{p[2], p[1], "already a layer"} }},
		{"ParentLinkedByHardLinkTwice", 2, func(t *testing.T, p []string) {
			alias := filepath.Join(filepath.Dir(p[0]), "alias.avhdx")
			if err := os.Link(p[2], alias); err != nil {
				t.Fatal(err)
			}
			relink(t, p[1], alias, dataWriteGUID(t, p[2]))
		}, ErrChainLoop, func(p []string) []string { return []string{"alias.avhdx", "already a layer"} }},
		{"LocatorKeyOffsetInsideTable", 1, func(t *testing.T, p []string) {
			im, err := openFile(p[1], OpenOptions{ReadOnly: true, NoLock: true})
			if err != nil {
				t.Fatal(err)
			}
			at := int64(im.l.meta.offset) + int64(im.l.locatorItem.offset) + plHeaderSize + pleOffKeyOffset
			im.Close()
			f, _ := os.OpenFile(p[1], os.O_RDWR, 0)
			f.WriteAt([]byte{4, 0, 0, 0}, at)
			f.Close()
		}, ErrCorrupt, func(p []string) []string {
			return []string{p[1], "parent locator metadata item", "inside the header and entry table"}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			paths := makeChain(t, base, tc.depth, nil)
			top := paths[tc.depth]
			if im, err := Open(top, OpenOptions{ReadOnly: true}); err != nil {
				t.Fatalf("unbroken chain does not open: %v", err)
			} else {
				im.Close()
			}
			tc.breakIt(t, paths)
			want := tc.want(paths)
			before, _ := os.ReadFile(top)
			for _, ro := range []bool{true, false} {
				im, err := Open(top, OpenOptions{ReadOnly: ro})
				if err == nil {
					im.Close()
					t.Fatalf("read-only %v: broken chain opened", ro)
				}
				if !errors.Is(err, tc.sentinel) {
					t.Fatalf("read-only %v: error %q does not wrap %v", ro, err, tc.sentinel)
				}
				for _, w := range want {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("read-only %v: error %q does not name %q", ro, err, w)
					}
				}
			}
			if after, _ := os.ReadFile(top); !bytes.Equal(before, after) {
				t.Fatal("a refused open modified the child")
			}
		})
	}
}

func TestChainDeeperThanTheBoundIsRefused(t *testing.T) {
	defer func(n int) { maxChainDepth = n }(maxChainDepth)
	maxChainDepth = 3
	paths := makeChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 4, nil)
	if im, err := Open(paths[3], OpenOptions{ReadOnly: true}); err != nil {
		t.Fatalf("3 parents: %v", err)
	} else {
		im.Close()
	}
	_, err := Open(paths[4], OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrChainTooDeep) || !errors.Is(err, ErrChain) || !strings.Contains(err.Error(), paths[4]) {
		t.Fatalf("4 parents: %v, want ErrChainTooDeep naming %s", err, paths[4])
	}
}

// TestChainAPIDescribesEachLayer: Extents say which layer each run comes
// from, LayerExtents what the top file alone holds, BackingChain and Info
// name the parents and linkage.
func TestChainAPIDescribesEachLayer(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 2, func(layer int, p string) {
		switch layer {
		case 0:
			writeImage(t, p, 0, pattern(1, 4*mib))
		case 1:
			writeImage(t, p, mib, pattern(2, 512))
		case 2:
			writeImage(t, p, mib+1024, pattern(3, 512))
			writeImage(t, p, 6*mib, pattern(4, mib))
		}
	})
	im, err := Open(paths[2], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got, err := im.Extents()
	if err != nil {
		t.Fatal(err)
	}
	// Base blocks are contiguous from the first data offset of the base.
	b0 := got[0].FileOffset
	want := []Extent{
		{0, mib, b0, true, 2},
		{mib, 512, 0, true, 1},
		{mib + 512, 512, b0 + mib + 512, true, 2},
		{mib + 1024, 512, 0, true, 0},
		{mib + 1536, 3*mib - 1536, b0 + mib + 1536, true, 2},
		{4 * mib, 2 * mib, 0, false, -1},
		{6 * mib, mib, 0, true, 0},
		{7 * mib, mib, 0, false, -1},
	}
	if len(got) != len(want) {
		t.Fatalf("Extents:\n got %v\nwant %v", got, want)
	}
	for i := range got {
		w := want[i]
		if w.FileOffset == 0 && w.Data {
			w.FileOffset = got[i].FileOffset // this layer's offsets are the allocator's choice
		}
		if got[i] != w {
			t.Fatalf("extent %d: got %+v want %+v\nall: %v", i, got[i], w, got)
		}
	}
	layer, err := im.LayerExtents()
	if err != nil {
		t.Fatal(err)
	}
	wantLayer := []struct {
		off, n int64
		data   bool
		layer  int
	}{{0, mib + 1024, false, 1}, {mib + 1024, 512, true, 0}, {mib + 1536, 5*mib - 1536, false, 1}, {6 * mib, mib, true, 0}, {7 * mib, mib, false, 1}}
	if len(layer) != len(wantLayer) {
		t.Fatalf("LayerExtents: %v", layer)
	}
	for i, w := range wantLayer {
		if g := layer[i]; g.Offset != w.off || g.Length != w.n || g.Data != w.data || g.Layer != w.layer {
			t.Fatalf("layer extent %d: %+v, want %+v", i, g, w)
		}
	}
	chain := im.BackingChain()
	if len(chain) != 3 || chain[0].Type != Differencing || chain[2].Type != Dynamic ||
		chain[0].ParentPath != paths[1] || chain[1].ParentPath != paths[0] || chain[2].ParentPath != "" ||
		chain[0].ParentLinkage != chain[1].DataWriteGUID || chain[1].ParentLinkage != chain[2].DataWriteGUID {
		t.Fatalf("BackingChain: %+v", chain)
	}
}

// TestRebaseAndSetParentLinkageRewriteOnlyTheLocator: a child whose parent
// moved is repaired by Rebase; SetParentLinkage's parent_linkage2 keeps a
// child linked to a parent whose DataWriteGuid is about to change; neither
// touches the child's data or its DataWriteGuid.
func TestRebaseAndSetParentLinkageRewriteOnlyTheLocator(t *testing.T) {
	model := sparseModel{}
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 1, func(layer int, p string) {
		w := imageWrite{int64(layer) * 3 * 512, pattern(int64(layer), 4096)}
		writeImage(t, p, w.off, w.data)
		model.write(w.off, w.data)
	})
	moved := filepath.Join(filepath.Dir(paths[0]), "moved", "deeper", "base.vhdx")
	os.MkdirAll(filepath.Dir(moved), 0o755)
	if err := os.Rename(paths[0], moved); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(paths[1], OpenOptions{ReadOnly: true}); !errors.Is(err, ErrParentNotFound) {
		t.Fatalf("open after the parent moved: %v", err)
	}
	childDW := dataWriteGUID(t, paths[1])
	if err := Rebase(paths[1], moved); err != nil {
		t.Fatal(err)
	}
	if dataWriteGUID(t, paths[1]) != childDW {
		t.Fatal("Rebase changed the child's DataWriteGuid")
	}
	im, err := Open(paths[1], OpenOptions{})
	if err != nil {
		t.Fatalf("open after Rebase: %v", err)
	}
	if rel, _ := im.l.locator.get(keyRelativePath); rel != `.\moved\deeper\base.vhdx` {
		t.Fatalf("relative_path %q", rel)
	}
	compareChain(t, im, model, "after rebase")
	next := uuid.New()
	if err := im.SetParentLinkage(im.Parent().Info().DataWriteGUID, next); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if dataWriteGUID(t, paths[1]) != childDW {
		t.Fatal("SetParentLinkage changed the child's DataWriteGuid")
	}
	// The parent takes a write with DataWriteGuid = next: the child still
	// opens through parent_linkage2.
	p, err := Open(moved, OpenOptions{DataWriteGUID: next})
	if err != nil {
		t.Fatal(err)
	}
	p.WriteAt(pattern(9, 512), 8*mib)
	p.Close()
	model.write(8*mib, pattern(9, 512))
	im, err = Open(paths[1], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open through parent_linkage2: %v", err)
	}
	compareChain(t, im, model, "through parent_linkage2")
	im.Close()
	// Rebase refuses a parent of another size and the child itself.
	other := filepath.Join(filepath.Dir(paths[0]), "other.vhdx")
	if err := Create(other, CreateOptions{Size: 8 * mib}); err != nil {
		t.Fatal(err)
	}
	if err := Rebase(paths[1], other); !errors.Is(err, ErrParentGeometry) {
		t.Fatalf("rebase onto another size: %v", err)
	}
	if err := Rebase(paths[1], paths[1]); err == nil {
		t.Fatal("rebase onto itself succeeded")
	}
}

func TestCreateChildRefusesGeometryOtherThanTheParents(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib, LogicalSectorSize: 4096}, 0, nil)
	dir := filepath.Dir(paths[0])
	for i, o := range []CreateOptions{
		{Size: 8 * mib}, {LogicalSectorSize: 512}, {PhysicalSectorSize: 512}, {DiskID: uuid.New()}, {Type: Fixed},
	} {
		o.ParentPath = paths[0]
		p := filepath.Join(dir, fmt.Sprintf("c%d.avhdx", i))
		if err := Create(p, o); err == nil {
			t.Errorf("Create(%+v) succeeded", o)
		}
		if _, err := os.Stat(p); err == nil {
			t.Errorf("Create(%+v) left a file", o)
		}
	}
	c := filepath.Join(dir, "ok.avhdx")
	if err := Create(c, CreateOptions{ParentPath: paths[0], BlockSize: 4 * mib}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(c, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	pi := im.Parent().Info()
	if im.Size() != 16*mib || im.LogicalSectorSize() != 4096 || im.BlockSize() != 4*mib || im.DiskID() != pi.DiskID {
		t.Fatalf("child geometry %d %d %d %v", im.Size(), im.LogicalSectorSize(), im.BlockSize(), im.DiskID())
	}
}

// TestCheckValidatesTheChainBelow: Check of a child reports a parent that
// no longer links, naming the child, and passes an intact chain.
func TestCheckValidatesTheChainBelow(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 2, nil)
	writeImage(t, paths[2], 4096, pattern(1, 512))
	if rep, err := Check(paths[2], false); err != nil || rep.Damaged() {
		t.Fatalf("intact chain: %v %+v", err, rep)
	}
	writeImage(t, paths[0], 0, pattern(2, 512))
	rep, err := Check(paths[2], false)
	if err != nil || !rep.Damaged() || !strings.Contains(fmt.Sprint(rep.Problems), paths[1]) ||
		!strings.Contains(fmt.Sprint(rep.Problems), "parent linkage mismatch") {
		t.Fatalf("broken link: %v %+v", err, rep)
	}
}

// TestConcurrentWritersIntoOneChildBlockKeepEverySector: goroutines write
// different sectors of the same blocks of a child at once (bitmap updates
// racing), while readers read the blocks; afterwards, and after a reopen,
// every sector holds its writer's data and the untouched ones the parent's.
func TestConcurrentWritersIntoOneChildBlockKeepEverySector(t *testing.T) {
	base := pattern(1, 4*mib)
	paths := makeChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 1, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, 0, base)
		}
	})
	im, err := Open(paths[1], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const writers, perWriter = 8, 24
	model := sparseModel{}
	model.write(0, base)
	sectorOf := func(w, i int) int64 { return int64((i*writers+w)*3) * 512 } // interleaved, gaps left to the parent
	for w := range writers {
		for i := range perWriter {
			model.write(sectorOf(w, i), pattern(int64(w*1000+i), 512))
		}
	}
	done := make(chan error, writers+2)
	stop := make(chan struct{})
	for w := range writers {
		go func() {
			for i := range perWriter {
				if _, err := im.WriteAt(pattern(int64(w*1000+i), 512), sectorOf(w, i)); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for r := range 2 {
		go func() {
			buf := make([]byte, 64*kib)
			for {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				if _, err := im.ReadAt(buf, int64(r)*64*kib); err != nil {
					done <- err
					return
				}
			}
		}()
	}
	for range writers {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	compareChain(t, im, model, "after concurrent writes")
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(paths[1], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	compareChain(t, im, model, "after reopen")
}

// TestChainIOAllocatesNothing: reads through a chain (a partially present
// block, a block from the base) and writes into sectors the child holds
// make no heap allocation per call once the bitmap page is cached.
func TestChainIOAllocatesNothing(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 2, func(layer int, p string) {
		switch layer {
		case 0:
			writeImage(t, p, 0, pattern(1, 4*mib))
		case 2:
			writeImage(t, p, 8192, pattern(2, 4096))
		}
	})
	im, err := Open(paths[2], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, 64*kib)
	bufs := [][]byte{buf[:1000], buf[1000:40000], buf[40000:]}
	for name, fn := range map[string]func() error{
		"ReadAt partial block": func() error { _, err := im.ReadAt(buf, 0); return err },
		"ReadAt base block":    func() error { _, err := im.ReadAt(buf, 2*mib); return err },
		"ReadVec partial":      func() error { return im.ReadVec(bufs, 0) },
		"WriteAt held sectors": func() error { _, err := im.WriteAt(buf[:4096], 8192); return err },
	} {
		if err := fn(); err != nil { // warm-up: session start, bitmap page load
			t.Fatal(err)
		}
		if n := testing.AllocsPerRun(50, func() {
			if err := fn(); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("%s: %.1f allocations per call", name, n)
		}
	}
}

// TestStaleRelativePathFallsBackToAbsolutePath: relative_path names an
// existing image that is not the parent (its DataWriteGuid does not link);
// absolute_win32_path names the real one, which is used.
func TestStaleRelativePathFallsBackToAbsolutePath(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 1, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, 0, pattern(5, 4096))
		}
	})
	dir := filepath.Dir(paths[0])
	real := filepath.Join(dir, "real", "base.vhdx")
	os.MkdirAll(filepath.Dir(real), 0o755)
	if err := os.Rename(paths[0], real); err != nil {
		t.Fatal(err)
	}
	if err := Create(paths[0], CreateOptions{Size: 16 * mib, BlockSize: mib}); err != nil { // impostor at the relative path
		t.Fatal(err)
	}
	setLocatorAbsolutePath(t, paths[1], real)
	im, err := Open(paths[1], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer im.Close()
	if im.Parent().Path() != real {
		t.Fatalf("parent %s, want %s", im.Parent().Path(), real)
	}
	got := make([]byte, 4096)
	im.ReadAt(got, 0)
	if !bytes.Equal(got, pattern(5, 4096)) {
		t.Fatal("chain does not read the real parent's data")
	}
}

// TestReadWriteOpenRefreshesStaleLocatorPaths: after the chain moved, a
// read-only open finds the parent through absolute_win32_path and writes
// nothing; a read-write open rewrites relative_path (§2.6.2.6.3) without
// touching DataWriteGuid, so the next open finds the parent relatively.
func TestReadWriteOpenRefreshesStaleLocatorPaths(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 1, nil)
	dir := filepath.Dir(paths[0])
	moved := filepath.Join(dir, "parents", "base.vhdx")
	os.MkdirAll(filepath.Dir(moved), 0o755)
	os.Rename(paths[0], moved)
	setLocatorAbsolutePath(t, paths[1], moved)
	before, _ := os.ReadFile(paths[1])
	ro, err := Open(paths[1], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	ro.Close()
	if after, _ := os.ReadFile(paths[1]); !bytes.Equal(before, after) {
		t.Fatal("a read-only open modified the child")
	}
	dw := dataWriteGUID(t, paths[1])
	rw, err := Open(paths[1], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rw.Close()
	child, err := openFile(paths[1], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer child.Close()
	if rel, _ := child.l.locator.get(keyRelativePath); rel != `.\parents\base.vhdx` {
		t.Fatalf("relative_path after a read-write open: %q", rel)
	}
	if child.l.hdr.dataWriteGUID != dw {
		t.Fatal("refreshing the locator changed DataWriteGuid")
	}
}

// shrinkBitmapCaches caps the sector-bitmap cache of every layer of im's
// chain at pages, for a test that wants evictions on every lookup without
// touching the package's default (other tests run beside it).
func shrinkBitmapCaches(im *Image, pages int) {
	for l := im; l != nil; l = l.parent {
		if c := l.bitmaps; c != nil {
			c.mu.Lock()
			c.max = pages
			c.mu.Unlock()
		}
	}
}
