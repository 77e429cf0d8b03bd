package vhdx

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// dropCache writes path's dirty pages back and evicts them from the page
// cache. It returns a mapping of the 2 MiB around file offset fo, for
// residentPages, and skips the test when eviction leaves any of them
// cached (a memory file system).
func dropCache(t *testing.T, path string, fo uint64) (region []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	probe, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(probe) })
	region = probe[fo-1<<20 : fo+1<<20]
	if n := residentPages(t, region); n != 0 {
		t.Skipf("%d pages stay cached after FADV_DONTNEED (a memory file system?): cannot make data cold", n)
	}
	return region
}

func TestReadVecCachedReportsDataOffTheDiskAndReadVecColdReadsIt(t *testing.T) {
	im, path := openViewImage(t)
	data := pattern(4, 8<<20)
	if _, err := im.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	off := int64(5<<20 + 128<<10)
	buf := make([]byte, 8192)
	bufs := [][]byte{buf[:4096], buf[4096:]}
	// A miss under RWF_NOWAIT still starts the kernel's read-ahead, and if
	// that read completes before the kernel looks at the page again (the
	// thread preempted in between: seen once under -race on a 2-vCPU VM)
	// the call returns the data after all. That is a correct read, so it
	// must be the right data; evicting again must reach the miss.
	const attempts = 5
	for attempt := 1; ; attempt++ {
		dropCache(t, path, fileOffsetOf(t, im, uint64(off)))
		clear(buf)
		ok, err := im.ReadVecCached(bufs, off)
		if err != nil {
			t.Fatalf("ReadVecCached of evicted data: %v", err)
		}
		if !ok {
			break
		}
		if !bytes.Equal(buf, data[off:off+8192]) {
			t.Fatal("ReadVecCached of evicted data came back through read-ahead with the wrong data")
		}
		if attempt == attempts {
			t.Fatalf("ReadVecCached of evicted data = (true, nil) %d times out of %d, want (false, nil)", attempts, attempts)
		}
	}
	if err := im.ReadVecCold(bufs, off); err != nil || !bytes.Equal(buf, data[off:off+8192]) {
		t.Fatalf("ReadVecCold: err %v, data equal %v", err, err == nil && bytes.Equal(buf, data[off:off+8192]))
	}
	// Now cached: ReadVecCached reads it.
	clear(buf)
	if ok, err := im.ReadVecCached(bufs, off); !ok || err != nil || !bytes.Equal(buf, data[off:off+8192]) {
		t.Fatalf("ReadVecCached of cached data = (%v, %v)", ok, err)
	}
	// Neither touches the view, even for a run it would take (at most
	// viewMaxCopy): a thread blocked in it would hold a P.
	small := make([]byte, 4096)
	if err := im.ReadVecCold([][]byte{small}, 6<<20); err != nil || !bytes.Equal(small, data[6<<20:6<<20+4096]) {
		t.Fatalf("4 KiB ReadVecCold: %v", err)
	}
	if ok, err := im.ReadVecCached([][]byte{small}, 6<<20); !ok || err != nil {
		t.Fatalf("4 KiB ReadVecCached after ReadVecCold = (%v, %v)", ok, err)
	}
	if im.view.mem != nil {
		t.Fatal("ReadVecCached or ReadVecCold mapped the file view")
	}
	// Unallocated blocks need no I/O: zeros, always "cached".
	far := make([]byte, 4096)
	far[0] = 1
	if ok, err := im.ReadVecCached([][]byte{far}, 40<<20); !ok || err != nil || !bytes.Equal(far, make([]byte, 4096)) {
		t.Fatalf("ReadVecCached of an unallocated block = (%v, %v), zeros %v", ok, err, bytes.Equal(far, make([]byte, 4096)))
	}
	if _, err := im.ReadVecCached([][]byte{far}, 64<<20); err == nil {
		t.Fatal("ReadVecCached past the end of the disk succeeded")
	}
}

// A file cut inside a block: ReadVecCached cannot tell a short file from
// uncached data and leaves it to ReadVecCold, which reports corruption.
func TestReadVecCachedLeavesAFileCutShortToReadVecColdWhichCallsItCorrupt(t *testing.T) {
	im, path := openViewImage(t)
	for blk := int64(0); blk < 3; blk++ {
		if _, err := im.WriteAt(pattern(blk+1, 1<<20), blk<<20); err != nil {
			t.Fatal(err)
		}
	}
	last := fileOffsetOf(t, im, 2<<20)
	if err := os.Truncate(path, int64(last+64<<10)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	if ok, err := im.ReadVecCached([][]byte{buf}, 2<<20+512<<10); ok || err != nil {
		t.Fatalf("ReadVecCached past the cut = (%v, %v), want (false, nil)", ok, err)
	}
	if err := im.ReadVecCold([][]byte{buf}, 2<<20+512<<10); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("ReadVecCold past the cut: %v, want ErrCorrupt", err)
	}
	if ok, err := im.ReadVecCached([][]byte{buf}, 2<<20+4096); !ok || err != nil || !bytes.Equal(buf, pattern(3, 1<<20)[4096:8192]) {
		t.Fatalf("ReadVecCached before the cut = (%v, %v)", ok, err)
	}
}

func TestReadVecCachedAndColdOfAChainReadEveryLayer(t *testing.T) {
	im, want := openChildOfFourBlockBase(t)
	if _, err := im.WriteAt(pattern(20, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[1<<20:], pattern(20, 4096))
	got := make([]byte, 8192)
	if ok, err := im.ReadVecCached([][]byte{got}, 1<<20-4096); !ok || err != nil || !bytes.Equal(got, want[1<<20-4096:1<<20+4096]) {
		t.Fatalf("ReadVecCached across layers = (%v, %v)", ok, err)
	}
	clear(got)
	if err := im.ReadVecCold([][]byte{got}, 1<<20-4096); err != nil || !bytes.Equal(got, want[1<<20-4096:1<<20+4096]) {
		t.Fatalf("ReadVecCold across layers: %v", err)
	}
}
