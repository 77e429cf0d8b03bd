package vhdx

import (
	"math"
	"os"
	"runtime/debug"
	"sync"

	"golang.org/x/sys/unix"
)

// The file view: small reads of allocated payload are copied out of a
// read-only shared mapping of the image file instead of read with preadv
// or pread: ReadVec's runs (vector.go) and every payload read of a layer
// (readPayload: differencing chains, ReadAt).
//
// Why: a 4 KiB read served from the page cache spends most of its time in
// the kernel around the copy: syscall entry and exit, and the page-cache
// lookup (xas_load, filemap_get_read_batch), together about as much as the
// copy itself (docs/benchmarks/profile.md, "4K randread QD32"). Once a page
// is mapped, a read is one memmove. Measured on this machine, 4 KiB random
// reads of a cached 1 GiB file: preadv 1.6–1.8 µs, the mapping 0.7–0.8 µs.
//
// What it costs and where it stops:
//   - Only runs of at most viewMaxCopy bytes use it. A larger run is
//     copy-bound, and preadv reads a cold range in one I/O where the
//     mapping would fault it in page by page.
//   - The mapping is made on the first read, not at open: info, check and
//     images that are never read map nothing. Its length is fixed then:
//     the file's size plus the disk's virtual size plus viewSlack (room for
//     the blocks later writes allocate at the end of the file), at most
//     viewMaxLen. A run past that length is read with preadv, so a file
//     that grows beyond the view, or an image larger than viewMaxLen, is
//     read correctly, only without the shortcut.
//   - The mapping reserves address space only. A page is read in (or found
//     in the page cache) on its first touch, and the kernel reclaims cached
//     pages as it would for preadv. A cold page faults in the ring owner's
//     thread, as a cold preadv blocks it, and is read alone (MADV_RANDOM,
//     mapView): without it, a cold 16 GiB image served 138 random 4 KiB
//     reads/s instead of 15 k, each fault reading 8 MiB around its page.
//
// Coherence: the mapping is MAP_SHARED of the same file, so it shows the
// page cache that pwrite fills: a write is visible to the next read at
// once, as with preadv. Punched holes read as zeros.
//
// Faults: a page past the end of the file (a file truncated by another
// program, or corrupt) or a page the disk cannot read raises SIGBUS.
// copyFromView runs with debug.SetPanicOnFault, recovers that fault and
// reports it; the caller then reads the run from the Storage, which gives the
// precise answer (the file ends: ErrCorrupt, as without the view; the disk
// fails: EIO). No fault ever reaches the runtime as a crash.
//
// Only an image whose Storage is its file uses the view: a read-only open
// that replays a dirty log in memory reads through an overlay the file
// does not hold.
//
// Concurrency: the mapping is made once (sync.Once) by whichever reader
// comes first; after that readers only load the slice. Close unmaps it, and
// Close must not race with I/O (doc.go).
type fileView struct {
	once sync.Once
	mem  []byte // nil: no view (no file, mapping refused, 32-bit address space)
}

const (
	// viewMaxCopy is the largest run copied from the view: one 4 KiB page,
	// what a 4K random read needs. See the type's doc for larger runs.
	viewMaxCopy = 4096
	// viewSlack is how much room past the file's size plus the virtual size
	// the view reserves: metadata, log and sector bitmaps live in the file
	// besides the payload.
	viewSlack = 1 << 30
	// viewMaxLen bounds one image's reservation: 1 TiB of the 128 TiB of
	// user address space amd64 Linux gives, so tests and chains with many
	// open images never run out of it.
	viewMaxLen = 1 << 40
)

// bytes returns the view's mapping, making it on the first call; nil when
// there is none.
func (v *fileView) bytes(f *os.File, virtualSize uint64) []byte {
	v.once.Do(func() {
		if f == nil {
			return
		}
		if st, err := f.Stat(); err == nil && st.Size() > 0 {
			v.mem = mapView(f, viewLength(uint64(st.Size()), virtualSize))
		}
	})
	return v.mem
}

// viewLength is how much of the file the view maps: its size plus the
// virtual size plus viewSlack, at most viewMaxLen.
func viewLength(fileSize, virtualSize uint64) uint64 {
	if fileSize >= viewMaxLen || virtualSize >= viewMaxLen {
		return viewMaxLen
	}
	return min(fileSize+virtualSize+viewSlack, viewMaxLen)
}

// mapView maps length bytes of f read-only and shared; nil when it cannot
// (address space exhausted, a file system without mmap, a 32-bit build):
// preadv then reads everything.
func mapView(f *os.File, length uint64) []byte {
	if length == 0 || length > math.MaxInt {
		return nil
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(length), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	// A fault on a page that is not cached would otherwise read around it
	// (the disk's read_ahead_kb; 8 MiB on some hosts): a cold random 4 KiB
	// read would pull in megabytes. MADV_RANDOM reads the page alone, as
	// pread does. Advice only: a kernel that refuses it still reads right.
	_ = unix.Madvise(mem, unix.MADV_RANDOM)
	return mem
}

// close unmaps the view. Close calls it after the last read.
func (v *fileView) close() error {
	v.once.Do(func() {}) // no mapping made after this
	if v.mem == nil {
		return nil
	}
	err := unix.Munmap(v.mem)
	v.mem = nil
	return err
}

// readFromView copies the file's bytes [off, end) into bufs from the view,
// and reports whether it did. It does not when the run is larger than
// viewMaxCopy, lies past the mapping, or the Storage is not the file itself
// (an in-memory log replay overlay, a test's fault-injecting storage: the
// mapping would bypass what they add); nor when a page faulted: the buffers
// may then hold part of the data, and the caller reads the run from the
// Storage, which reports the error.
func (im *Image) readFromView(bufs [][]byte, off, end uint64) bool {
	if end-off > viewMaxCopy || vectorOf(im.s) == nil {
		return false
	}
	mem := im.view.bytes(im.f, im.l.size)
	if end > uint64(len(mem)) {
		return false
	}
	return copyFromView(mem[off:end], bufs)
}

// copyFromView copies src into bufs, recovering a fault of the mapping
// (false).
func copyFromView(src []byte, bufs [][]byte) (ok bool) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if p := recover(); p != nil {
			if _, fault := p.(interface{ Addr() uintptr }); !fault {
				panic(p) // not a fault of the mapping: a bug, keep it loud
			}
			ok = false
		}
	}()
	for _, b := range bufs {
		src = src[copy(b, src):]
	}
	return true
}
