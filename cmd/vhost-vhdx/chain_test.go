package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// chainWrite is one write into one layer of a test chain.
type chainWrite struct {
	layer int
	off   int64
	n     int
}

// fill returns n bytes that differ per layer and offset, never all zero.
func fill(layer int, off int64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(int64(layer*71) + (off+int64(i))/512*13 + int64(i%251) + 1)
	}
	return b
}

// testChain creates base.vhdx of size bytes and depth children over it
// (child1.avhdx ...) in dir, applying the writes of each layer before the
// next is created. It returns the paths, base first, and what the top
// must read.
func testChain(t *testing.T, dir string, size int64, lss uint32, depth int, writes []chainWrite) ([]string, []byte) {
	t.Helper()
	paths := []string{filepath.Join(dir, "base.vhdx")}
	mustRun(t, "create", "--size", fmt.Sprint(size), "--block-size", "1M", "--logical-sector", fmt.Sprint(lss), paths[0])
	want := make([]byte, size)
	for layer := 0; layer <= depth; layer++ {
		if layer > 0 {
			p := filepath.Join(dir, fmt.Sprintf("child%d.avhdx", layer))
			if err := vhdx.Create(p, vhdx.CreateOptions{ParentPath: paths[layer-1]}); err != nil {
				t.Fatal(err)
			}
			paths = append(paths, p)
		}
		im, err := vhdx.Open(paths[layer], vhdx.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range writes {
			if w.layer != layer {
				continue
			}
			d := fill(layer, w.off, w.n)
			if _, err := im.WriteAt(d, w.off); err != nil {
				t.Fatalf("layer %d: write %#x: %v", layer, w.off, err)
			}
			copy(want[w.off:], d)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return paths, want
}

// parentsOf lists the parents of the top of paths, nearest first.
func parentsOf(paths []string) []string {
	var ps []string
	for i := len(paths) - 2; i >= 0; i-- {
		ps = append(ps, paths[i])
	}
	return ps
}

// standardChainWrites: single sectors, runs across block boundaries, whole
// blocks and the last sector, spread over three layers so each upper
// layer hides part of the lower ones.
func standardChainWrites(size int64, lss int64) []chainWrite {
	const mib = 1 << 20
	return []chainWrite{
		{0, 0, 3 * mib}, {0, size - 2*lss, int(2 * lss)},
		{1, lss, int(lss)}, {1, mib - lss, int(2 * lss)}, {1, 5 * mib, mib},
		{2, 2 * lss, int(lss)}, {2, mib, int(lss)}, {2, 5*mib + 4*lss, int(lss)}, {2, size - lss, int(lss)},
		{3, 0, int(lss)}, {3, 7*mib - lss, int(3 * lss)},
	}
}

// TestConvertFlattensAChain: converting a child copies what the whole chain
// reads, to raw and to a standalone VHDX, byte-equal to what libvhdi and
// 7-Zip read from the chain.
func TestConvertFlattensAChain(t *testing.T) {
	for _, lss := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("lss%d", lss), func(t *testing.T) {
			dir := t.TempDir()
			size := int64(12<<20) + 2*lss
			paths, want := testChain(t, dir, size, uint32(lss), 3, standardChainWrites(size, lss))
			top := paths[len(paths)-1]
			sameBytes(t, "libvhdi reading the chain", readWithLibvhdi(t, top, parentsOf(paths)...), want)
			sameBytes(t, "7-Zip reading the chain", readWith7zip(t, top), want)

			raw := filepath.Join(dir, "flat.raw")
			mustRun(t, "convert", "-O", "raw", top, raw)
			got, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "convert -O raw of the top", got, want)

			flat := filepath.Join(dir, "flat.vhdx")
			mustRun(t, "convert", "-O", "vhdx", top, flat)
			if in := infoJSON(t, flat); in.Type != "dynamic" || in.LogicalSectorSize != uint32(lss) {
				t.Errorf("converted image is %s with %d-byte sectors, want a standalone dynamic image with %d", in.Type, in.LogicalSectorSize, lss)
			}
			sameBytes(t, "7-Zip reading convert -O vhdx of the top", readWith7zip(t, flat), want)
		})
	}
}
