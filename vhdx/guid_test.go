package vhdx

import (
	"bytes"
	"testing"
)

func TestGUIDConversionMatchesOnDiskBATRegionBytes(t *testing.T) {
	// MS-VHDX §2.2.3.2: the BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08
	// is stored with Data1..Data3 little-endian.
	onDisk := []byte{0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42,
		0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08}
	if got := guidFromDisk(onDisk); got != RegionBAT {
		t.Fatalf("guidFromDisk = %v, want %v", got, RegionBAT)
	}
	out := make([]byte, 16)
	guidToDisk(out, RegionBAT)
	if !bytes.Equal(out, onDisk) {
		t.Fatalf("guidToDisk = % x, want % x", out, onDisk)
	}
}
