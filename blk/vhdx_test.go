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

// A *vhdx.Image has Discard and WriteZeroes, so the device offers both and
// a multi-segment DISCARD from the guest reaches the image: the discarded
// data reads back as zeros through IN.
var (
	_ Discarder   = (*vhdx.Image)(nil)
	_ WriteZeroer = (*vhdx.Image)(nil)
)

func TestDiscardOverARealVHDXImageReadsZeros(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.vhdx")
	if err := vhdx.Create(path, vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if f := Features(im, Options{}); f&(1<<FeatureDiscard) == 0 || f&(1<<FeatureWriteZeroes) == 0 {
		t.Fatalf("features %#x lack DISCARD or WRITE_ZEROES", f)
	}
	h := NewHandler(im, Options{})
	status := []byte{0xEE}
	data := pattern(4<<20, 7)
	if n := h.Handle([][]byte{hdr(TypeOut, 0), data}, [][]byte{status}); n != 1 || status[0] != StatusOK {
		t.Fatalf("OUT status %d: %v", status[0], h.Err())
	}
	// One whole block and a partial range in another, in one request.
	req := [][]byte{hdr(TypeDiscard, 0), seg(0, 2048, 0), seg(3<<11+8, 16, 0)}
	if n := h.Handle(req, [][]byte{status}); n != 1 || status[0] != StatusOK {
		t.Fatalf("DISCARD status %d: %v", status[0], h.Err())
	}
	got := make([]byte, 4<<20+1)
	if n := h.Handle([][]byte{hdr(TypeIn, 0)}, [][]byte{got}); n != uint32(len(got)) || got[4<<20] != StatusOK {
		t.Fatalf("IN status %d: %v", got[4<<20], h.Err())
	}
	want := bytes.Clone(data)
	clear(want[:1<<20])
	clear(want[3<<20+4096 : 3<<20+4096+8192])
	if !bytes.Equal(got[:4<<20], want) {
		t.Fatal("IN after DISCARD differs from the data with the discarded ranges zeroed")
	}
}
