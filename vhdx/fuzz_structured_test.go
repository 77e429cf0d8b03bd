package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"testing"
)

// checkProblems runs Check's validation (the collecting checker) over s,
// read-only, and returns what it found. It is Check without the file and
// lock handling, which a Storage does not have.
func checkProblems(s Storage) ([]Problem, error) {
	c := &checker{collect: true}
	im, err := openStorage(s, OpenOptions{ReadOnly: true}, c)
	if err != nil {
		return c.problems, err
	}
	im.Close()
	return c.problems, nil
}

// requireNoDamage fails unless Check finds nothing on s beyond a broken
// redundant copy (softOK: the builder broke one on purpose, or a replayed
// log wrote over one, as §2.2.3 lets it), which Open passes over and Check
// must still name.
func requireNoDamage(t *testing.T, what string, s Storage, softOK bool) {
	t.Helper()
	probs, err := checkProblems(s)
	if err != nil {
		t.Fatalf("%s: Check could not complete on an image that opened: %v", what, err)
	}
	for _, p := range probs {
		soft := strings.HasPrefix(p.What, "header ") || strings.HasPrefix(p.What, "region table")
		if !softOK || !soft {
			t.Fatalf("%s: Check reports damage in an image that opened: %s", what, p.What)
		}
	}
}

// verifyReads checks what an open image reads against the model (when the
// image is described by the builder's BAT, i.e. no log was replayed), twice
// over for stability, and against Extents: a data extent reads what its
// layer's file holds at FileOffset, any other extent reads zeros.
func verifyReads(t *testing.T, what string, im *Image, layers []*builtImage, files []*pageStorage, useModel bool) {
	t.Helper()
	lss := int64(im.LogicalSectorSize())
	secs := modelSectors(layers[0], im)
	useModel = useModel && layers[0].matches(im)
	exts, err := im.Extents()
	if err != nil {
		t.Fatalf("%s: Extents on an open image: %v", what, err)
	}
	var pos int64
	for _, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("%s: extents are not contiguous at %d: %+v", what, pos, e)
		}
		pos += e.Length
	}
	if pos != im.Size() {
		t.Fatalf("%s: extents cover %d bytes of %d", what, pos, im.Size())
	}
	a, b := make([]byte, lss), make([]byte, lss)
	ei := 0
	for _, sec := range secs {
		off := int64(sec) * lss
		if _, err := im.ReadAt(a, off); err != nil {
			t.Fatalf("%s: read sector %d: %v", what, sec, err)
		}
		if _, err := im.ReadAt(b, off); err != nil || !bytes.Equal(a, b) {
			t.Fatalf("%s: sector %d reads differently the second time (%v)", what, sec, err)
		}
		if useModel {
			if want := modelRead(layers, sec); !bytes.Equal(a, want) {
				t.Fatalf("%s: sector %d reads %x..., the model says %x...", what, sec, a[:8], want[:8])
			}
		}
		for ei > 0 && exts[ei].Offset > off {
			ei--
		}
		for exts[ei].Offset+exts[ei].Length <= off {
			ei++
		}
		e := exts[ei]
		want := make([]byte, lss)
		if e.Data {
			if e.Layer < 0 || e.Layer >= len(files) {
				t.Fatalf("%s: data extent %+v names layer %d of %d", what, e, e.Layer, len(files))
			}
			want = files[e.Layer].bytesAt(e.FileOffset+off-e.Offset, int(lss))
		}
		if !bytes.Equal(a, want) {
			t.Fatalf("%s: sector %d reads %x... but its extent %+v says %x...", what, sec, a[:8], e, want[:8])
		}
	}
}

// writeReadBack writes a pattern to a few sectors of an open read-write
// image and reads each back; it returns what it wrote, by sector.
func writeReadBack(t *testing.T, what string, im *Image, bi *builtImage) map[uint64][]byte {
	t.Helper()
	lss := uint64(im.LogicalSectorSize())
	spb := uint64(im.BlockSize()) / lss
	total := uint64(im.Size()) / lss
	wrote := map[uint64][]byte{}
	for _, sec := range []uint64{spb / 2, total - 1, spb} {
		if sec >= total {
			continue
		}
		p := sectorData(0x40, sec, sec, uint32(lss))
		if _, err := im.WriteAt(p, int64(sec*lss)); err != nil {
			t.Fatalf("%s: write sector %d of an image that opened read-write: %v", what, sec, err)
		}
		got := make([]byte, lss)
		if _, err := im.ReadAt(got, int64(sec*lss)); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("%s: sector %d does not read back what was written (%v)", what, sec, err)
		}
		wrote[sec] = p
	}
	if err := im.Flush(); err != nil {
		t.Fatalf("%s: flush: %v", what, err)
	}
	return wrote
}

