package vhdx

// Oracles for every geometry: images we create and write, at 512- and
// 4096-byte logical sectors, block sizes from 1 MiB to 256 MiB, sizes that
// are not a multiple of the block size and sizes just past a chunk
// boundary, are read back by readers this project did not write and
// compared with a raw file holding the same writes:
//
//   - libvhdi (Debian python3-libvhdi): every written range with context,
//     each block and chunk boundary, and the media and sector sizes;
//   - 7-Zip (Debian 7zip, `7zz e -tvhdx -so`): the whole virtual disk,
//     for disks up to 128 MiB (it streams every byte);
//   - QEMU, 512-byte sectors only (it refuses 4096): `qemu-img compare`
//     of the whole disk against the raw file, and `qemu-io read -P` of a
//     region filled with one byte value and of an unwritten one.
//
// Our own reader is the only one that checked 4096-byte-sector images
// before; a misreading of the spec shared by our writer and reader (chunk
// ratio, sector bitmap entries in the BAT, the last partial block) shows
// up here as a difference. A missing tool skips, or fails when
// VHOST_VHDX_REQUIRE_TOOLS is set (make test; tests/qemu/setup.sh installs
// the tools).

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// libvhdiRead reads spans of img's virtual disk through libvhdi and
// returns the media size, the sector size and the bytes of the spans one
// after the other. parent, if not empty, is img's parent.
func libvhdiRead(t *testing.T, img, parent string, spans []vhdxtest.Span) (uint64, uint64, []byte) {
	t.Helper()
	var parents []string
	if parent != "" {
		parents = []string{parent}
	}
	size, lss := vhdxtest.LibvhdiSize(t, img), vhdxtest.LibvhdiSectorSize(t, img)
	return uint64(size), uint64(lss), bytes.Join(vhdxtest.ReadSpansWithLibvhdi(t, img, parents, spans), nil)
}

// oracleGeometry is one row of TestOtherReadersReadEveryGeometryAsWritten.
type oracleGeometry struct {
	lss  uint32
	bs   uint32
	size uint64
	typ  ImageType
}

func (g oracleGeometry) String() string {
	return fmt.Sprintf("%v/lss%d/bs%dM/size%#x", g.typ, g.lss, g.bs/mib, g.size)
}

var oracleGeometries = []oracleGeometry{
	// Sizes not a multiple of the block size: the last block is partial.
	{512, 1 * mib, 5*mib + 1024, Dynamic},
	{512, 32 * mib, 100*mib - 1024, Dynamic},
	{512, 256 * mib, 300*mib + 3584, Dynamic}, // 7-Zip refuses this size (vhdxtest.SevenZipRefusesSize)
	{4096, 1 * mib, 3*mib + 8192, Dynamic},
	{4096, 4 * mib, 70*mib - 8192, Dynamic},
	{4096, 64 * mib, 100*mib + 8192, Dynamic},
	{4096, 256 * mib, 120*mib - 8192, Dynamic}, // one partial block
	{4096, 8 * mib, 40*mib + 8192, Fixed},
	{4096, 2 * mib, 9*mib + 4096, Dynamic}, // 7-Zip refuses this size
	// Just past a chunk boundary (chunk ratio blocks): the BAT's first
	// sector bitmap entry sits between the payload entries. 4 GiB for
	// 512-byte sectors at any block size; 32 GiB for 4096-byte ones.
	{512, 256 * mib, 4*gib + mib, Dynamic},
	{512, 1 * mib, 4*gib + 512, Dynamic},
	{4096, 1 * mib, 32*gib + 4096, Dynamic},
	{4096, 256 * mib, 32*gib + 256*mib + 8192, Dynamic},
}

