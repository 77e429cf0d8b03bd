package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"os"
	"strings"
	"testing"
)

// TestResizeGrowsAndShrinksAndQEMUAgrees: grow in place, grow past what the
// BAT region holds (the BAT moves), shrink; data before the old end stays,
// the new space reads zeros, and qemu-img reports the new size and finds
// the image consistent. Fixed images stay fully allocated.
func TestResizeGrowsAndShrinksAndQEMUAgrees(t *testing.T) {
	for _, tc := range []struct {
		name     string
		typ      ImageType
		from, to uint64
		moves    bool
	}{
		{"dynamic grow in place", Dynamic, 64 * mib, 1 * gib, false},
		{"dynamic grow, BAT relocated", Dynamic, 64 * mib, 200 * gib, true},
		{"dynamic grow to an unaligned size", Dynamic, 64 * mib, 100*mib + 512, false},
		{"dynamic shrink", Dynamic, 64 * mib, 16*mib + 4096, false},
		{"fixed grow", Fixed, 16 * mib, 40 * mib, false},
		{"fixed shrink", Fixed, 40 * mib, 16 * mib, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := createFile(t, CreateOptions{Size: tc.from, BlockSize: 1 * mib, Type: tc.typ})
			keep := min(tc.from, tc.to)
			data := pattern(5, int(min(keep, 16*mib)))
			writeImage(t, path, 0, data)
			oldBAT := regionOffset(t, path)
			if err := Resize(path, tc.to, tc.to < tc.from); err != nil {
				t.Fatalf("Resize(%d → %d): %v", tc.from, tc.to, err)
			}
			if moved := regionOffset(t, path) != oldBAT; moved != tc.moves {
				t.Fatalf("BAT region moved: %v, want %v", moved, tc.moves)
			}
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatalf("open after resize: %v", err)
			}
			if uint64(im.Size()) != tc.to {
				t.Fatalf("size %d after resize, want %d", im.Size(), tc.to)
			}
			got := make([]byte, len(data))
			if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("data before the old end changed (err %v)", err)
			}
			if tc.to > tc.from {
				tail := make([]byte, min(tc.to-tc.from, 4*mib))
				if _, err := im.ReadAt(tail, int64(tc.to)-int64(len(tail))); err != nil || !isZeros(tail) && tc.typ == Dynamic {
					t.Fatalf("new space does not read zeros (err %v)", err)
				}
				// The new end is writable.
				if _, err := im.WriteAt(pattern(6, 512), int64(tc.to)-512); err != nil {
					t.Fatal(err)
				}
			}
			if tc.typ == Fixed && im.Info().AllocatedBytes < int64(tc.to) {
				t.Fatalf("fixed image has %d bytes in blocks for %d", im.Info().AllocatedBytes, tc.to)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if tc.typ == Fixed && allocatedOnHost(t, path) < int64(tc.to) {
				t.Fatalf("fixed image occupies %d bytes on the host for a %d-byte disk", allocatedOnHost(t, path), tc.to)
			}
			vhdxtest.NeedQEMU(t)
			run(t, "qemu-img", "check", "-f", "vhdx", path)
			if out := run(t, "qemu-img", "info", "-f", "vhdx", path); !strings.Contains(out, fmt.Sprintf("(%d bytes)", tc.to)) {
				t.Fatalf("qemu-img info does not report %d bytes:\n%s", tc.to, out)
			}
		})
	}
}

// regionOffset returns the BAT region's offset as open sees it.
func regionOffset(t *testing.T, path string) uint64 {
	t.Helper()
	im, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	return im.l.bat.offset
}

// TestResizeShrinkRefusesDataPastTheNewEnd: shrinking needs the shrink
// flag, and is refused, naming the first allocated virtual offset, while a
// block past the new end holds data; after a discard of it the shrink
// works. Refusals leave the image unchanged.
func TestResizeShrinkRefusesDataPastTheNewEnd(t *testing.T) {
	path := createFile(t, CreateOptions{Size: 64 * mib, BlockSize: 1 * mib})
	writeImage(t, path, 40*mib+4096, pattern(1, 4096))
	writeImage(t, path, 50*mib, pattern(2, 4096))
	before, _ := os.ReadFile(path)
	err := Resize(path, 32*mib, false)
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "shrink") {
		t.Fatalf("shrink without the flag: %v", err)
	}
	err = Resize(path, 32*mib, true)
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "0x2800000") {
		t.Fatalf("shrink over data: %v; want an error naming offset 0x2800000", err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Fatal("a refused resize changed the image")
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Discard(32*mib, 32*mib); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Resize(path, 32*mib, true); err != nil {
		t.Fatalf("shrink after discarding the data past the end: %v", err)
	}
	if err := Resize(path, 0, true); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("resize to 0: %v", err)
	}
	if err := Resize(path, 32*mib+1, true); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("resize to an unaligned size: %v", err)
	}
}