// requireReads checks that an image reads wrote[sec] at every sector
// written, and the model at the other sample sectors.
func requireReads(t *testing.T, what string, im *Image, layers []*builtImage, wrote map[uint64][]byte, useModel bool) {
	t.Helper()
	lss := uint64(im.LogicalSectorSize())
	got := make([]byte, lss)
	useModel = useModel && layers[0].matches(im)
	for _, sec := range modelSectors(layers[0], im) {
		want, ok := wrote[sec]
		if !ok {
			if !useModel {
				continue
			}
			want = modelRead(layers, sec)
		}
		if _, err := im.ReadAt(got, int64(sec*lss)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: sector %d reads %x... after reopen, want %x... (%v)", what, sec, got[:8], want[:8], err)
		}
	}
}

// refusedUnchanged fails if an open that refused the image as invalid
// modified the file. A host error (here: the storage's size limit, hit by
// a log replay that extends the file) may come after the header update that
// must precede any change (§2.2.2.1), so it is not held to this.
func refusedUnchanged(t *testing.T, what string, err error, before, after *pageStorage) {
	t.Helper()
	refused := errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNotVHDX) || errors.Is(err, ErrUnsupported) || errors.Is(err, ErrDirtyLog)
	if !refused {
		return
	}
	if same, where := before.equal(after); !same {
		t.Fatalf("%s: open refused the image (%v) but modified it: %s", what, err, where)
	}
}

// fuzzOpenBuilt runs every property on one built base image.
func fuzzOpenBuilt(t *testing.T, bi *builtImage) {
	for _, ro := range []bool{true, false} {
		what := fmt.Sprintf("read-only %v", ro)
		s := bi.s.clone()
		im, err := OpenStorage(s, OpenOptions{ReadOnly: ro})
		if err != nil {
			if !bi.broken && !(ro && errors.Is(err, ErrDirtyLog)) {
				t.Fatalf("%s: an image built without a flaw was refused: %v", what, err)
			}
			refusedUnchanged(t, what, err, bi.s, s)
			continue
		}
		useModel := !bi.logActive
		verifyReads(t, what, im, []*builtImage{bi}, []*pageStorage{s}, useModel)
		if ro {
			im.Close()
			if same, where := bi.s.equal(s); !same {
				t.Fatalf("%s: a read-only open modified the image: %s", what, where)
			}
			requireNoDamage(t, what, s, bi.softDamage || bi.logActive)
			continue
		}
		wrote := writeReadBack(t, what, im, bi)
		if err := im.Close(); err != nil {
			t.Fatalf("%s: close: %v", what, err)
		}
		im, err = OpenStorage(s, OpenOptions{})
		if err != nil {
			t.Fatalf("%s: the image does not reopen after a write: %v", what, err)
		}
		requireReads(t, what+", reopened", im, []*builtImage{bi}, wrote, useModel)
		verifyReads(t, what+", reopened", im, []*builtImage{bi}, []*pageStorage{s}, false)
		im.Close()
		requireNoDamage(t, what+", after a write", s, bi.softDamage || bi.logActive)
	}
}

// FuzzOpenStructured builds a base image from a structured description
// (imagebuilder_test.go) and checks, beyond "no panic": an image refused is
// left byte for byte as it was, read-write opens included; an image built
// without a flaw opens; what an open image reads is stable, agrees with
// Extents and, when no log was replayed, with the model the builder keeps;
// a read-only open changes nothing; a write reads back, survives a reopen
// and leaves the other sectors alone; and Check finds no damage in an image
// that opened.
func FuzzOpenStructured(f *testing.F) {
	for _, seed := range structuredSeeds {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzOpenBuilt(t, buildImage(&specReader{in}, 1, nil))
	})
}

