package vhdx

import (
	"fmt"
	"testing"
)

// BenchmarkDiscardFstrim discards an 8 GiB disk whose every block is
// allocated (a dynamic image preallocated with falloc, so setting it up
// writes nothing) in ranges of 1 MiB to 1 GiB, as an fstrim of a full file
// system would send them. One op is the whole 8 GiB; bytes/s is discarded
// bytes, including the flush that commits the BAT changes. The blk config's
// 2 GiB range limit is chosen from these numbers.
func BenchmarkDiscardFstrim(b *testing.B) {
	const size = 8 * gib
	for _, bs := range []uint32{1 * mib, 8 * mib, 32 * mib} {
		for _, seg := range []int64{1 * mib, 64 * mib, 1 * gib} {
			if seg < int64(bs) && bs > mib {
				continue
			}
			b.Run(fmt.Sprintf("block=%s/range=%s", benchName(int(bs)), benchName(int(seg))), func(b *testing.B) {
				b.SetBytes(size)
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					p := createFile(b, CreateOptions{Size: size, BlockSize: bs, Preallocation: PreallocFalloc})
					im, err := Open(p, OpenOptions{})
					if err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					for off := int64(0); off < size; off += seg {
						if err := im.Discard(off, seg); err != nil {
							b.Fatal(err)
						}
					}
					if err := im.Flush(); err != nil { // the guest's flush commits the BAT
						b.Fatal(err)
					}
					b.StopTimer()
					if err := im.Close(); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		}
	}
}

// BenchmarkAllocatingWrite writes 4 KiB into each of 256 unallocated 1 MiB
// blocks: in a fresh image (the file grows) and in one whose blocks were
// all written and then discarded (the writes reuse the freed space, zeroing
// it first). One op is one allocating write.
func BenchmarkAllocatingWrite(b *testing.B) {
	const blocks = 256
	for _, reclaimed := range []bool{false, true} {
		b.Run(fmt.Sprintf("reclaimed=%v", reclaimed), func(b *testing.B) {
			buf := pattern(1, 4*kib)
			for done := 0; done < b.N; {
				b.StopTimer()
				p := createFile(b, CreateOptions{Size: 2 * blocks * mib, BlockSize: mib})
				im, err := Open(p, OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				if reclaimed {
					for k := int64(0); k < blocks; k++ {
						if _, err := im.WriteAt(buf, k*mib); err != nil {
							b.Fatal(err)
						}
					}
					if err := im.Discard(0, blocks*mib); err != nil {
						b.Fatal(err)
					}
					if err := im.Flush(); err != nil { // commits: the ranges become free
						b.Fatal(err)
					}
				}
				b.StartTimer()
				for k := int64(0); k < blocks && done < b.N; k, done = k+1, done+1 {
					if _, err := im.WriteAt(buf, (blocks+k)*mib); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if reclaimed && im.space.reusedBytes == 0 {
					b.Fatal("no write reused the discarded space")
				}
				im.Close()
				b.StartTimer()
			}
		})
	}
}
