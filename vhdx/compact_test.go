package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"path/filepath"
	"testing"
)

// compactFixture writes blocks 0..7 of a 64 MiB image with 1 MiB blocks
// (blocks 1, 4 and 6 all zeros, block 5 zeros but for one byte), then
// discards blocks 0..1, leaving holes at the start of the file. It returns
// the expected disk contents.
func compactFixture(t *testing.T, im *Image) *flatModel {
	t.Helper()
	m := newFlatModel(im.Size())
	for b := int64(0); b < 8; b++ {
		d := pattern(b+40, mib)
		switch b {
		case 1, 4, 6:
			d = make([]byte, mib)
		case 5:
			d = make([]byte, mib)
			d[mib-1] = 1
		}
		if _, err := im.WriteAt(d, b*mib); err != nil {
			t.Fatal(err)
		}
		m.write(b*mib, d)
	}
	if err := im.Discard(0, 2*mib); err != nil {
		t.Fatal(err)
	}
	m.zero(0, 2*mib)
	return m
}

// TestCompactUnmapsZeroBlocksMovesBlocksIntoHolesAndTruncates: the
// all-zero blocks leave the BAT, blocks from the end of the file fill the
// holes, the file shrinks by what was free, and the disk reads exactly as
// before; qemu-img check and compare agree.
func TestCompactUnmapsZeroBlocksMovesBlocksIntoHolesAndTruncates(t *testing.T) {
	path := createFile(t, CreateOptions{Size: 64 * mib, BlockSize: 1 * mib})
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := compactFixture(t, im)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	var phases []string
	rep, err := Compact(path, func(phase string, done, total uint64) {
		if len(phases) == 0 || phases[len(phases)-1] != phase {
			phases = append(phases, phase)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", *rep)
	if rep.ZeroBlocks != 2 { // 4 and 6; block 1 was discarded, 5 has a byte
		t.Errorf("%d zero blocks unmapped, want 2", rep.ZeroBlocks)
	}
	if rep.MovedBlocks == 0 {
		t.Error("no block moved into the holes at the start")
	}
	// 4 blocks with data remain, plus 4 MiB of headers, log, metadata, BAT.
	if rep.FileSizeAfter != 8*mib || rep.FileSizeAfter >= rep.FileSizeBefore {
		t.Errorf("file size %d → %d, want %d after", rep.FileSizeBefore, rep.FileSizeAfter, 8*mib)
	}
	if fmt.Sprint(phases) != "[scan move]" {
		t.Errorf("progress phases %v", phases)
	}
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	m.check(t, im, "after compact")
	assertNoSharedRanges(t, im)
	im.Close()
	vhdxtest.NeedQEMU(t)
	run(t, "qemu-img", "check", "-f", "vhdx", path)
	raw := filepath.Join(t.TempDir(), "model.raw")
	m.writeRaw(t, raw)
	run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)

	fixed := createFile(t, CreateOptions{Size: 8 * mib, BlockSize: 1 * mib, Type: Fixed})
	if _, err := Compact(fixed, nil); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Compact of a fixed image: %v, want ErrUnsupported", err)
	}
}

// TestCompactCrashAtEveryBoundaryKeepsEveryBlock: a power cut before any
// operation of a compaction leaves, in every crash mode, an image that
// opens, reads exactly as before, and has no two BAT entries sharing a
// range.
func TestCompactCrashAtEveryBoundaryKeepsEveryBlock(t *testing.T) {
	parallelSweep(t)
	base := newFaultStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: 64 * mib, BlockSize: 1 * mib}); err != nil {
		t.Fatal(err)
	}
	im, err := OpenStorage(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := compactFixture(t, im)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	start := base.current()
	compact := func(s Storage) error {
		im, err := OpenStorage(s, OpenOptions{})
		if err != nil {
			return err
		}
		if err := im.compact(&CompactReport{}, nil); err != nil {
			return err
		}
		return im.Close()
	}
	ref := newFaultStorage(start)
	if err := compact(ref); err != nil {
		t.Fatal(err)
	}
	total := ref.opCount()
	want, got := m.read(0, 8*mib), make([]byte, 8*mib)
	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(start)
		s.crashAfter(crash)
		if err := compact(s); err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			where := fmt.Sprintf("crash before op %d of %d (%s)", crash, total, mode)
			im, err := OpenStorage(newMemStorage(s.crashImage(mode)), OpenOptions{ReadOnly: true, ReplayLogInMemory: true})
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: the disk does not read as before", where)
			}
			assertNoSharedRanges(t, im)
			im.Close()
		}
	}
}
