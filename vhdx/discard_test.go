package vhdx

import (
	"bytes"
	"fmt"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// flatModel is the expected content of a disk: a sparse map of 1 MiB pieces.
type flatModel struct {
	size   int64
	pieces map[int64][]byte // key: offset / mib
}

func newFlatModel(size int64) *flatModel { return &flatModel{size: size, pieces: map[int64][]byte{}} }

func (m *flatModel) write(off int64, p []byte) {
	for len(p) > 0 {
		k := off / mib
		in := off % mib
		pc := m.pieces[k]
		if pc == nil {
			pc = make([]byte, mib)
			m.pieces[k] = pc
		}
		n := copy(pc[in:], p)
		p, off = p[n:], off+int64(n)
	}
}

func (m *flatModel) zero(off, n int64) {
	for n > 0 {
		k := off / mib
		in := off % mib
		c := min(n, mib-in)
		if pc := m.pieces[k]; pc != nil {
			clear(pc[in : in+c])
		}
		off, n = off+c, n-c
	}
}

func (m *flatModel) read(off, n int64) []byte {
	out := make([]byte, n)
	for done := int64(0); done < n; {
		k := (off + done) / mib
		in := (off + done) % mib
		c := min(n-done, mib-in)
		if pc := m.pieces[k]; pc != nil {
			copy(out[done:done+c], pc[in:in+c])
		}
		done += c
	}
	return out
}

// check compares every piece the model knows of, with one piece of context
// on each side, against the image.
func (m *flatModel) check(t *testing.T, im *Image, when string) {
	t.Helper()
	seen := map[int64]bool{}
	for k := range m.pieces {
		for _, kk := range []int64{k - 1, k, k + 1} {
			if kk < 0 || kk*mib >= m.size || seen[kk] {
				continue
			}
			seen[kk] = true
			n := min(int64(mib), m.size-kk*mib)
			got := make([]byte, n)
			if _, err := im.ReadAt(got, kk*mib); err != nil {
				t.Fatalf("%s: ReadAt(%#x): %v", when, kk*mib, err)
			}
			if want := m.read(kk*mib, n); !bytes.Equal(got, want) {
				i := 0
				for got[i] == want[i] {
					i++
				}
				t.Fatalf("%s: disk offset %#x differs from the model (first at +%#x: got %#x want %#x)", when, kk*mib, i, got[i], want[i])
			}
		}
	}
}

// writeRaw writes the model as a sparse raw file for qemu-img compare.
func (m *flatModel) writeRaw(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(m.size); err != nil {
		t.Fatal(err)
	}
	for k, pc := range m.pieces {
		n := min(int64(mib), m.size-k*mib)
		if _, err := f.WriteAt(pc[:n], k*mib); err != nil {
			t.Fatal(err)
		}
	}
}

// qemuAgrees runs qemu-img check on the image. QEMU opens no VHDX with
// 4096-byte logical sectors; those are checked by our own reads and Check.
func qemuAgrees(t *testing.T, ms *memStorage, lss uint32) {
	t.Helper()
	if lss != 512 {
		return
	}
	vhdxtest.NeedQEMU(t)
	path := filepath.Join(t.TempDir(), "img.vhdx")
	if err := os.WriteFile(path, ms.bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-f", "vhdx", path)
}

func trimBy(im *Image, mode trimMode, off, n int64) error {
	switch mode {
	case trimDiscard:
		return im.Discard(off, n)
	case trimZeroUnmap:
		return im.WriteZeroes(off, n, true)
	}
	return im.WriteZeroes(off, n, false)
}

func (m trimMode) String() string {
	return [...]string{"discard", "write-zeroes-unmap", "write-zeroes-keep"}[m]
}

// TestDiscardAndWriteZeroesReadZerosAtEveryAlignmentThenReuse: for both
// sector sizes and every mode, ranges of one sector, straddling a block
// boundary, one whole block, across the chunk boundary (where a sector
// bitmap entry sits in the BAT) and up to the short last block read as
// zeros afterwards while everything around them is intact; new writes then
// reuse the freed space without the file growing and without showing old
// data; qemu-img check accepts the result (512-byte sectors).
func TestDiscardAndWriteZeroesReadZerosAtEveryAlignmentThenReuse(t *testing.T) {
	parallelSweep(t)
	for _, lss := range []uint32{512, 4096} {
		bs := int64(1 * mib)
		cr := int64(chunkRatio(lss, uint32(bs)))
		size := (cr+2)*bs + bs/2 // chunk boundary inside, short last block
		s := int64(lss)
		cases := []struct {
			name   string
			off, n int64
		}{
			{"one sector", s, s},
			{"straddles a block boundary", bs - s, 2 * s},
			{"one whole block", bs, bs},
			{"whole block plus sectors on both sides", 2*bs - s, bs + 2*s},
			{"across the chunk boundary", (cr-1)*bs + bs/2, 2 * bs},
			{"to the end of the disk", (cr+1)*bs + s, size - (cr+1)*bs - s},
			{"whole disk", 0, size},
		}
		filled := []int64{0, 1, 2, 3, cr - 1, cr, cr + 1, cr + 2}
		data := map[int64][]byte{} // generated once: pattern is slow under -race
		for _, b := range filled {
			data[b] = pattern(b+1, int(min(bs, size-b*bs)))
		}
		for _, mode := range []trimMode{trimDiscard, trimZeroUnmap, trimZeroKeep} {
			for _, tc := range cases {
				t.Run(fmt.Sprintf("%d/%v/%s", lss, mode, tc.name), func(t *testing.T) {
					// In memory: no fsync per allocation. Real files and
					// hole punching: TestDiscardGivesSpaceBackToTheHost.
					ms := createMem(t, CreateOptions{Size: uint64(size), BlockSize: uint32(bs), LogicalSectorSize: lss})
					ms.data = slices.Grow(ms.data, 16*mib) // allocations grow in place
					im, err := OpenStorage(ms, OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					defer func() {
						if im != nil {
							im.Close()
						}
					}()
					m := newFlatModel(size)
					for _, b := range filled {
						d := data[b]
						if _, err := im.WriteAt(d, b*bs); err != nil {
							t.Fatal(err)
						}
						m.write(b*bs, d)
					}
					allocBefore := im.allocated.Load()
					filledSize, _ := ms.Size()
					if err := trimBy(im, mode, tc.off, tc.n); err != nil {
						t.Fatalf("%v(%#x, %#x): %v", mode, tc.off, tc.n, err)
					}
					m.zero(tc.off, tc.n)
					m.check(t, im, "after "+mode.String())
					if mode == trimZeroKeep && im.allocated.Load() != allocBefore {
						t.Fatalf("write-zeroes without unmap changed the allocated blocks from %d to %d", allocBefore, im.allocated.Load())
					}
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
					im = nil

					// Reuse: write into every block again.
					im, err = OpenStorage(ms, OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					for _, b := range filled {
						d := pattern(100+b, int(s))
						off := b*bs + bs/2
						if off+s > size {
							off = b * bs
						}
						if _, err := im.WriteAt(d, off); err != nil {
							t.Fatal(err)
						}
						m.write(off, d)
					}
					m.check(t, im, "after rewriting")
					// As many blocks as before the trim: reusing the freed
					// space (or the tail Close cut off), the file ends up no
					// larger than it was.
					if fileAfter, _ := im.s.Size(); fileAfter > filledSize {
						t.Fatalf("file grew from %d to %d bytes although every rewritten block could reuse freed space", filledSize, fileAfter)
					}
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
					im = nil
					path := filepath.Join(t.TempDir(), "img.vhdx")
					if err := os.WriteFile(path, ms.bytes(), 0o644); err != nil {
						t.Fatal(err)
					}
					rep, err := Check(path, false)
					if err != nil || rep.Damaged() {
						t.Fatalf("Check: %v %+v", err, rep)
					}
					// qemu-img compare reads the whole multi-GiB disk here
					// (half a minute); TestDiscardGivesSpaceBackToTheHost
					// compares on a small one.
					qemuAgrees(t, ms, lss)
				})
			}
		}
	}
}

func allocatedOnHost(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestDiscardGivesSpaceBackToTheHost: discarding written data lowers the
// file's allocated bytes by about what the data took, in a handful of
// journal commits; write-zeroes without unmap keeps them. Rewrites and
// unaligned trims afterwards give a file that qemu-img check accepts and
// qemu-img compare finds equal to the model.
func TestDiscardGivesSpaceBackToTheHost(t *testing.T) {
	const size = 64 * mib
	for _, tc := range []struct {
		mode      trimMode
		givesBack bool
	}{{trimDiscard, true}, {trimZeroUnmap, true}, {trimZeroKeep, false}} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			path := createFile(t, CreateOptions{Size: size, BlockSize: 1 * mib})
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			d := pattern(1, 4*mib)
			for off := int64(0); off < size; off += int64(len(d)) {
				if _, err := im.WriteAt(d, off); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			before := allocatedOnHost(t, path)
			seqBefore := im.journal.seq
			if err := trimBy(im, tc.mode, 0, size); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			after := allocatedOnHost(t, path)
			if tc.givesBack {
				if before-after < size*9/10 {
					t.Fatalf("allocated bytes went from %d to %d; want a drop of at least %d", before, after, size*9/10)
				}
				if commits := im.journal.seq - seqBefore; commits > 1 {
					t.Fatalf("%d journal entries for 64 blocks; want them batched", commits)
				}
				if im.Info().AllocatedBytes != 0 {
					t.Fatalf("Info reports %d bytes allocated after discarding the whole disk", im.Info().AllocatedBytes)
				}
			} else if after < before {
				t.Fatalf("write-zeroes without unmap freed host space: %d → %d", before, after)
			}
			got := make([]byte, 4*mib)
			if _, err := im.ReadAt(got, size-4*mib); err != nil {
				t.Fatal(err)
			}
			if !isZeros(got) {
				t.Fatal("range reads non-zero after " + tc.mode.String())
			}
			// Rewrite parts, trim unaligned pieces of them, and let QEMU
			// check the file and compare it with the model.
			m := newFlatModel(size)
			for _, w := range []struct{ off, n int64 }{{0, 3 * mib}, {40*mib + 4096, 8192}, {size - mib, mib}} {
				d := pattern(w.off+1, int(w.n))
				if _, err := im.WriteAt(d, w.off); err != nil {
					t.Fatal(err)
				}
				m.write(w.off, d)
			}
			for _, z := range []struct{ off, n int64 }{{512, 4096}, {mib - 512, mib + 1024}, {40*mib + 4096, 4096}, {size - 4096, 4096}} {
				if err := trimBy(im, tc.mode, z.off, z.n); err != nil {
					t.Fatal(err)
				}
				m.zero(z.off, z.n)
			}
			m.check(t, im, "after rewriting and trimming")
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			// The rewrites reused the lowest freed ranges; Close cut the
			// free tail off the file.
			if st, err := os.Stat(path); err != nil {
				t.Fatal(err)
			} else if tc.givesBack && st.Size() > 12*mib {
				t.Fatalf("file is %d bytes after Close with 5 blocks in use; want the free tail truncated", st.Size())
			}
			vhdxtest.NeedQEMU(t)
			run(t, "qemu-img", "check", "-f", "vhdx", path)
			raw := filepath.Join(t.TempDir(), "model.raw")
			m.writeRaw(t, raw)
			run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
		})
	}
}

// TestFixedImageKeepsItsAllocationOnDiscard: a fixed image's blocks stay
// FULLY_PRESENT and keep their space, but the range reads as zeros.
func TestFixedImageKeepsItsAllocationOnDiscard(t *testing.T) {
	path := createFile(t, CreateOptions{Size: 16 * mib, BlockSize: 1 * mib, Type: Fixed})
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	d := pattern(2, 16*mib)
	if _, err := im.WriteAt(d, 0); err != nil {
		t.Fatal(err)
	}
	allocBefore := im.allocated.Load()
	for _, mode := range []trimMode{trimDiscard, trimZeroUnmap} {
		if err := trimBy(im, mode, 512, 8*mib); err != nil {
			t.Fatal(err)
		}
	}
	if im.allocated.Load() != allocBefore {
		t.Fatalf("fixed image lost blocks: %d → %d", allocBefore, im.allocated.Load())
	}
	got := make([]byte, 16*mib)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	clear(d[512 : 512+8*mib])
	if !bytes.Equal(got, d) {
		t.Fatal("fixed image does not read back zeros exactly over the discarded range")
	}
}

// TestDiscardRefusesBadRanges: unaligned, negative, out-of-range and
// read-only requests are refused and change nothing.
func TestDiscardRefusesBadRanges(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 8 * mib, BlockSize: 1 * mib})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off, n int64
		want   error
	}{
		{1, 512, ErrUnaligned}, {0, 100, ErrUnaligned}, {-512, 512, ErrOutOfRange},
		{0, -512, ErrOutOfRange}, {8 * mib, 512, ErrOutOfRange}, {0, 8*mib + 512, ErrOutOfRange},
	} {
		if err := im.Discard(tc.off, tc.n); !strings.Contains(fmt.Sprint(err), tc.want.Error()) {
			t.Errorf("Discard(%d, %d) = %v, want %v", tc.off, tc.n, err, tc.want)
		}
	}
	im.Close()
	ro, err := OpenStorage(s, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.WriteZeroes(0, 512, true); err == nil {
		t.Fatal("WriteZeroes on a read-only image succeeded")
	}
}

// TestDiscardOnAChildNeverShowsTheParentsOldData: on a differencing image,
// whole discarded blocks read zeros whatever their state (the parent's data
// does not show through), a partial discard zeroes the sectors the child
// held and leaves the ones it never held showing the parent as before, and
// write-zeroes reads zeros everywhere, partial blocks included.
func TestDiscardOnAChildNeverShowsTheParentsOldData(t *testing.T) {
	const bs, size = 1 * mib, 8 * mib
	base := pattern(1, size)
	paths := makeChain(t, CreateOptions{Size: size, BlockSize: bs}, 1, func(layer int, path string) {
		if layer == 0 {
			writeImage(t, path, 0, base)
		}
	})
	child := paths[1]
	im, err := Open(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	want := bytes.Clone(base)
	put := func(off int64, p []byte) {
		if _, err := im.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	// Block 1 FULLY_PRESENT, blocks 2 and 5 PARTIALLY_PRESENT (first half), 3 and 4 NOT_PRESENT.
	put(1*bs, pattern(2, bs))
	put(2*bs, pattern(3, bs/2))
	put(5*bs, pattern(4, bs/2))
	check := func(when string) {
		t.Helper()
		got := readAll(t, im)
		for i := 0; i < size; i += 512 {
			if !sameBytes(got[i:i+512], want[i:i+512]) {
				t.Fatalf("%s: sector at %#x differs from the model", when, i)
			}
		}
	}
	// Whole blocks 1..4: every state reads zeros afterwards.
	if err := im.Discard(1*bs, 4*bs); err != nil {
		t.Fatal(err)
	}
	clear(want[1*bs : 5*bs])
	check("after discarding whole blocks")
	for b := 1; b <= 4; b++ {
		if e := im.bat.load(batIndex(uint64(b), im.l.chunkRatio)); batState(e) != stateZero {
			t.Fatalf("block %d is in state %d after a whole-block discard on a child; want ZERO", b, batState(e))
		}
	}
	// Partial discard across the present/not-present edge of block 5.
	if err := im.Discard(5*bs+bs/4, bs/2); err != nil {
		t.Fatal(err)
	}
	clear(want[5*bs+bs/4 : 5*bs+bs/2]) // present sectors: zeros; the rest still the parent's
	check("after a partial discard")
	// Write-zeroes over a not-present part of block 6 and present part of 5.
	if err := im.WriteZeroes(5*bs+bs/2+4096, bs, false); err != nil {
		t.Fatal(err)
	}
	clear(want[5*bs+bs/2+4096 : 6*bs+bs/2+4096])
	check("after write-zeroes")
	// Writing again into a discarded block reads the new data and zeros.
	put(3*bs+4096, pattern(5, 4096))
	check("after rewriting a discarded block")
}

// TestFixedAndPreallocatedImagesOccupyTheirFullSize: a fixed image, and a
// dynamic one created with falloc or full, have every block mapped and its
// space allocated on the host; falloc writes nothing. The preallocated
// dynamic image still gives space back on discard; the fixed one does not.
func TestFixedAndPreallocatedImagesOccupyTheirFullSize(t *testing.T) {
	const size = 64 * mib
	for _, tc := range []struct {
		name      string
		typ       ImageType
		pre       Preallocation
		full      bool // host space allocated for the payload
		givesBack bool
	}{
		{"fixed, default", Fixed, PreallocDefault, true, false},
		{"fixed, off (sparse)", Fixed, PreallocOff, false, false},
		{"dynamic, default", Dynamic, PreallocDefault, false, false},
		{"dynamic, falloc", Dynamic, PreallocFalloc, true, true},
		{"dynamic, full", Dynamic, PreallocFull, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := createFile(t, CreateOptions{Size: size, BlockSize: 1 * mib, Type: tc.typ, Preallocation: tc.pre})
			host := allocatedOnHost(t, path)
			if got := host >= size; got != tc.full {
				t.Fatalf("%d bytes allocated on the host for a %d-byte disk; want full allocation: %v", host, size, tc.full)
			}
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := im.Info(); got.Type != tc.typ || (tc.full && got.AllocatedBytes != size) || got.HostAllocatedBytes != host {
				t.Fatalf("Info: type %v, allocated %d, host %d; want %v, %d, %d", got.Type, got.AllocatedBytes, got.HostAllocatedBytes, tc.typ, size, host)
			}
			if err := im.Discard(0, size); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			after := allocatedOnHost(t, path)
			if gave := after < host-size/2; gave != tc.givesBack {
				t.Fatalf("discard of the whole disk: host allocation %d → %d; want space given back: %v", host, after, tc.givesBack)
			}
			vhdxtest.NeedQEMU(t)
			run(t, "qemu-img", "check", "-f", "vhdx", path)
		})
	}
}
