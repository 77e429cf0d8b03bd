package blk

import (
	"bytes"
	"errors"
	"testing"
)

func TestDiskRefOffersWhatItsDiskOffersAndForwardsToTheCurrentDisk(t *testing.T) {
	a := &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}
	b := &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}
	aSector1 := bytes.Clone(a.data[512:1024])
	ref := NewDiskRef(a)
	if Features(ref, Options{}) != Features(a, Options{}) {
		t.Fatalf("features through a DiskRef %#x, disk's %#x", Features(ref, Options{}), Features(a, Options{}))
	}
	plain := newMemDisk(testDiskSize, 512)
	if Features(NewDiskRef(plain), Options{}) != Features(plain, Options{}) {
		t.Fatal("a DiskRef over a disk without Discard offers it")
	}
	h := NewHandler(ref, Options{})
	status := [][]byte{make([]byte, 1)}
	h.Handle([][]byte{cat(hdr(TypeOut, 0), pattern(512, 1))}, status)
	if h.Err() != nil {
		t.Fatal(h.Err())
	}
	if old, err := ref.Swap(b); err != nil || old != Disk(a) {
		t.Fatalf("Swap: %v, %v", old, err)
	}
	h.Handle([][]byte{cat(hdr(TypeOut, 1), pattern(512, 2))}, status)
	h.Handle([][]byte{hdr(TypeDiscard, 0), seg(8, 8, 0)}, status)
	if !bytes.Equal(a.data[:512], pattern(512, 1)) || !bytes.Equal(a.data[512:1024], aSector1) {
		t.Error("old disk: the write before the swap is missing or a later one landed")
	}
	if !bytes.Equal(b.data[512:1024], pattern(512, 2)) || len(b.calls) != 1 || len(a.calls) != 0 {
		t.Errorf("new disk: write or discard missing (calls old %v new %v)", a.calls, b.calls)
	}
}

func TestDiskRefRefusesASwapToADifferentKindOfDisk(t *testing.T) {
	a := &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}
	ref := NewDiskRef(a)
	for name, d := range map[string]Disk{
		"no discard":        newMemDisk(testDiskSize, 512),
		"4K logical sector": &trimDisk{memDisk: newMemDisk(testDiskSize, 4096)},
	} {
		if _, err := ref.Swap(d); !errors.Is(err, ErrSwapMismatch) {
			t.Errorf("%s: Swap = %v, want ErrSwapMismatch", name, err)
		}
		if ref.Load() != Disk(a) {
			t.Errorf("%s: refused swap changed the disk", name)
		}
	}
}

func TestDiskRefTellsOnSwapWhichDiskEachSuccessfulSwapRetired(t *testing.T) {
	a := &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}
	b := &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}
	ref := NewDiskRef(a)
	var retired []Disk
	ref.OnSwap(func(old Disk) { retired = append(retired, old) })
	if _, err := ref.Swap(newMemDisk(testDiskSize, 512)); err == nil {
		t.Fatal("a swap to a disk without Discard succeeded")
	}
	if _, err := ref.Swap(b); err != nil {
		t.Fatal(err)
	}
	if _, err := ref.Swap(a); err != nil {
		t.Fatal(err)
	}
	if len(retired) != 2 || retired[0] != Disk(a) || retired[1] != Disk(b) {
		t.Errorf("OnSwap saw %v, want a then b (the refused swap retires nothing)", retired)
	}
}

// BenchmarkHandleRead4KThroughDiskRef is BenchmarkHandleRead4K with the
// disk behind a DiskRef, as serve runs it.
func BenchmarkHandleRead4KThroughDiskRef(b *testing.B) {
	h := NewHandler(NewDiskRef(newMemDisk(1<<20, 512)), Options{})
	readable := [][]byte{hdr(TypeIn, 64)}
	writable := [][]byte{make([]byte, 4096), make([]byte, 1)}
	b.ReportAllocs()
	b.SetBytes(4096)
	for b.Loop() {
		if h.Handle(readable, writable) != 4097 {
			b.Fatal(h.Err())
		}
	}
}
