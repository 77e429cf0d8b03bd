package vhdx

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"reflect"
	"testing"
)

func fileDigest(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestReadOnlyInMemoryReplayMatchesRealReplayAndLeavesFileUntouched: an
// inspection open of the dirty-log sample sees exactly what a read-write open
// (which replays into the file, and matches QEMU's repair) sees, while the
// file stays byte-for-byte the same.
func TestReadOnlyInMemoryReplayMatchesRealReplayAndLeavesFileUntouched(t *testing.T) {
	dirty := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	replayed := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	before := fileDigest(t, dirty)

	if _, err := Open(dirty, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrDirtyLog) {
		t.Fatalf("plain read-only open: err = %v, want ErrDirtyLog", err)
	}
	ro, err := Open(dirty, OpenOptions{ReadOnly: true, ReplayLogInMemory: true})
	if err != nil {
		t.Fatalf("read-only open with in-memory replay: %v", err)
	}
	defer ro.Close()
	if !ro.Info().LogReplayed {
		t.Error("Info().LogReplayed = false after an in-memory replay")
	}
	rw, err := Open(replayed, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()

	roExt, err := ro.Extents()
	if err != nil {
		t.Fatal(err)
	}
	rwExt, err := rw.Extents()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(roExt, rwExt) {
		t.Fatalf("extents differ:\nin-memory replay %v\nfile replay      %v", roExt, rwExt)
	}
	a, b := make([]byte, mib), make([]byte, mib)
	for _, e := range roExt {
		if !e.Data {
			continue
		}
		for off := e.Offset; off < e.Offset+e.Length; off += mib {
			n := min(mib, e.Offset+e.Length-off)
			if _, err := ro.ReadAt(a[:n], off); err != nil {
				t.Fatal(err)
			}
			if _, err := rw.ReadAt(b[:n], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a[:n], b[:n]) {
				t.Fatalf("virtual offset %#x reads differently after in-memory and file replay", off)
			}
		}
	}
	if got := fileDigest(t, dirty); got != before {
		t.Fatal("the read-only open modified the file")
	}
}

func TestOverlayStorageLaterWritesWinAndExtensionReadsZero(t *testing.T) {
	base := newMemStorage(bytes.Repeat([]byte{0xAA}, 8192))
	ov, err := newOverlayStorage(base)
	if err != nil {
		t.Fatal(err)
	}
	ov.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
	ov.WriteAt(make([]byte, 1024), 1024) // zeros, stored without data
	ov.WriteAt(bytes.Repeat([]byte{2}, 10), 2000)
	if err := ov.Truncate(16384); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 16384)
	if _, err := ov.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0xAA}, 16384)
	copy(want, bytes.Repeat([]byte{1}, 4096))
	clear(want[1024:2048])
	copy(want[2000:], bytes.Repeat([]byte{2}, 10))
	clear(want[8192:])
	if !bytes.Equal(got, want) {
		t.Fatal("overlay read does not apply writes in order over the base")
	}
	if !bytes.Equal(base.bytes(), bytes.Repeat([]byte{0xAA}, 8192)) {
		t.Fatal("overlay wrote to the base storage")
	}
	if err := ov.Truncate(100); err == nil {
		t.Fatal("overlay shrink accepted")
	}
}

// TestReadWriteOpenOfDirtyImageThatFailsValidationWritesNothing: the dirty
// sample with both region tables broken must be refused before its log is
// replayed or its headers updated.
func TestReadWriteOpenOfDirtyImageThatFailsValidationWritesNothing(t *testing.T) {
	img := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{regionTable1Off + 1000, regionTable2Off + 1000} {
		var b [1]byte
		if _, err := f.ReadAt(b[:], off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0xFF
		if _, err := f.WriteAt(b[:], off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	before := fileDigest(t, img)
	if im, err := Open(img, OpenOptions{}); err == nil {
		im.Close()
		t.Fatal("read-write open of a dirty image with broken region tables succeeded")
	} else if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
	if fileDigest(t, img) != before {
		t.Fatal("the refused read-write open modified the file (replayed the log or updated headers)")
	}
}
