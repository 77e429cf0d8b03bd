package virtqueue_test

import (
	"bytes"
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

func region(gpa, uva uint64, size int) virtqueue.Region {
	return virtqueue.Region{GuestPhysAddr: gpa, UserAddr: uva, Data: make([]byte, size)}
}

func TestNewMemoryRejectsInvalidTables(t *testing.T) {
	tooMany := make([]virtqueue.Region, virtqueue.MaxRegions+1)
	for i := range tooMany {
		tooMany[i] = region(uint64(i)*16, uint64(i)*16, 16)
	}
	tests := []struct {
		name    string
		regions []virtqueue.Region
		want    string // substring of the error
	}{
		{"empty table", nil, "no regions"},
		{"more than MaxRegions", tooMany, "510 regions"},
		{"zero-sized region", []virtqueue.Region{region(0x1000, 0x1000, 0)}, "size 0"},
		{"guest range wraps", []virtqueue.Region{region(math.MaxUint64-7, 0, 16)}, "guest address"},
		{"guest range ends exactly at 2^64", []virtqueue.Region{region(math.MaxUint64-15, 0, 16)}, "wraps"},
		{"user range wraps", []virtqueue.Region{region(0, math.MaxUint64-7, 16)}, "user address"},
		{"guest ranges overlap", []virtqueue.Region{region(0x2000, 0x10000, 0x1000), region(0x1800, 0x20000, 0x1000)}, "guest range"},
		{"guest range inside another", []virtqueue.Region{region(0x1000, 0x10000, 0x4000), region(0x2000, 0x20000, 0x100)}, "guest range"},
		{"user ranges overlap", []virtqueue.Region{region(0x1000, 0x10000, 0x1000), region(0x8000, 0x10800, 0x1000)}, "user range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := virtqueue.NewMemory(tt.regions)
			if !errors.Is(err, virtqueue.ErrInvalidMemory) {
				t.Fatalf("NewMemory = %v, %v; want ErrInvalidMemory", m, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

func TestNewMemoryAcceptsUnsortedAdjacentRegions(t *testing.T) {
	m, err := virtqueue.NewMemory([]virtqueue.Region{
		region(0x3000, 0x100000, 0x1000),
		region(0x1000, 0x300000, 0x2000), // ends where the first starts
		region(math.MaxUint64-0x1000, 0x200000, 0x1000),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := m.Regions()
	for i := 1; i < len(got); i++ {
		if got[i-1].GuestPhysAddr >= got[i].GuestPhysAddr {
			t.Errorf("Regions() not sorted by guest address: %#x before %#x", got[i-1].GuestPhysAddr, got[i].GuestPhysAddr)
		}
	}
}

// twoRegions builds a memory of two regions contiguous in guest-physical
// space, [0x10000, 0x11000) and [0x11000, 0x12000), plus a third after a
// hole at [0x20000, 0x21000). Byte values encode their guest address.
func twoRegions(t *testing.T) (*virtqueue.Memory, []virtqueue.Region) {
	t.Helper()
	rs := []virtqueue.Region{
		region(0x11000, 0x7000_0000, 0x1000),
		region(0x10000, 0x9000_0000, 0x1000),
		region(0x20000, 0x8000_0000, 0x1000),
	}
	for _, r := range rs {
		for i := range r.Data {
			r.Data[i] = byte((r.GuestPhysAddr + uint64(i)) >> 4)
		}
	}
	m, err := virtqueue.NewMemory(rs)
	if err != nil {
		t.Fatal(err)
	}
	return m, rs
}

func want(gpa uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((gpa + uint64(i)) >> 4)
	}
	return b
}

func TestGuestSlices(t *testing.T) {
	m, _ := twoRegions(t)
	tests := []struct {
		name    string
		gpa     uint64
		n       uint32
		wantLen []int  // lengths of the appended slices
		wantErr string // substring; "" means success
	}{
		{"inside one region", 0x10100, 0x200, []int{0x200}, ""},
		{"whole region", 0x10000, 0x1000, []int{0x1000}, ""},
		{"spans two contiguous regions", 0x10f00, 0x200, []int{0x100, 0x100}, ""},
		{"both contiguous regions exactly", 0x10000, 0x2000, []int{0x1000, 0x1000}, ""},
		{"zero length anywhere", 0xdead_0000, 0, nil, ""},
		{"before the first region", 0xff00, 0x10, nil, "0xff00"},
		{"runs into the hole", 0x11f00, 0x200, nil, "0x12000"},
		{"starts in the hole", 0x18000, 1, nil, "0x18000"},
		{"past the last region", 0x20fff, 2, nil, "0x21000"},
		{"wraps around 2^64", math.MaxUint64 - 1, 4, nil, "wraps"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := [][]byte{[]byte("keep")}
			got, err := m.GuestSlices(prefix, tt.gpa, tt.n)
			if tt.wantErr != "" {
				if !errors.Is(err, virtqueue.ErrGuestAddress) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want ErrGuestAddress naming %s", err, tt.wantErr)
				}
				if len(got) != 1 {
					t.Errorf("on error dst has %d slices, want the 1 passed in", len(got))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got[0]) != "keep" {
				t.Errorf("existing element changed")
			}
			got = got[1:]
			if len(got) != len(tt.wantLen) {
				t.Fatalf("got %d slices, want %d", len(got), len(tt.wantLen))
			}
			var all []byte
			for i, s := range got {
				if len(s) != tt.wantLen[i] || cap(s) != len(s) {
					t.Errorf("slice %d: len %d cap %d, want len=cap=%d", i, len(s), cap(s), tt.wantLen[i])
				}
				all = append(all, s...)
			}
			if !bytes.Equal(all, want(tt.gpa, int(tt.n))) {
				t.Errorf("slices do not hold the bytes of [%#x, +%#x)", tt.gpa, tt.n)
			}
		})
	}
}

func TestGuestSlicesDoesNotAllocateWithCapacity(t *testing.T) {
	m, _ := twoRegions(t)
	dst := make([][]byte, 0, 4)
	allocs := testing.AllocsPerRun(100, func() {
		var err error
		dst, err = m.GuestSlices(dst[:0], 0x10f00, 0x200)
		if err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("GuestSlices allocated %v times per call", allocs)
	}
}

func TestReadWriteGuestAcrossRegions(t *testing.T) {
	m, rs := twoRegions(t)
	p := []byte("0123456789abcdef")
	if err := m.WriteGuest(p, 0x10ff8); err != nil {
		t.Fatal(err)
	}
	// rs[1] is [0x10000, 0x11000), rs[0] is [0x11000, 0x12000).
	if !bytes.Equal(rs[1].Data[0xff8:], p[:8]) || !bytes.Equal(rs[0].Data[:8], p[8:]) {
		t.Errorf("write did not land on both sides of the region boundary")
	}
	got := make([]byte, len(p))
	if err := m.ReadGuest(got, 0x10ff8); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Errorf("ReadGuest = %q, want %q", got, p)
	}
}

func TestWriteGuestLeavesMemoryUnchangedOnError(t *testing.T) {
	m, rs := twoRegions(t)
	before := bytes.Clone(rs[0].Data)
	err := m.WriteGuest(make([]byte, 0x20), 0x11ff0) // last 0x10 bytes fall in the hole
	if !errors.Is(err, virtqueue.ErrGuestAddress) {
		t.Fatalf("err = %v, want ErrGuestAddress", err)
	}
	if !bytes.Equal(rs[0].Data, before) {
		t.Errorf("a failed WriteGuest modified guest memory")
	}
	if err := m.ReadGuest(make([]byte, 1), 0x30000); !errors.Is(err, virtqueue.ErrGuestAddress) {
		t.Errorf("ReadGuest of unmapped byte: err = %v", err)
	}
}

func TestUserSlice(t *testing.T) {
	m, _ := twoRegions(t)
	tests := []struct {
		name    string
		uva, n  uint64
		wantGPA uint64 // guest address of the first byte, on success
		wantErr string
	}{
		{"inside a region", 0x9000_0010, 0x20, 0x10010, ""},
		{"whole region", 0x7000_0000, 0x1000, 0x11000, ""},
		{"crosses user region end", 0x9000_0ff0, 0x20, 0, "runs past"},
		{"unmapped", 0x7500_0000, 1, 0, "0x75000000"},
		{"wraps", math.MaxUint64 - 2, 8, 0, "wraps"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := m.UserSlice(tt.uva, tt.n)
			if tt.wantErr != "" {
				if !errors.Is(err, virtqueue.ErrGuestAddress) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want ErrGuestAddress mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if uint64(len(s)) != tt.n || uint64(cap(s)) != tt.n {
				t.Errorf("len %d cap %d, want %d", len(s), cap(s), tt.n)
			}
			if !bytes.Equal(s, want(tt.wantGPA, int(tt.n))) {
				t.Errorf("slice does not hold guest bytes from %#x", tt.wantGPA)
			}
		})
	}
}