// structuredSeeds are descriptions of images worth starting from (field
// order: see buildImage): the default image, 4096-byte sectors, 256 MiB
// blocks past a chunk boundary, header 2 current with header 1 broken,
// unknown regions and metadata items, a log, a broken region table copy.
var structuredSeeds = [][]byte{
	{},
	// g=1: 4 KiB sectors, 1 MiB blocks; 3 blocks, the last 7 sectors long;
	// BAT: FULLY_PRESENT, ZERO, FULLY_PRESENT.
	{1, 2, 7, 0, 0, 0, 0, 0, 6, 0, 0, 2, 6, 9, 0, 0},
	// 256 MiB blocks, 512-byte sectors, 20 blocks: chunk ratio 16, so
	// entry 16 is a sector bitmap entry; blocks 0, 16 and 19 present.
	seedCat([]byte{8 << 2, 19, 0, 0, 0, 0, 0, 0, 6, 0, 0}, make([]byte, 16), []byte{6, 1, 0, 0, 0, 6, 5, 0, 0}),
	// header 2 current, header 1's checksum broken; an unknown optional
	// region, an unknown optional metadata item and a user item; an
	// UNDEFINED block keeping its offset.
	{0, 2, 0, 0, 5, 0, 1, 10, 9, 6, 3, 0, 0, 0},
	// a log of two entries: a data descriptor into the metadata region and
	// a zero descriptor over payload, then a BAT sector rewritten as is.
	{0, 1, 0, 0, 0, 2, 0, 0, 6, 0, 0, 0, 5, 0, 2, 1, 3, 6, 1, 0, 1, 0x11, 0, 0},
	// 4 MiB blocks; region table 1 broken; 4 MiB of trailing space.
	{8, 3, 0, 0, 0, 0, 64, 0, 6, 0, 0, 0, 6, 0, 0, 0, 2, 4},
}

func seedCat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// FuzzChainStructured builds a parent and a differencing child over it
// (parent locator, sector bitmaps, PARTIALLY_PRESENT blocks) and checks that
// opening the child never panics, that a refused child is left unchanged,
// that every sample sector reads what the model says (top-down, the first
// layer whose BAT or bitmap bit says present), a write to the child reads
// back after a reopen while the parent's sectors around it still show, and
// that Check finds no damage in a child that opened.
func FuzzChainStructured(f *testing.F) {
	for _, seed := range chainSeeds {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r := &specReader{in}
		parent := buildImage(r, 1, nil)
		child := buildImage(r, 2, parent)
		fuzzChainBuilt(t, parent, child)
	})
}

// chainSeeds: a parent of two 1 MiB blocks (the first present) under a
// child whose first block is PARTIALLY_PRESENT with two bitmap runs; and a
// 256 MiB-block pair (19 blocks, chunk ratio 16) whose child has
// PARTIALLY_PRESENT blocks on both sides of the chunk boundary and a
// parent_linkage2.
var chainSeeds = [][]byte{
	seedCat([]byte{0, 1, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0},
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 2, 1, 0, 10, 44, 1, 5, 0}),
	seedCat([]byte{8 << 2, 18, 0, 0, 0, 0, 0, 0, 6, 0, 0}, make([]byte, 16), []byte{6, 0, 0, 0, 0, 0},
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 7, 3, 0, 2, 0, 0, 255, 200, 0, 9}, make([]byte, 15),
		[]byte{7, 0, 0, 1, 10, 0, 255}),
	// A child with 2 MiB blocks over a parent with 1 MiB ones: parent 4
	// blocks, 0 and 3 present; child block 0 PARTIALLY_PRESENT with a
	// run across the parent's block boundary, block 1 NOT_PRESENT.
	seedCat([]byte{0, 3, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 6, 9, 0, 0},
		[]byte{1 << 2, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 2, 0xF0, 7, 40, 2, 0, 5, 0}),
}

