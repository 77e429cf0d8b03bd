package vhdx

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// hugeImage creates a dynamic image of size bytes with 1 MiB blocks in a
// temp dir. Create leaves the BAT a hole of the sparse file. With
// zeroState the BAT is written out with every payload entry in state
// PAYLOAD_BLOCK_ZERO, as `qemu-img create -f vhdx` does: the worst case for
// open, every entry non-zero and in the file.
func hugeImage(tb testing.TB, size uint64, zeroState bool) string {
	tb.Helper()
	p := filepath.Join(tb.TempDir(), "huge.vhdx")
	if err := Create(p, CreateOptions{Size: size, BlockSize: mib}); err != nil {
		tb.Fatal(err)
	}
	if zeroState {
		fillBAT(tb, p, func(i uint64, cr uint64) uint64 {
			if isBitmapIndex(i, cr) {
				return 0
			}
			return stateZero
		})
	}
	return p
}

// fillBAT rewrites every on-disk BAT entry of the image at p with
// entry(index, chunk ratio), in 1 MiB writes.
func fillBAT(tb testing.TB, p string, entry func(i, cr uint64) uint64) {
	tb.Helper()
	im, err := openFileWith(p, OpenOptions{ReadOnly: true, NoLock: true}, openMetadata)
	if err != nil {
		tb.Fatal(err)
	}
	l := im.l
	im.Close()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, mib)
	for base := uint64(0); base < l.batOnDisk; base += mib / 8 {
		n := min(mib/8, l.batOnDisk-base)
		for j := uint64(0); j < n; j++ {
			binary.LittleEndian.PutUint64(buf[j*8:], entry(base+j, l.chunkRatio))
		}
		if _, err := f.WriteAt(buf[:n*8], int64(l.bat.offset+base*8)); err != nil {
			tb.Fatal(err)
		}
	}
}

// forHuge16TiB runs bench, reporting allocations, as one sub-benchmark per
// layout of a fresh 16 TiB image with 1 MiB blocks (a 128 MiB BAT): sparse
// as we create it ("sparse"), and written out in state ZERO as qemu-img
// creates it ("qemu-zero-state"). p is the image's path.
func forHuge16TiB(b *testing.B, bench func(b *testing.B, p string)) {
	for _, bc := range []struct {
		name      string
		zeroState bool
	}{{"sparse", false}, {"qemu-zero-state", true}} {
		b.Run(bc.name, func(b *testing.B) {
			p := hugeImage(b, 16*tib, bc.zeroState)
			b.ReportAllocs()
			bench(b, p)
		})
	}
}

// BenchmarkOpen16TiB opens (read-only) and closes a fresh 16 TiB image with
// 1 MiB blocks, a 128 MiB BAT: sparse as we create it, and written out in
// state ZERO as qemu-img creates it.
func BenchmarkOpen16TiB(b *testing.B) {
	forHuge16TiB(b, func(b *testing.B, p string) {
		for b.Loop() {
			im, err := Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				b.Fatal(err)
			}
			im.Close()
		}
	})
}

// BenchmarkInfo16TiB is what `vhost-vhdx info` does: an inspecting open and
// Info.
func BenchmarkInfo16TiB(b *testing.B) {
	forHuge16TiB(b, func(b *testing.B, p string) {
		for b.Loop() {
			im, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true, ReplayLogInMemory: true})
			if err != nil {
				b.Fatal(err)
			}
			if in := im.Info(); in.VirtualSize != 16*tib {
				b.Fatalf("Info().VirtualSize = %d", in.VirtualSize)
			}
			im.Close()
		}
	})
}

// BenchmarkCheck16TiB is `vhost-vhdx check` of the image alone.
func BenchmarkCheck16TiB(b *testing.B) {
	forHuge16TiB(b, func(b *testing.B, p string) {
		for b.Loop() {
			rep, err := Check(p, false)
			if err != nil || rep.Damaged() {
				b.Fatalf("Check = %+v, %v", rep, err)
			}
		}
	})
}
