package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openViewImage creates a dynamic 64 MiB image with 1 MiB blocks on a file
// and opens it read-write.
func openViewImage(t *testing.T) (*Image, string) {
	t.Helper()
	path := createFile(t, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20})
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im, path
}

// fileOffsetOf returns where virtual offset off of an allocated block lies
// in the file.
func fileOffsetOf(t *testing.T, im *Image, off uint64) uint64 {
	t.Helper()
	_, e, in, _ := im.locate(off)
	if batState(e) != stateFullyPresent {
		t.Fatalf("block of %#x not allocated: state %d", off, batState(e))
	}
	return batFileOffset(e) + in
}

func readVec4K(im *Image, off int64) ([]byte, error) {
	buf := make([]byte, 4096)
	return buf, im.ReadVec([][]byte{buf}, off)
}

func TestSmallReadsCopiedFromTheViewSeeEveryWrite(t *testing.T) {
	im, path := openViewImage(t)
	// Block 0 is allocated before the view exists; the first read maps it.
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if got, err := readVec4K(im, 0); err != nil || !bytes.Equal(got, pattern(1, 4096)) {
		t.Fatalf("read of block 0: err %v, data equal %v", err, err == nil && bytes.Equal(got, pattern(1, 4096)))
	}
	if im.view.mem == nil {
		t.Fatal("a 4 KiB read of an allocated block left no view mapped")
	}
	// Blocks allocated after the view was made lie past the file's size
	// at that moment but inside the mapping: they read through it.
	for blk := int64(1); blk < 8; blk++ {
		off := blk<<20 + 8192
		if _, err := im.WriteAt(pattern(blk+1, 4096), off); err != nil {
			t.Fatal(err)
		}
		if fo := fileOffsetOf(t, im, uint64(off)); fo+4096 > uint64(len(im.view.mem)) {
			t.Fatalf("block %d at file offset %#x is outside the view (%#x bytes): not testing the view", blk, fo, len(im.view.mem))
		}
		got, err := readVec4K(im, off)
		if err != nil || !bytes.Equal(got, pattern(blk+1, 4096)) {
			t.Fatalf("block %d written after the view was made: err %v, data equal %v", blk, err, err == nil && bytes.Equal(got, pattern(blk+1, 4096)))
		}
	}
	// An overwrite in place, and a write by another program through its own
	// descriptor, are visible to the next read at once (one page cache).
	if _, err := im.WriteAt(pattern(20, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := readVec4K(im, 0); !bytes.Equal(got, pattern(20, 4096)) {
		t.Fatal("an overwrite through the image is not seen by the next read")
	}
	other, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.WriteAt(pattern(21, 4096), int64(fileOffsetOf(t, im, 0))); err != nil {
		t.Fatal(err)
	}
	if got, _ := readVec4K(im, 0); !bytes.Equal(got, pattern(21, 4096)) {
		t.Fatal("a write to the file by another descriptor is not seen by the next read")
	}
	// Unallocated blocks still read as zeros.
	if got, err := readVec4K(im, 40<<20); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("unallocated block: err %v, zero %v", err, bytes.Equal(got, make([]byte, 4096)))
	}
}

func TestAReadOfPayloadCutOffTheFileIsCorruptionNotACrash(t *testing.T) {
	im, path := openViewImage(t)
	for blk := int64(0); blk < 3; blk++ {
		if _, err := im.WriteAt(pattern(blk+1, 1<<20), blk<<20); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := readVec4K(im, 0); err != nil {
		t.Fatal(err)
	}
	// Another program cuts the file inside the last block: its pages past
	// the new end fault (SIGBUS) when the view touches them.
	last := fileOffsetOf(t, im, 2<<20)
	if last+(1<<20) > uint64(len(im.view.mem)) {
		t.Fatalf("the last block is outside the view: not testing the fault")
	}
	if err := os.Truncate(path, int64(last+64<<10)); err != nil {
		t.Fatal(err)
	}
	for _, in := range []int64{512 << 10, 64 << 10, 1<<20 - 4096} {
		_, err := readVec4K(im, 2<<20+in)
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("read %#x into the cut block: err %v, want ErrCorrupt", in, err)
		}
	}
	// What the file still holds reads as before, through the view.
	if got, err := readVec4K(im, 2<<20+4096); err != nil || !bytes.Equal(got, pattern(3, 1<<20)[4096:8192]) {
		t.Fatalf("read before the cut: err %v", err)
	}
	if got, err := readVec4K(im, 1<<20); err != nil || !bytes.Equal(got, pattern(2, 1<<20)[:4096]) {
		t.Fatalf("read of an intact block after a fault: err %v", err)
	}
}

func TestFirstReadsRacingToMapTheViewAllSeeTheirData(t *testing.T) {
	path := createFile(t, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20})
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for blk := int64(0); blk < 16; blk++ {
		if _, err := im.WriteAt(pattern(blk, 4096), blk<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for blk := int64(0); blk < 16; blk++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := readVec4K(im, blk<<20)
			if err == nil && !bytes.Equal(got, pattern(blk, 4096)) {
				err = fmt.Errorf("block %d: wrong data", blk)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestRunsTheViewDoesNotCoverAreReadWithPreadv(t *testing.T) {
	im, _ := openViewImage(t)
	data := pattern(7, 4<<20)
	if _, err := im.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	// A view covering only the first 2 MiB of the file: blocks past it,
	// and a run straddling its end, come from preadv.
	im.view.once.Do(func() { im.view.mem = mapView(im.f, 2<<20) })
	if len(im.view.mem) != 2<<20 {
		t.Fatalf("view of %d bytes, want 2 MiB", len(im.view.mem))
	}
	for off := int64(0); off < 4<<20; off += 4096 {
		got, err := readVec4K(im, off)
		if err != nil || !bytes.Equal(got, data[off:off+4096]) {
			t.Fatalf("read at %#x: err %v", off, err)
		}
	}
	// A run larger than viewMaxCopy uses preadv even inside the view.
	big := make([]byte, 64<<10)
	if err := im.ReadVec([][]byte{big[:32<<10], big[32<<10:]}, 4096); err != nil || !bytes.Equal(big, data[4096:4096+64<<10]) {
		t.Fatalf("64 KiB read: err %v", err)
	}
}

func TestViewLengthCoversGrowthWithinItsCap(t *testing.T) {
	for _, c := range []struct {
		file, virtual, want uint64
	}{
		{8 << 20, 1 << 30, 8<<20 + 1<<30 + viewSlack},
		{64 << 30, 64 << 30, 128<<30 + viewSlack},
		{1 << 20, viewMaxLen - 1, viewMaxLen},
		{viewMaxLen, 1 << 20, viewMaxLen},
		{1 << 20, 64 << 40, viewMaxLen},
		{1<<64 - 1, 1<<64 - 1, viewMaxLen}, // no overflow
	} {
		if got := viewLength(c.file, c.virtual); got != c.want {
			t.Errorf("viewLength(%#x, %#x) = %#x, want %#x", c.file, c.virtual, got, c.want)
		}
	}
}

func TestClosedImageLeavesNoMappingOfItsFile(t *testing.T) {
	im, path := openViewImage(t)
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := readVec4K(im, 0); err != nil {
		t.Fatal(err)
	}
	if !mapsFile(t, path) {
		t.Fatal("no mapping of the image after a read: not testing the unmap")
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if mapsFile(t, path) {
		t.Fatal("the image's file is still mapped after Close")
	}
}

// mapsFile reports whether this process maps path (/proc/self/maps).
func mapsFile(t *testing.T, path string) bool {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(maps), path)
}

func TestAReadThroughAnInMemoryOverlayNeverComesFromTheFileBehindIt(t *testing.T) {
	im, _ := openViewImage(t)
	if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := readVec4K(im, 0); err != nil { // maps the view
		t.Fatal(err)
	}
	fo := fileOffsetOf(t, im, 0)
	// What a read-only open replaying a dirty log in memory does
	// (image.go): reads go through an overlay holding bytes the file
	// does not.
	file := im.s
	ov, err := newOverlayStorage(file)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ov.WriteAt(pattern(2, 4096), int64(fo)); err != nil {
		t.Fatal(err)
	}
	im.s = ov
	defer func() { im.s = file }()
	if got, err := readVec4K(im, 0); err != nil || !bytes.Equal(got, pattern(2, 4096)) {
		t.Fatalf("ReadVec through the overlay: err %v, overlay's bytes %v", err, err == nil && bytes.Equal(got, pattern(2, 4096)))
	}
	got := make([]byte, 4096)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(2, 4096)) {
		t.Fatalf("ReadAt through the overlay: err %v, overlay's bytes %v", err, err == nil && bytes.Equal(got, pattern(2, 4096)))
	}
}

// openChildOfFourBlockBase makes a 64 MiB base whose blocks 0..3 hold
// pattern(blk), and opens a child of it read-write; want is what the
// chain's first 4 MiB read as.
func openChildOfFourBlockBase(t *testing.T) (im *Image, want []byte) {
	t.Helper()
	dir := t.TempDir()
	base, child := dir+"/base.vhdx", dir+"/child.vhdx"
	if err := Create(base, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	b, err := Open(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want = make([]byte, 4<<20)
	for blk := int64(0); blk < 4; blk++ {
		if _, err := b.WriteAt(pattern(blk, 1<<20), blk<<20); err != nil {
			t.Fatal(err)
		}
		copy(want[blk<<20:], pattern(blk, 1<<20))
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Create(child, CreateOptions{ParentPath: base}); err != nil {
		t.Fatal(err)
	}
	if im, err = Open(child, OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im, want
}

func TestSmallReadsThroughAChainComeFromEachLayersView(t *testing.T) {
	im, want := openChildOfFourBlockBase(t)
	// Block 1 whole in the child, one sector run of block 2.
	if _, err := im.WriteAt(pattern(10, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[1<<20:], pattern(10, 1<<20))
	if _, err := im.WriteAt(pattern(11, 8192), 2<<20+4096); err != nil {
		t.Fatal(err)
	}
	copy(want[2<<20+4096:], pattern(11, 8192))
	for off := int64(0); off < 4<<20; off += 4096 {
		got, err := readVec4K(im, off)
		if err != nil || !bytes.Equal(got, want[off:off+4096]) {
			t.Fatalf("read at %#x through the chain: err %v", off, err)
		}
	}
	if im.view.mem == nil || im.Parent().view.mem == nil {
		t.Fatalf("views mapped: child %v, base %v; want both", im.view.mem != nil, im.Parent().view.mem != nil)
	}
}

// A cold page read through the view must cost one page of disk reads, as a
// pread would. The kernel's default for a fault in a mapping is to read
// around it (read_ahead_kb of the disk: 8 MiB on this machine's), which
// made a random-read load of a cold 16 GiB image fall from 15 k to 138
// requests/s: every 4 KiB read pulled in megabytes.
func TestAColdSmallReadThroughTheViewReadsInOnlyItsOwnPage(t *testing.T) {
	im, path := openViewImage(t)
	data := pattern(9, 8<<20)
	if _, err := im.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := readVec4K(im, 0); err != nil { // maps the view
		t.Fatal(err)
	}
	// Block 5 lies in the middle of the payload: read-around in either
	// direction stays inside the data written above.
	off := int64(5<<20 + 512<<10)
	region := dropCache(t, path, fileOffsetOf(t, im, uint64(off)))
	got, err := readVec4K(im, off)
	if err != nil || !bytes.Equal(got, data[off:off+4096]) {
		t.Fatalf("cold read at %#x: err %v", off, err)
	}
	if n := residentPages(t, region); n != 1 {
		t.Fatalf("a cold 4 KiB read through the view brought %d pages of the 2 MiB around it into the page cache, want 1", n)
	}
}

// residentPages counts the pages of mem (page-aligned, a mapping of a
// file) that are in the page cache (mincore(2)).
func residentPages(t *testing.T, mem []byte) int {
	t.Helper()
	vec := make([]byte, (len(mem)+os.Getpagesize()-1)/os.Getpagesize())
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(unsafe.SliceData(mem))), uintptr(len(mem)), uintptr(unsafe.Pointer(unsafe.SliceData(vec))))
	if e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}