func fuzzChainBuilt(t *testing.T, parent, child *builtImage) {
	// Sample the parent's data sectors too (they may lie anywhere in a
	// child block of another size).
	child.written = append(child.written, parent.written...)
	ps := parent.s.clone()
	openParent := func() *Image {
		p, err := OpenStorage(ps, OpenOptions{ReadOnly: true})
		if err != nil {
			return nil
		}
		return p
	}
	if p := openParent(); p == nil {
		return // the base target covers refused parents
	} else {
		p.Close()
	}
	// A parent built with a deliberate flaw can still open (a fuzzed
	// virtual size that is itself valid, say) and then is not the parent
	// the child was built over: the child may be refused as a broken chain,
	// and the builder's model of the parent's data no longer holds.
	flawedParent := parent.broken
	layers := []*builtImage{child, parent}
	for _, ro := range []bool{true, false} {
		what := fmt.Sprintf("child, read-only %v", ro)
		cs := child.s.clone()
		p := openParent()
		im, err := openStorageWithParent(cs, OpenOptions{ReadOnly: ro}, p)
		if err != nil {
			p.Close()
			if !child.broken && !flawedParent && !(ro && errors.Is(err, ErrDirtyLog)) {
				t.Fatalf("%s: a child built without a flaw was refused: %v", what, err)
			}
			refusedUnchanged(t, what, err, child.s, cs)
			continue
		}
		useModel := !child.logActive && !flawedParent
		files := []*pageStorage{cs, ps}
		verifyReads(t, what, im, layers, files, useModel)
		if ro {
			im.Close()
			if same, where := child.s.equal(cs); !same {
				t.Fatalf("%s: a read-only open modified the child: %s", what, where)
			}
			continue
		}
		wrote := writeReadBack(t, what, im, child)
		if err := im.Close(); err != nil {
			t.Fatalf("%s: close: %v", what, err)
		}
		im, err = openStorageWithParent(cs, OpenOptions{}, openParent())
		if err != nil {
			t.Fatalf("%s: the child does not reopen after a write: %v", what, err)
		}
		requireReads(t, what+", reopened", im, layers, wrote, useModel)
		verifyReads(t, what+", reopened", im, layers, files, false)
		im.Close()
		requireNoDamage(t, what+", after a write", cs, child.softDamage || child.logActive)
	}
	if same, where := parent.s.equal(ps); !same {
		t.Fatalf("the parent changed under its child: %s", where)
	}
}

// TestBuiltImagesOpenAndMatchTheModel runs the fuzz properties over the
// seeds as ordinary tests, and checks that the seeds exercise what they
// claim: the default description builds a valid image, the 256 MiB one
// crosses a chunk boundary, and the chain seed has a PARTIALLY_PRESENT block.
func TestBuiltImagesOpenAndMatchTheModel(t *testing.T) {
	def := buildImage(&specReader{}, 1, nil)
	if def.broken || def.size != mib || def.lss != 512 {
		t.Fatalf("the empty description should build a valid 1 MiB image with 512-byte sectors: %+v", def)
	}
	big := buildImage(&specReader{structuredSeeds[2]}, 1, nil)
	if uint64(len(big.bat)) <= big.cr {
		t.Fatalf("the 256 MiB-block seed has %d BAT entries, chunk ratio %d: no chunk boundary", len(big.bat), big.cr)
	}
	r := &specReader{chainSeeds[0]}
	parent := buildImage(r, 1, nil)
	child := buildImage(r, 2, parent)
	if child.broken || batState(child.bat[0]) != statePartiallyPresent {
		t.Fatalf("chain seed: child broken %v, first BAT entry %#x; want a valid child with a PARTIALLY_PRESENT block", child.broken, child.bat[0])
	}
	r = &specReader{chainSeeds[2]}
	parent = buildImage(r, 1, nil)
	child = buildImage(r, 2, parent)
	if child.broken || parent.bs != mib || child.bs != 2*mib || batState(child.bat[0]) != statePartiallyPresent {
		t.Fatalf("chain seed 2: child broken %v, block sizes %d under %d, first BAT entry %#x; want a 2 MiB-block child over 1 MiB blocks",
			child.broken, child.bs, parent.bs, child.bat[0])
	}
	for i, seed := range structuredSeeds {
		t.Run(fmt.Sprintf("base%d", i), func(t *testing.T) { fuzzOpenBuilt(t, buildImage(&specReader{seed}, 1, nil)) })
	}
	for i, seed := range chainSeeds {
		t.Run(fmt.Sprintf("chain%d", i), func(t *testing.T) {
			r := &specReader{seed}
			p := buildImage(r, 1, nil)
			fuzzChainBuilt(t, p, buildImage(r, 2, p))
		})
	}
}

// BenchmarkOpenStructuredExec measures one exec of FuzzOpenStructured's
// body over random descriptions (the fuzzer's cost per input).
func BenchmarkOpenStructuredExec(b *testing.B) {
	t := &testing.T{}
	rnd := rand.New(rand.NewSource(1))
	in := make([]byte, 64)
	for i := 0; i < b.N; i++ {
		rnd.Read(in)
		fuzzOpenBuilt(t, buildImage(&specReader{in}, 1, nil))
	}
}
