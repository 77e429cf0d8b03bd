package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// compareWithRaw reads [off, off+n) from im and from the raw file and fails
// on the first difference, in 4 MiB chunks.
func compareWithRaw(t *testing.T, im *Image, raw *os.File, off, n int64) {
	t.Helper()
	const chunk = 4 * mib
	a, b := make([]byte, chunk), make([]byte, chunk)
	for pos := off; pos < off+n; pos += chunk {
		k := min(chunk, off+n-pos)
		if _, err := im.ReadAt(a[:k], pos); err != nil {
			t.Fatalf("ReadAt(%#x): %v", pos, err)
		}
		if _, err := raw.ReadAt(b[:k], pos); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("raw ReadAt(%#x): %v", pos, err)
		}
		if !bytes.Equal(a[:k], b[:k]) {
			i := 0
			for a[i] == b[i] {
				i++
			}
			t.Fatalf("virtual byte %#x: we read %#x, qemu-img convert gives %#x", pos+int64(i), a[i], b[i])
		}
	}
}

func toRaw(t *testing.T, img string) *os.File {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "ref.raw")
	run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, raw)
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestReadsQEMUWrittenImages: QEMU creates and writes the image at tricky
// offsets; every region we read must equal qemu-img's raw conversion.
func TestReadsQEMUWrittenImages(t *testing.T) {
	vhdxtest.NeedQEMU(t)
	for _, sub := range []string{"dynamic", "fixed"} {
		for _, bs := range []uint32{1 * mib, 8 * mib, 32 * mib, 256 * mib} {
			t.Run(fmt.Sprintf("%s/bs%dM", sub, bs/mib), func(t *testing.T) {
				size := int64(6*gib - 512)
				if sub == "fixed" {
					size = 5*gib - 512 // still past the 4 GiB chunk boundary
				}
				img := filepath.Join(t.TempDir(), "q.vhdx")
				run(t, "qemu-img", "create", "-q", "-f", "vhdx",
					"-o", fmt.Sprintf("block_size=%d,subformat=%s", bs, sub), img, fmt.Sprint(size))
				ws := trickyWrites(uint64(size), bs, 512)
				var cmds []string
				for i, w := range ws {
					cmds = append(cmds, "-c", fmt.Sprintf("write -P %#x %d %d", 0x11*(i+1), w.off, len(w.data)))
				}
				run(t, "qemu-io", append([]string{"-f", "vhdx"}, append(cmds, img)...)...)
				raw := toRaw(t, img)

				im, err := Open(img, OpenOptions{ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer im.Close()
				for _, w := range ws {
					start := max(0, w.off-mib)
					end := min(size, w.off+int64(len(w.data))+mib)
					compareWithRaw(t, im, raw, start, end-start)
				}
				// And a sample of untouched space far from any write.
				compareWithRaw(t, im, raw, 3*gib, 4*mib)
			})
		}
	}
}

// TestQEMUAcceptsImagesWeWrite: images we create and write pass qemu-img
// check and compare equal to a raw file holding the same writes.
func TestQEMUAcceptsImagesWeWrite(t *testing.T) {
	parallelSweep(t)
	vhdxtest.NeedQEMU(t)
	if testing.Short() {
		t.Skip("qemu-img compare reads the whole 6 GiB disks (about 30 s)")
	}
	for _, typ := range []ImageType{Dynamic, Fixed} {
		for _, bs := range []uint32{1 * mib, 8 * mib, 32 * mib, 256 * mib} {
			t.Run(fmt.Sprintf("%v/bs%dM", typ, bs/mib), func(t *testing.T) {
				// qemu-img compare reads every block of a fixed image, so
				// fixed ones stay small; the dynamic ones cross the 4 GiB
				// chunk boundary.
				size := uint64(6*gib - 512)
				if typ == Fixed {
					size = 300*mib - 512
				}
				im, img, raw, rawPath := newImageWithRawTwin(t, CreateOptions{Size: size, Type: typ, BlockSize: bs, Creator: "vhost-vhdx test"})
				writeToBoth(t, im, raw, trickyWrites(size, bs, 512))
				out := run(t, "qemu-img", "check", "-f", "vhdx", img)
				if !strings.Contains(out, "No errors were found") {
					t.Fatalf("qemu-img check:\n%s", out)
				}
				run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, rawPath)
			})
		}
	}
}

// TestReadsHyperVSampleLikeQEMU compares every byte of the Hyper-V image.
func TestReadsHyperVSampleLikeQEMU(t *testing.T) {
	parallelSweep(t)
	vhdxtest.NeedQEMU(t)
	img := sample(t, "iotest-dynamic-1G.vhdx")
	raw := toRaw(t, img)
	im, err := Open(img, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Size() != 1*gib || im.BlockSize() != 32*mib {
		t.Fatalf("geometry %d/%d", im.Size(), im.BlockSize())
	}
	compareWithRaw(t, im, raw, 0, im.Size())
}

func TestReadOnlyOpenRefusesDirtyLog(t *testing.T) {
	img := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(img, OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrDirtyLog) {
		t.Fatalf("Open read-only: %v, want ErrDirtyLog", err)
	}
	if !strings.Contains(err.Error(), "vhost-vhdx check --repair") {
		t.Errorf("error %q does not name the remedy", err)
	}
	after, _ := os.ReadFile(img)
	if !bytes.Equal(before, after) {
		t.Error("read-only open modified the image")
	}
	rep, err := Check(img, false)
	if !errors.Is(err, ErrDirtyLog) || rep == nil || !rep.Damaged() {
		t.Errorf("Check without repair: %v, report %+v", err, rep)
	}
}

// TestReadWriteOpenReplaysDirtyLogLikeQEMU: our replay and QEMU's
// (qemu-img check -r all) must yield the same virtual disk, and the image is
// clean afterwards.
func TestReadWriteOpenReplaysDirtyLogLikeQEMU(t *testing.T) {
	vhdxtest.NeedQEMU(t)
	ours := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	theirs := filepath.Join(t.TempDir(), "theirs.vhdx")
	data, err := os.ReadFile(ours)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(theirs, data, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", theirs)

	im, err := Open(ours, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	info := im.Info()
	if !info.LogReplayed || info.LogGUID != [16]byte{} {
		t.Errorf("after RW open: log_replayed=%v log_guid=%v", info.LogReplayed, info.LogGUID)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", ours, theirs)
	out := run(t, "qemu-img", "check", "-f", "vhdx", ours)
	if !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check after our replay:\n%s", out)
	}
	im, err = Open(ours, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open after replay: %v", err)
	}
	im.Close()
}

func TestCheckRepairReplaysLog(t *testing.T) {
	img := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	rep, err := Check(img, true)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.LogReplayed || rep.Damaged() {
		t.Errorf("Check --repair: %+v", rep)
	}
	rep, err = Check(img, false)
	if err != nil || rep.Damaged() || rep.LogReplayed {
		t.Errorf("Check after repair: %v %+v", err, rep)
	}
}

func TestCheckFindsAndTruncatesLeakedSpace(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 16 * mib, BlockSize: mib})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	im.Close()
	// An allocation that extended the file but crashed before its BAT
	// update leaves 1 MiB past the last block, plus a partial tail.
	if err := os.Truncate(p, 6*mib+4096); err != nil {
		t.Fatal(err)
	}
	rep, err := Check(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.LeakedBytes != mib+4096 || rep.Damaged() {
		t.Fatalf("Check: %+v, want %d leaked bytes and no damage (a leak is not damage)", rep, mib+4096)
	}
	rep, err = Check(p, true)
	if err != nil || rep.Damaged() {
		t.Fatalf("Check --repair: %v %+v", err, rep)
	}
	if fi, _ := os.Stat(p); fi.Size() != 5*mib {
		t.Fatalf("file size after repair %d, want %d", fi.Size(), 5*mib)
	}
	rep, err = Check(p, false)
	if err != nil || rep.Damaged() || rep.LeakedBytes != 0 {
		t.Fatalf("Check after repair: %v %+v", err, rep)
	}
}

func TestCheckCollectsEveryBadBATEntry(t *testing.T) {
	b := corruptBase(t, CreateOptions{})
	le.PutUint64(batEntryAt(b, 2), 4)
	le.PutUint64(batEntryAt(b, 3), makeBATEntry(statePartiallyPresent, 0))
	le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, imgData)) // shares block 0's space
	p := filepath.Join(t.TempDir(), "bad.vhdx")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	rep, err := Check(p, false)
	if err != nil {
		t.Fatal(err)
	}
	wantOffsets := map[int64]bool{imgBATOff + 8: true, imgBATOff + 16: true, imgBATOff + 24: true}
	for _, pr := range rep.Problems {
		delete(wantOffsets, pr.Offset)
	}
	if len(wantOffsets) != 0 || !rep.Damaged() {
		t.Errorf("problems %+v miss offsets %v", rep.Problems, wantOffsets)
	}
}

func TestOpenLocksImage(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 8 * mib})
	rw, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "in use by another process") {
		t.Errorf("second read-write open: %v, want ErrInUse", err)
	}
	if _, err := Open(p, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrInUse) {
		t.Errorf("read-only open beside a writer: %v, want ErrInUse", err)
	}
	if _, err := Check(p, false); !errors.Is(err, ErrInUse) {
		t.Errorf("Check beside a writer: %v, want ErrInUse", err)
	}
	nl, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Errorf("NoLock open: %v", err)
	} else {
		nl.Close()
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	r1, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("second read-only open: %v", err)
	}
	defer r2.Close()
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, ErrInUse) {
		t.Errorf("read-write open beside readers: %v, want ErrInUse", err)
	}
}

// TestQEMUSeesOurLock: QEMU's own OFD locks conflict with ours.
func TestQEMUSeesOurLock(t *testing.T) {
	vhdxtest.NeedQEMU(t)
	p := createFile(t, CreateOptions{Size: 8 * mib})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	out, err := execOut("qemu-io", "-f", "vhdx", "-c", "write 0 512", p)
	if err == nil {
		t.Fatalf("qemu-io wrote to an image we hold open:\n%s", out)
	}
}
