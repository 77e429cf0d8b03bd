package vhdx

import (
	"fmt"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// diskModel is what a virtual disk should read: zeros, with writes applied
// in order (a later write wins where two overlap).
type diskModel []write

func (m diskModel) read(off, n int64) []byte {
	b := make([]byte, n)
	for _, w := range m {
		lo, hi := max(w.off, off), min(w.off+int64(len(w.data)), off+n)
		if lo < hi {
			copy(b[lo-off:], w.data[lo-w.off:hi-w.off])
		}
	}
	return b
}

// oracleWrites are trickyWrites plus a lone sector in the middle of a block
// and a rewrite of part of an already written (so allocated) range.
func oracleWrites(size uint64, bs, lss uint32) diskModel {
	ws := trickyWrites(size, bs, lss)
	s, b := int64(lss), int64(bs)
	if mid := 3*b + b/2; mid+s <= int64(size) {
		ws = append(ws, write{mid, pattern(mid, int(s))})
	}
	// Rewrite the second sector of the block-straddling write: the block is
	// allocated by then, so this goes down the overwrite path.
	ws = append(ws, write{b, pattern(b+1, int(s))})
	return ws
}

// spansAround returns each write's range widened by ctx on both sides,
// clipped to the disk.
func spansAround(ws diskModel, size, ctx int64) []vhdxtest.Span {
	var out []vhdxtest.Span
	for _, w := range ws {
		lo := max(0, w.off-ctx)
		hi := min(size, w.off+int64(len(w.data))+ctx)
		out = append(out, vhdxtest.Span{Off: lo, N: hi - lo})
	}
	return out
}

// TestLibvhdiAnd7ZipReadImagesWeWrite: images we create and write at tricky
// offsets (first and last sector, lone sectors, runs across block and chunk
// boundaries, rewrites) read the same through libvhdi, through 7-Zip and
// through us, for dynamic and fixed images with 512- and 4096-byte logical
// sectors. Before this only qemu-img checked our writes, and only for
// 512-byte sectors.
func TestLibvhdiAnd7ZipReadImagesWeWrite(t *testing.T) {
	parallelSweep(t)
	tests := []struct {
		typ  ImageType
		lss  uint32
		bs   uint32
		size uint64
		// whole: stream the whole disk from both oracles; otherwise only
		// libvhdi reads the written ranges (7-Zip cannot read a range, and
		// streaming gigabytes is too slow for a unit test).
		whole bool
	}{
		// Past the first 4 GiB chunk: the BAT skips a sector bitmap entry.
		// Streaming 4 GiB through 7-Zip costs 10-20 s: libvhdi reads the
		// written ranges.
		{Dynamic, 512, 1 * mib, 4*gib + 2*mib + 1024, false},
		{Dynamic, 512, 32 * mib, 96*mib - 1024, true},
		{Fixed, 512, 1 * mib, 24*mib - 1024, true},
		{Dynamic, 4096, 1 * mib, 64*mib + 8192, true},
		{Dynamic, 4096, 8 * mib, 40*mib - 8192, true},
		{Fixed, 4096, 1 * mib, 24*mib + 8192, true},
		// An odd number of sectors: 7-Zip 26.02 refuses to open these (its
		// size check tests the bit worth one sector instead of the bits
		// below it), so only libvhdi reads them.
		{Dynamic, 512, 1 * mib, 48*mib - 512, false},
		{Fixed, 4096, 1 * mib, 24*mib + 4096, false},
		// 4096-byte sectors make the chunk 32 GiB: too much to stream.
		{Dynamic, 4096, 256 * mib, 32*gib + 256*mib + 8192, false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%v/lss%d/bs%dM/%d", tc.typ, tc.lss, tc.bs/mib, tc.size), func(t *testing.T) {
			p := createFile(t, CreateOptions{Size: tc.size, Type: tc.typ, BlockSize: tc.bs, LogicalSectorSize: tc.lss})
			im, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ws := oracleWrites(tc.size, tc.bs, tc.lss)
			for _, w := range ws {
				if _, err := im.WriteAt(w.data, w.off); err != nil {
					t.Fatalf("WriteAt(%#x, %d): %v", w.off, len(w.data), err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			libvhdiReadsSpans(t, im, p, nil, spansAround(ws, int64(tc.size), int64(min(tc.bs, mib))), ws.read)
			if tc.whole {
				oraclesReadWhole(t, im, p)
			}
			if got := vhdxtest.LibvhdiSize(t, p); got != int64(tc.size) {
				t.Fatalf("libvhdi reports a %d-byte disk, want %d", got, tc.size)
			}
		})
	}
}

// TestLibvhdiAnd7ZipReadHyperVSampleLikeUs: the image Hyper-V wrote reads
// the same through both oracles and through us: every byte through 7-Zip,
// every data extent (and the start of each zero run) through libvhdi, whose
// Python binding reads slowly.
func TestLibvhdiAnd7ZipReadHyperVSampleLikeUs(t *testing.T) {
	parallelSweep(t)
	p := sample(t, "iotest-dynamic-1G.vhdx")
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	sevenZipReadsWhole(t, im, p)
	libvhdiReadsExtents(t, im, p)
}

// TestLibvhdiReadsTheReplayedDirtySampleLikeUs: libvhdi does not replay a
// log, so once our replay has written the log's updates into the file
// (check --repair), libvhdi must read every data extent, and the start of
// the zeros after them, exactly as we do: the BAT and metadata our replay
// wrote are what another implementation understands.
func TestLibvhdiReadsTheReplayedDirtySampleLikeUs(t *testing.T) {
	p := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	if _, err := Check(p, true); err != nil {
		t.Fatal(err)
	}
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	exts, err := im.Extents()
	if err != nil {
		t.Fatal(err)
	}
	if len(exts) < 2 || !exts[0].Data {
		t.Fatalf("extents %+v: the sample should start with data", exts)
	}
	libvhdiReadsExtents(t, im, p)
}

// libvhdiReadsExtents compares, through libvhdi and us, every data extent
// of im and the first 4 MiB of each zero run, and the disk size.
func libvhdiReadsExtents(t *testing.T, im *Image, p string) {
	t.Helper()
	exts, err := im.Extents()
	if err != nil {
		t.Fatal(err)
	}
	var spans []vhdxtest.Span
	for _, e := range exts {
		n := e.Length
		if !e.Data {
			n = min(n, 4*mib)
		}
		spans = append(spans, vhdxtest.Span{Off: e.Offset, N: n})
	}
	ours := func(off, n int64) []byte {
		b := make([]byte, n)
		if _, err := im.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}
	libvhdiReadsSpans(t, im, p, nil, spans, ours)
	if got := vhdxtest.LibvhdiSize(t, p); got != im.Size() {
		t.Fatalf("libvhdi reports a %d-byte disk, we %d", got, im.Size())
	}
}
