package blk

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// The daemon hands a *vhdx.Image to NewHandler; keep the two contracts in
// step at compile time.
var _ Disk = (*vhdx.Image)(nil)

func TestHandleOverARealVHDXImage(t *testing.T) {
	for _, logical := range []uint32{512, 4096} {
		path := filepath.Join(t.TempDir(), "disk.vhdx")
		if err := vhdx.Create(path, vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20, LogicalSectorSize: logical}); err != nil {
			t.Fatal(err)
		}
		im, err := vhdx.Open(path, vhdx.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		h := NewHandler(im, Options{})
		data := pattern(8192, 42)
		status := []byte{0xEE}
		// OUT crossing a 1 MiB block boundary, data split mid-sector.
		sector := uint64(1<<20-4096) / 512
		if n := h.Handle(split(cat(hdr(TypeOut, sector), data), 16, 1000), [][]byte{status}); n != 1 || status[0] != StatusOK {
			t.Fatalf("logical %d: OUT written %d status %d: %v", logical, n, status[0], h.Err())
		}
		if n := h.Handle([][]byte{hdr(TypeFlush, 0)}, [][]byte{status}); n != 1 || status[0] != StatusOK {
			t.Fatalf("logical %d: FLUSH status %d: %v", logical, status[0], h.Err())
		}
		got := make([]byte, 8192+1)
		if n := h.Handle([][]byte{hdr(TypeIn, sector)}, split(got, 3000)); n != 8193 || got[8192] != StatusOK {
			t.Fatalf("logical %d: IN written %d status %d: %v", logical, n, got[8192], h.Err())
		}
		if !bytes.Equal(got[:8192], data) {
			t.Errorf("logical %d: IN returned different bytes than OUT wrote", logical)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
