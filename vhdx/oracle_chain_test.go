package vhdx

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// chainLayerWrites are the writes of one layer of an oracle chain: single
// sectors at the start, middle and end of blocks, a run across a block
// boundary, a whole block (FULLY_PRESENT in a child), the last sector of the
// disk and, when the disk is that large, a run across the first chunk
// boundary (the next sector bitmap). Each layer shifts them by a few sectors
// so an upper layer hides part of what the lower ones wrote and leaves the
// rest visible.
func chainLayerWrites(size uint64, bs, lss uint32, layer int) diskModel {
	s, b, end := int64(lss), int64(bs), int64(size)
	sh := int64(layer) * 3 * s
	seed := int64(layer+1) << 40
	var ws diskModel
	add := func(off, n int64) {
		if off >= 0 && n > 0 && off+n <= end {
			ws = append(ws, write{off, pattern(seed+off, int(n))})
		}
	}
	add(sh, s)               // first sectors
	add(b/2+sh, s)           // a lone sector mid-block
	add(b-2*s+sh, 4*s)       // across the first block boundary
	add(2*b+sh, 2*s)         // two sectors into block 2
	add(int64(layer+3)*b, b) // a whole block, a different one per layer
	add(5*b+b/2-sh, b+s)     // across a boundary from mid-block
	chunk := int64(chunkRatio(lss, bs)) * b
	add(chunk-2*s+sh, 4*s)       // across the chunk boundary
	add(end-s-int64(layer)*s, s) // the last sectors
	return ws
}

// TestLibvhdiAnd7ZipReadChainsWeWrite: differencing chains of depth 1 to 3
// made with Create(ParentPath), each layer written at tricky offsets before
// the next is created over it, read the same through libvhdi (layers
// attached with set_parent), 7-Zip (which finds the parents through the
// locator) and us; and what we read is what was written, later layers
// winning.
func TestLibvhdiAnd7ZipReadChainsWeWrite(t *testing.T) {
	parallelSweep(t)
	tests := []struct {
		lss   uint32
		bs    uint32
		size  uint64
		depth int
		whole bool // stream the whole disk from both oracles (see oracle_images_test.go)
	}{
		{512, 1 * mib, 64*mib + 1024, 1, true},
		{512, 1 * mib, 64*mib + 1024, 2, true},
		{512, 1 * mib, 64*mib + 1024, 3, true},
		{512, 32 * mib, 96*mib - 1024, 2, true},
		{4096, 1 * mib, 64*mib + 8192, 1, true},
		{4096, 1 * mib, 64*mib + 8192, 3, true},
		{4096, 8 * mib, 40*mib - 8192, 2, true},
		// Across the 4 GiB chunk: the child's second sector bitmap block
		// (libvhdi reads the written ranges; streaming 4 GiB is too slow).
		{512, 1 * mib, 4*gib + 4*mib + 1024, 2, false},
		// An odd sector count, which 7-Zip refuses: libvhdi only.
		{512, 1 * mib, 48*mib - 512, 2, false},
		// 4096-byte sectors: the 32 GiB chunk boundary, libvhdi only.
		{4096, 4 * mib, 32*gib + 8*mib + 8192, 2, false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("lss%d/bs%dM/%d/depth%d", tc.lss, tc.bs/mib, tc.size, tc.depth), func(t *testing.T) {
			var model diskModel
			paths := makeChain(t, CreateOptions{Size: tc.size, BlockSize: tc.bs, LogicalSectorSize: tc.lss}, tc.depth,
				func(layer int, p string) {
					ws := chainLayerWrites(tc.size, tc.bs, tc.lss, layer)
					im, err := Open(p, OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					for _, w := range ws {
						if _, err := im.WriteAt(w.data, w.off); err != nil {
							t.Fatalf("layer %d: WriteAt(%#x, %d): %v", layer, w.off, len(w.data), err)
						}
					}
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
					model = append(model, ws...)
				})
			top := paths[tc.depth]
			var parents []string // nearest first, as libvhdi attaches them
			for i := tc.depth - 1; i >= 0; i-- {
				parents = append(parents, paths[i])
			}
			im, err := Open(top, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			ctx := int64(min(tc.bs, mib))
			libvhdiReadsSpans(t, im, top, parents, spansAround(model, int64(tc.size), ctx), model.read)
			if tc.whole {
				oraclesReadWhole(t, im, top, parents...)
			}
		})
	}
}

// TestLibvhdiChecksTheParentLinkageWeWrite: the parent_linkage we write is
// what libvhdi compares with the parent's DataWriteGuid: attached to its
// grandparent instead of its parent, a child is refused ("mismatch in
// identifier"), so the chain tests above really read through the parents.
func TestLibvhdiChecksTheParentLinkageWeWrite(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 2, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, 0, pattern(1, 4096))
		}
	})
	cmd := vhdxtest.LibvhdiCommand(t, paths[2], []string{paths[0]}, []vhdxtest.Span{{Off: 0, N: 4096}})
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("libvhdi read %s with its grandparent as parent:\n%s", filepath.Base(paths[2]), out)
	}
}