// TestResizeCrashAtEveryBoundaryLeavesOldOrNewSize: a power cut before any
// operation of a resize (grow with the BAT relocated, grow in place, shrink)
// leaves, in every crash mode, an image that opens with the old size or the
// new one, the data intact, and no two BAT entries sharing a range.
func TestResizeCrashAtEveryBoundaryLeavesOldOrNewSize(t *testing.T) {
	parallelSweep(t)
	for _, tc := range []struct {
		name     string
		from, to uint64
	}{
		{"grow, BAT relocated", 64 * mib, 200 * gib},
		{"grow in place", 64 * mib, 512 * mib},
		{"shrink", 64 * mib, 8 * mib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := newFaultStorage(nil)
			if err := CreateStorage(base, CreateOptions{Size: tc.from, BlockSize: 1 * mib}); err != nil {
				t.Fatal(err)
			}
			data := pattern(3, 4*mib)
			{
				im, err := OpenStorage(base, OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := im.WriteAt(data, 0); err != nil {
					t.Fatal(err)
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
			}
			start := base.current()
			resize := func(s Storage) error {
				im, err := OpenStorage(s, OpenOptions{})
				if err != nil {
					return err
				}
				if err := im.resize(tc.to, true); err != nil {
					return err
				}
				return im.Close()
			}
			ref := newFaultStorage(start)
			if err := resize(ref); err != nil {
				t.Fatal(err)
			}
			total := ref.opCount()
			for crash := 1; crash <= total+1; crash++ {
				s := newFaultStorage(start)
				s.crashAfter(crash)
				if err := resize(s); err != nil && !errors.Is(err, errCrashed) {
					t.Fatalf("crash %d: %v is not the crash", crash, err)
				}
				for _, mode := range allCrashModes {
					where := fmt.Sprintf("crash before op %d of %d (%s)", crash, total, mode)
					im, err := OpenStorage(newMemStorage(s.crashImage(mode)), OpenOptions{})
					if err != nil {
						t.Fatalf("%s: reopen: %v", where, err)
					}
					if sz := uint64(im.Size()); sz != tc.from && sz != tc.to {
						t.Fatalf("%s: size %d is neither %d nor %d", where, sz, tc.from, tc.to)
					}
					keep := min(int64(len(data)), im.Size())
					got := make([]byte, keep)
					if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, data[:keep]) {
						t.Fatalf("%s: data changed (err %v)", where, err)
					}
					assertNoSharedRanges(t, im)
					if err := im.Close(); err != nil {
						t.Fatalf("%s: close: %v", where, err)
					}
				}
			}
		})
	}
}

// TestResizeRefusesADifferencingImageAndSaysWhy: resizing a checkpoint (a
// differencing child) is refused with ErrUnsupported and a message giving
// the rule and the way out, even when its parent is not at hand; the file
// is left byte for byte as it was.
func TestResizeRefusesADifferencingImageAndSaysWhy(t *testing.T) {
	parent, child := createBaseAndChild(t)
	before, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string) {
		t.Helper()
		for _, size := range []uint64{128 * mib, 32 * mib} {
			err := Resize(child, size, true)
			if !errors.Is(err, ErrUnsupported) {
				t.Fatalf("%s: Resize(%d) = %v, want ErrUnsupported", name, size, err)
			}
			for _, want := range []string{child, "differencing image", "its parent's", "commit", "resize the base"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: %q does not say %q", name, err, want)
				}
			}
		}
		after, err := os.ReadFile(child)
		if err != nil || !bytes.Equal(before, after) {
			t.Errorf("%s: the refused resize changed the file (%v)", name, err)
		}
	}
	check("parent present")
	if err := os.Rename(parent, parent+".away"); err != nil {
		t.Fatal(err)
	}
	check("parent missing")
}

// TestAChildLargerThanItsParentIsReadByNoOne backs the refusal above: a
// child whose VirtualDiskSize (§2.6.2.2) was raised by hand past its
// parent's is refused by Open (ErrParentGeometry), and libvhdi, an
// implementation we did not write, fails to read it past the parent's end
// instead of returning zeros.
func TestAChildLargerThanItsParentIsReadByNoOne(t *testing.T) {
	parent, child := createBaseAndChild(t)
	meta, err := openFileWith(child, OpenOptions{ReadOnly: true, NoLock: true}, openMetadata)
	if err != nil {
		t.Fatal(err)
	}
	metaOff := meta.l.meta.offset
	meta.Close()
	f, err := os.OpenFile(child, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	table := make([]byte, metadataTableSize)
	if _, err := f.ReadAt(table, int64(metaOff)); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	count := int(le.Uint16(table[mdOffEntryCount:]))
	found := false
	for i := 0; i < count; i++ {
		e := table[mdHeaderSize+i*mdEntrySize:]
		if guidFromDisk(e[mdeOffItemID:]) == MetaVirtualDiskSize {
			var b [8]byte
			le.PutUint64(b[:], 128*mib)
			if _, err := f.WriteAt(b[:], int64(metaOff)+int64(le.Uint32(e[mdeOffOffset:]))); err != nil {
				t.Fatal(err)
			}
			found = true
		}
	}
	f.Close()
	if !found {
		t.Fatal("no virtual disk size item")
	}
	if _, err := Open(child, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrParentGeometry) {
		t.Errorf("Open of a child larger than its parent = %v, want ErrParentGeometry", err)
	}
	if got := vhdxtest.LibvhdiSize(t, child); got != 128*mib {
		t.Fatalf("libvhdi reads the child's size as %d", got)
	}
	cmd := vhdxtest.LibvhdiCommand(t, child, []string{parent}, []vhdxtest.Span{{Off: 96 * mib, N: 4096}})
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Errorf("libvhdi read the child past its parent's end: %d bytes; a grown child would be readable elsewhere", len(out))
	}
}

// createBaseAndChild creates a 64 MiB base image and an empty differencing
// child of it in a temp dir, and returns their paths.
func createBaseAndChild(t *testing.T) (parent, child string) {
	t.Helper()
	dir := t.TempDir()
	parent, child = dir+"/base.vhdx", dir+"/child.avhdx"
	if err := Create(parent, CreateOptions{Size: 64 * mib}); err != nil {
		t.Fatal(err)
	}
	if err := Create(child, CreateOptions{ParentPath: parent}); err != nil {
		t.Fatal(err)
	}
	return parent, child
}