// TestOtherReadersReadEveryGeometryAsWritten writes tricky and random
// ranges into images of every geometry and has libvhdi, 7-Zip and (for
// 512-byte sectors) QEMU read them back.
func TestOtherReadersReadEveryGeometryAsWritten(t *testing.T) {
	parallelSweep(t)
	for _, g := range oracleGeometries {
		t.Run(g.String(), func(t *testing.T) {
			if g.size > 4*gib && testing.Short() {
				t.Skip("large sparse disk")
			}
			im, img, raw, rawPath := newImageWithRawTwin(t, CreateOptions{Size: g.size, Type: g.typ, BlockSize: g.bs, LogicalSectorSize: g.lss, Creator: "vhost-vhdx oracle test"})
			ws := trickyWrites(g.size, g.bs, g.lss)
			lss, bs := int64(g.lss), int64(g.bs)
			// One region of a single byte value for qemu-io's read -P,
			// in the second block (or the first, for a one-block disk).
			fillOff := min(bs+4*lss, int64(g.size)-8*lss)
			fill := write{fillOff, bytes.Repeat([]byte{0xA5}, int(4*lss))}
			ws = appendIfFree(ws, fill)
			// And a few sector runs at pseudo-random places.
			rnd := pattern(int64(g.size), 64)
			for i := 0; i < 8; i++ {
				sec := int64(binary.LittleEndian.Uint64(rnd[8*i:])%(g.size/uint64(lss)-4)) * lss
				ws = appendIfFree(ws, write{sec, pattern(sec, int(lss)*(1+i%3))})
			}
			writeToBoth(t, im, raw, ws)

			// libvhdi: every write with a sector of context on each side,
			// each block boundary of the first blocks and the last block,
			// and the chunk boundary.
			var ranges []vhdxtest.Span
			addRange := func(off, n int64) {
				off = max(0, off)
				n = min(n, int64(g.size)-off)
				if n > 0 {
					ranges = append(ranges, vhdxtest.Span{Off: off, N: n})
				}
			}
			for _, w := range ws {
				addRange(w.off-lss, int64(len(w.data))+2*lss)
			}
			for b := int64(1); b <= 3; b++ {
				addRange(b*bs-lss, 2*lss)
			}
			last := int64(g.size) / bs * bs // start of the partial last block
			addRange(last-lss, 2*lss)
			addRange(int64(g.size)-4*lss, 4*lss)
			chunk := int64(chunkRatio(g.lss, g.bs)) * bs
			addRange(chunk-2*lss, 4*lss)
			mediaSize, sectorSize, got := libvhdiRead(t, img, "", ranges)
			if mediaSize != g.size || sectorSize != uint64(g.lss) {
				t.Fatalf("libvhdi: media size %d, %d bytes per sector; we wrote %d, %d", mediaSize, sectorSize, g.size, g.lss)
			}
			for _, r := range ranges {
				want := make([]byte, r.N)
				if _, err := raw.ReadAt(want, r.Off); err != nil && err != io.EOF {
					t.Fatal(err)
				}
				if !bytes.Equal(got[:r.N], want) {
					i := 0
					for got[i] == want[i] {
						i++
					}
					t.Fatalf("libvhdi: virtual byte %#x reads %#x, we wrote %#x", r.Off+int64(i), got[i], want[i])
				}
				got = got[r.N:]
			}

			// 7-Zip streams every byte: disks up to 128 MiB.
			if g.size <= 128*mib && !vhdxtest.SevenZipRefusesSize(g.size, g.lss) {
				vhdxtest.SevenZipEquals(t, img, raw, "wrote", int64(g.size))
			}

			if g.lss == 512 {
				vhdxtest.NeedQEMU(t)
				// qemu-img compare reads every allocated block in full;
				// past 1 GiB (256 MiB blocks) that takes a minute, and
				// TestQEMUAcceptsImagesWeWrite covers those disks.
				if g.size <= gib {
					run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, rawPath)
				}
				zeroOff := int64(g.size) - 2*lss // unwritten unless a write landed there
				for _, w := range ws {
					if w.off < zeroOff+lss && zeroOff < w.off+int64(len(w.data)) {
						zeroOff = -1
					}
				}
				cmds := []string{"-f", "vhdx", "-r", "-c", fmt.Sprintf("read -P 0xa5 %d %d", fill.off, len(fill.data))}
				if zeroOff >= 0 {
					cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d %d", zeroOff, lss))
				}
				out := run(t, "qemu-io", append(cmds, img)...)
				if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != (len(cmds)-3)/2 {
					t.Fatalf("qemu-io: %s", out)
				}
			}
		})
	}
}

// appendIfFree adds w unless it overlaps a write already in ws.
func appendIfFree(ws []write, w write) []write {
	for _, o := range ws {
		if w.off < o.off+int64(len(o.data)) && o.off < w.off+int64(len(w.data)) {
			return ws
		}
	}
	return append(ws, w)
}
