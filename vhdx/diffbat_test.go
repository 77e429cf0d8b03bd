package vhdx

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// A child made by newMemChain over a 64 MiB base with 1 MiB blocks has the
// layout of CreateStorage: BAT at 3 MiB; chunk ratio 4096, so BAT entry
// 4096 is chunk 0's sector bitmap entry.
const (
	diffBAT  = 3 * mib
	diffSB0  = 4096
	diffData = 4 * mib
)

// diffChild returns a child whose block 0 is PARTIALLY_PRESENT (bitmap
// present) and block 2 FULLY_PRESENT, and the chain it belongs to.
func diffChild(t *testing.T) (memChain, []byte) {
	t.Helper()
	mc := newMemChain(t, CreateOptions{Size: 64 * mib, BlockSize: mib}, []imageWrite{{0, pattern(1, 4*mib)}})
	s := newMemStorage(bytes.Clone(mc.child))
	im, err := mc.openChild(t, s, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(2, 512), 512); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(pattern(3, mib), 2*mib); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	return mc, s.bytes()
}

func diffEntry(b []byte, i int) uint64       { return le.Uint64(b[diffBAT+8*i:]) }
func setDiffEntry(b []byte, i int, v uint64) { le.PutUint64(b[diffBAT+8*i:], v) }

// TestOpenRefusesEachBrokenDifferencingRule: BAT and locator rules that only
// apply to a differencing image, each refused with the rule named and the
// file left untouched.
func TestOpenRefusesEachBrokenDifferencingRule(t *testing.T) {
	tests := []struct {
		name     string
		mutate   func(b []byte)
		sentinel error
		want     string
	}{
		{"PartialBlockWithoutBitmap", func(b []byte) { setDiffEntry(b, diffSB0, 0) }, ErrCorrupt,
			"BAT entry 4096 at offset 0x308000: sector bitmap entry is NOT_PRESENT but its chunk has a PARTIALLY_PRESENT block"},
		{"BitmapReservedState", func(b []byte) { setDiffEntry(b, diffSB0, diffEntry(b, diffSB0)&^7|2) }, ErrCorrupt,
			"sector bitmap entry state 2 is reserved"},
		{"BitmapPastEndOfFile", func(b []byte) { setDiffEntry(b, diffSB0, makeBATEntry(stateFullyPresent, 1<<40)) }, ErrCorrupt,
			"BAT entry 4096 at offset 0x308000: block [0x10000000000, 0x10000100000) extends past the end of the file"},
		{"BitmapInHeaderSection", func(b []byte) { setDiffEntry(b, diffSB0, makeBATEntry(stateFullyPresent, 0)) }, ErrCorrupt,
			"block offset 0x0 lies in the header section"},
		{"BitmapOverlapsPayloadBlock", func(b []byte) {
			setDiffEntry(b, diffSB0, makeBATEntry(stateFullyPresent, batFileOffset(diffEntry(b, 2))))
		}, ErrCorrupt, "overlaps"},
		{"PartialBlockOverlapsBitmap", func(b []byte) {
			setDiffEntry(b, 0, makeBATEntry(statePartiallyPresent, batFileOffset(diffEntry(b, diffSB0))))
		}, ErrCorrupt, "sector bitmap block [0x500000, 0x600000) overlaps payload block of BAT entry 0"},
		{"PartialBlockReservedBits", func(b []byte) { setDiffEntry(b, 0, diffEntry(b, 0)|1<<10) }, ErrCorrupt,
			"BAT entry 0 at offset 0x300000: reserved bits 0x400 are set"},
		{"LocatorTypeUnknown", func(b []byte) {
			off := imgMetaOff + int(le.Uint32(b[imgMetaOff+mdHeaderSize+5*mdEntrySize+mdeOffOffset:]))
			b[off] ^= 0xFF
		}, ErrUnsupported, "parent locator metadata item at offset"},
		{"LocatorWithoutLinkage", func(b []byte) {
			off := imgMetaOff + int(le.Uint32(b[imgMetaOff+mdHeaderSize+5*mdEntrySize+mdeOffOffset:]))
			// The first key is parent_linkage: rename it.
			k := off + int(le.Uint32(b[off+plHeaderSize+pleOffKeyOffset:]))
			b[k] = 'q'
		}, ErrCorrupt, "no parent_linkage entry"},
		{"LocatorMissing", func(b []byte) {
			le.PutUint16(b[imgMetaOff+mdOffEntryCount:], 5)
		}, ErrCorrupt, "HasParent is set but there is no parent locator item"},
	}
	mc, good := diffChild(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if im, err := mc.openChild(t, newMemStorage(bytes.Clone(good)), true); err != nil {
				t.Fatalf("unbroken child does not open: %v", err)
			} else {
				im.Close()
			}
			b := bytes.Clone(good)
			tc.mutate(b)
			for _, ro := range []bool{true, false} {
				s := newMemStorage(bytes.Clone(b))
				im, err := mc.openChild(t, s, ro)
				if err == nil {
					im.Close()
					t.Fatalf("read-only %v: opened", ro)
				}
				if !errors.Is(err, tc.sentinel) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("read-only %v: error %q, want %v naming %q", ro, err, tc.sentinel, tc.want)
				}
				if !bytes.Equal(s.bytes(), b) {
					t.Fatalf("read-only %v: a refused open modified the file", ro)
				}
			}
		})
	}
}

// TestFirstWriteIntoBlockIgnoresStaleBitmapBits: bits set in the bitmap for
// a NOT_PRESENT block (which the spec says not to consult) do not survive
// its allocation: the sectors not written still read from the parent.
func TestFirstWriteIntoBlockIgnoresStaleBitmapBits(t *testing.T) {
	mc, b := diffChild(t)
	sb := batFileOffset(diffEntry(b, diffSB0))
	for i := range 256 { // every bit of block 1 (sectors 2048..4095)
		b[sb+256+uint64(i)] = 0xFF
	}
	im, err := mc.openChild(t, newMemStorage(b), false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, mib)
	if _, err := im.ReadAt(got, mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(1, 4*mib)[mib:2*mib]) {
		t.Fatal("NOT_PRESENT block with stale bits does not read its parent")
	}
	if _, err := im.WriteAt(pattern(4, 512), mib+4096); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(pattern(1, 4*mib)[mib : 2*mib])
	copy(want[4096:], pattern(4, 512))
	if _, err := im.ReadAt(got, mib); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after the first write, block 1 differs at %#x", i)
	}
}

// TestLoadBATAllocatesPerImageNotPerEntry: validating a BAT of 64Ki
// entries costs a handful of allocations, not one per entry.
func TestLoadBATAllocatesPerImageNotPerEntry(t *testing.T) {
	for _, child := range []bool{false, true} {
		var s []byte
		var hasParent bool
		if child {
			_, s = diffChild(t)
			hasParent = true
		} else {
			s = createMem(t, CreateOptions{Size: 64 * gib, BlockSize: mib}).bytes()
		}
		ms := newMemStorage(s)
		im, err := openStorage(ms, OpenOptions{ReadOnly: true}, nil)
		if err != nil {
			t.Fatal(err)
		}
		l := im.l
		if l.hasParent != hasParent {
			t.Fatal("wrong image kind")
		}
		n := testing.AllocsPerRun(5, func() {
			if _, err := loadBAT(ms, &l, nil); err != nil {
				t.Fatal(err)
			}
		})
		if n > 16 {
			t.Errorf("child %v: loadBAT of %d entries made %.0f allocations", child, l.batEntries, n)
		}
	}
}
