package vhdx

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// writeFile materialises the storage as a sparse file at path.
func (p *pageStorage) writeFile(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for pg, page := range p.pages {
		if _, err := f.WriteAt(page[:], pg*psPage); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(p.size); err != nil {
		t.Fatal(err)
	}
}

// TestBuiltChainsReadAlikeByPathAndInOtherReaders takes chains the image
// builder made (its own encoding of the parent locator, sector bitmaps and
// PARTIALLY_PRESENT blocks, independent of the package's writer), puts
// them in files and checks that Open finds the parent through the locator's
// relative_path and reads what the builder's model says; that Check finds
// no damage; that libvhdi and 7-Zip read the same disk (so the model and
// the package are not agreeing on a misreading of §2.4 and §2.5 alone);
// and that after a write through the package, a reopen, libvhdi and 7-Zip
// all read the written sectors over the parent's data around them.
func TestBuiltChainsReadAlikeByPathAndInOtherReaders(t *testing.T) {
	// The chain seeds, and the first with other locator contents: a
	// parent_linkage2, Win32 and volume paths that do not resolve here
	// (relative_path does), an unknown key.
	const locatorKnob = 13 + 8 // parent description, then the child's knobs up to the locator
	cases := map[string][]byte{"seed0": chainSeeds[0], "seed1": chainSeeds[1], "otherblocksize": chainSeeds[2]}
	for name, k := range map[string]byte{"linkage2": 2, "win32paths": 4, "unknownkey": 8} {
		in := bytes.Clone(chainSeeds[0])
		in[locatorKnob] = k
		cases[name] = in
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			r := &specReader{in}
			parent := buildImage(r, 1, nil)
			child := buildImage(r, 2, parent)
			if parent.broken || child.broken {
				t.Fatalf("description builds a broken chain (parent %v, child %v)", parent.broken, child.broken)
			}
			dir := t.TempDir()
			parentPath := filepath.Join(dir, "base.vhdx")
			childPath := filepath.Join(dir, "child.avhdx")
			parent.s.writeFile(t, parentPath)
			child.s.writeFile(t, childPath)
			layers := []*builtImage{child, parent}

			im, err := Open(childPath, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("open the child by path: %v", err)
			}
			if im.Parent() == nil || im.Parent().Path() != parentPath {
				t.Fatalf("the child's parent is %v, want %s", im.Parent(), parentPath)
			}
			secs := modelSectors(child, im)
			lss := uint64(child.lss)
			want := map[uint64][]byte{}
			for _, sec := range secs {
				want[sec] = modelRead(layers, sec)
			}
			requireChainReads(t, "opened by path", im, want)
			im.Close()
			requireCheckClean(t, childPath)
			requireOraclesRead(t, childPath, parentPath, child.size, lss, want, layers)

			// A write through the package, into the PARTIALLY_PRESENT
			// block and the NOT_PRESENT one.
			im, err = Open(childPath, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			spb := uint64(child.bs) / lss
			for _, sec := range []uint64{3, spb + 5} {
				if sec >= child.size/lss {
					continue
				}
				p := sectorData(0x40, sec, sec, child.lss)
				if _, err := im.WriteAt(p, int64(sec*lss)); err != nil {
					t.Fatal(err)
				}
				want[sec] = p
				for _, n := range []uint64{sec - 1, sec + 1} {
					if _, ok := want[n]; !ok {
						want[n] = modelRead(layers, n)
					}
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = Open(childPath, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("reopen after a write: %v", err)
			}
			requireChainReads(t, "reopened after a write", im, want)
			im.Close()
			requireCheckClean(t, childPath)
			// Sectors not written still read as the model says: the
			// write left their bitmap bits and BAT entries alone.
			requireOraclesRead(t, childPath, parentPath, child.size, lss, want, layers)
		})
	}
}

func requireChainReads(t *testing.T, what string, im *Image, want map[uint64][]byte) {
	t.Helper()
	lss := uint64(im.LogicalSectorSize())
	got := make([]byte, lss)
	for sec, w := range want {
		if _, err := im.ReadAt(got, int64(sec*lss)); err != nil || !bytes.Equal(got, w) {
			t.Fatalf("%s: sector %d reads %x..., want %x... (%v)", what, sec, got[:8], w[:8], err)
		}
	}
}

func requireCheckClean(t *testing.T, path string) {
	t.Helper()
	rep, err := Check(path, false)
	if err != nil {
		t.Fatalf("check %s: %v", path, err)
	}
	if rep.Damaged() {
		t.Fatalf("check %s reports damage: %+v", path, rep.Problems)
	}
}

// requireOraclesRead has libvhdi read the sectors in want, and, for a disk
// of at most 64 MiB, 7-Zip stream the whole disk, compared with want where
// it has the sector and with the model of layers elsewhere.
func requireOraclesRead(t *testing.T, child, parent string, size, lss uint64, want map[uint64][]byte, layers []*builtImage) {
	t.Helper()
	var ranges []vhdxtest.Span
	var secs []uint64
	for sec := range want {
		secs = append(secs, sec)
		ranges = append(ranges, vhdxtest.Span{Off: int64(sec * lss), N: int64(lss)})
	}
	mediaSize, sectorSize, got := libvhdiRead(t, child, parent, ranges)
	if mediaSize != size || sectorSize != lss {
		t.Fatalf("libvhdi: media size %d, sector size %d; want %d, %d", mediaSize, sectorSize, size, lss)
	}
	for i, sec := range secs {
		if g := got[uint64(i)*lss:][:lss]; !bytes.Equal(g, want[sec]) {
			t.Fatalf("libvhdi: sector %d reads %x..., want %x...", sec, g[:8], want[sec][:8])
		}
	}
	if size > 64*mib || vhdxtest.SevenZipRefusesSize(size, uint32(lss)) {
		return
	}
	disk := make([]byte, size)
	for sec := uint64(0); sec < size/lss; sec++ {
		w, ok := want[sec]
		if !ok {
			w = modelRead(layers, sec)
		}
		copy(disk[sec*lss:], w)
	}
	vhdxtest.SevenZipEquals(t, child, bytes.NewReader(disk), "want", int64(size))
}
