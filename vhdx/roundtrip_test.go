package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
)

// write is one write of a round-trip scenario.
type write struct {
	off  int64
	data []byte
}

// trickyWrites returns non-overlapping writes at the offsets that exercise
// block and chunk arithmetic: the first sector, a straddle of the first
// block boundary, a straddle of the first chunk boundary (where the BAT
// index skips the first sector bitmap entry), a multi-block run for small
// blocks, and the last sector.
func trickyWrites(size uint64, bs, lss uint32) []write {
	s, b := int64(lss), int64(bs)
	chunk := int64(chunkRatio(lss, bs)) * b
	var ws []write
	add := func(off, n int64) {
		if off < 0 || off+n > int64(size) {
			return
		}
		for _, w := range ws {
			if off < w.off+int64(len(w.data)) && w.off < off+n {
				return
			}
		}
		ws = append(ws, write{off, pattern(off+n, int(n))})
	}
	add(0, s)
	add(b-s, 2*s)
	if bs <= 8*mib {
		add(2*b+b/2, b+2*s) // spans three blocks
	}
	add(chunk-s, 2*s)
	add(chunk+b-s, 2*s)
	add(int64(size)-s, s)
	return ws
}

// verify reads each written range with one sector of context on each side
// and compares with the model: written bytes where written, zeros elsewhere.
func verify(t *testing.T, im *Image, ws []write) {
	t.Helper()
	lss := int64(im.LogicalSectorSize())
	for _, w := range ws {
		start := max(0, w.off-lss)
		end := min(im.Size(), w.off+int64(len(w.data))+lss)
		got := make([]byte, end-start)
		if _, err := im.ReadAt(got, start); err != nil {
			t.Fatalf("ReadAt(%#x, %d): %v", start, len(got), err)
		}
		want := make([]byte, len(got))
		for _, o := range ws {
			lo, hi := max(o.off, start), min(o.off+int64(len(o.data)), end)
			if lo < hi {
				copy(want[lo-start:], o.data[lo-o.off:hi-o.off])
			}
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("range [%#x, %#x) differs from what was written", start, end)
		}
	}
}

func TestRoundTripAcrossGeometries(t *testing.T) {
	for _, typ := range []ImageType{Dynamic, Fixed} {
		for _, lss := range []uint32{512, 4096} {
			for _, bs := range []uint32{1 * mib, 8 * mib, 32 * mib, 256 * mib} {
				// Cross at least one chunk boundary (4 GiB with 512-byte
				// sectors, 32 GiB with 4096-byte sectors).
				size := uint64(6 * gib)
				if lss == 4096 {
					size = 40 * gib
				}
				size -= uint64(lss) // a partial last block
				name := fmt.Sprintf("%v/lss%d/bs%dM", typ, lss, bs/mib)
				t.Run(name, func(t *testing.T) {
					p := createFile(t, CreateOptions{Size: size, Type: typ, BlockSize: bs, LogicalSectorSize: lss, PhysicalSectorSize: 4096})
					im, err := Open(p, OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					if im.Size() != int64(size) || im.BlockSize() != bs || im.LogicalSectorSize() != lss {
						t.Fatalf("geometry %d/%d/%d, want %d/%d/%d", im.Size(), im.BlockSize(), im.LogicalSectorSize(), size, bs, lss)
					}
					if got := im.Info().Type; got != typ {
						t.Fatalf("Info().Type = %v, want %v", got, typ)
					}
					ws := trickyWrites(size, bs, lss)
					for _, w := range ws {
						if _, err := im.WriteAt(w.data, w.off); err != nil {
							t.Fatalf("WriteAt(%#x): %v", w.off, err)
						}
					}
					verify(t, im, ws)
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
					im, err = Open(p, OpenOptions{ReadOnly: true})
					if err != nil {
						t.Fatalf("reopen: %v", err)
					}
					defer im.Close()
					verify(t, im, ws)
					if h := im.Info().LogGUID; h != [16]byte{} {
						t.Fatalf("cleanly closed image has LogGuid %v", h)
					}
				})
			}
		}
	}
}

func TestIOChecksAlignmentAndRange(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 8 * mib, BlockSize: mib, LogicalSectorSize: 4096})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, 8192)
	tests := []struct {
		name string
		p    []byte
		off  int64
		want error
	}{
		{"UnalignedOffset", buf[:4096], 512, ErrUnaligned},
		{"UnalignedLength", buf[:512], 0, ErrUnaligned},
		{"NegativeOffset", buf[:4096], -4096, ErrOutOfRange},
		{"PastEnd", buf[:4096], 8 * mib, ErrOutOfRange},
		{"StraddlesEnd", buf, 8*mib - 4096, ErrOutOfRange},
		{"HugeOffset", buf[:4096], 1<<63 - 4096, ErrOutOfRange},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := im.ReadAt(tt.p, tt.off); !errors.Is(err, tt.want) {
				t.Errorf("ReadAt: %v, want %v", err, tt.want)
			}
			if _, err := im.WriteAt(tt.p, tt.off); !errors.Is(err, tt.want) {
				t.Errorf("WriteAt: %v, want %v", err, tt.want)
			}
			if err := im.ReadVec([][]byte{tt.p}, tt.off); !errors.Is(err, tt.want) {
				t.Errorf("ReadVec: %v, want %v", err, tt.want)
			}
			if err := im.WriteVec([][]byte{tt.p}, tt.off); !errors.Is(err, tt.want) {
				t.Errorf("WriteVec: %v, want %v", err, tt.want)
			}
		})
	}
}

func TestReadOnlyImageRefusesWritesAndFlush(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 8 * mib})
	before := s.bytes()
	im, err := OpenStorage(s, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(make([]byte, 512), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAt: %v, want ErrReadOnly", err)
	}
	if err := im.WriteVec([][]byte{make([]byte, 512)}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteVec: %v, want ErrReadOnly", err)
	}
	if err := im.Flush(); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Flush: %v, want ErrReadOnly", err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, s.bytes()) {
		t.Error("read-only open modified the file")
	}
}

func TestClosedImageRefusesIO(t *testing.T) {
	im, err := OpenStorage(createMem(t, CreateOptions{Size: 8 * mib}), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := im.ReadAt(make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close: %v", err)
	}
	if _, err := im.WriteAt(make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("WriteAt after Close: %v", err)
	}
	if err := im.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
}

// TestFirstWriteUpdatesHeaderGUIDs checks §2.2.2: a session's first write
// changes FileWriteGuid and DataWriteGuid and sets a LogGuid; Close clears
// the LogGuid again; reads alone change nothing.
func TestFirstWriteUpdatesHeaderGUIDs(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 8 * mib})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	before := im.Info()
	if _, err := im.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if im.Info() != before {
		t.Fatal("a read changed the header")
	}
	if _, err := im.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	during := im.Info()
	if during.FileWriteGUID == before.FileWriteGUID || during.DataWriteGUID == before.DataWriteGUID {
		t.Error("first write did not change FileWriteGuid and DataWriteGuid")
	}
	if during.LogGUID == [16]byte{} {
		t.Error("LogGuid is zero during a write session")
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = OpenStorage(s, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	after := im.Info()
	if after.LogGUID != [16]byte{} || after.DataWriteGUID != during.DataWriteGUID {
		t.Errorf("after Close: LogGuid %v DataWriteGuid %v, want zero and %v", after.LogGUID, after.DataWriteGUID, during.DataWriteGUID)
	}
	// Both headers must hold the final state (§2.2.2.1 second update).
	b := s.bytes()
	if !bytes.Equal(b[header1Offset+hdrOffFileWrite:header1Offset+hdrOffLogOffset],
		b[header2Offset+hdrOffFileWrite:header2Offset+hdrOffLogOffset]) {
		t.Error("the two headers differ in their GUID fields after Close")
	}
}

func TestVectorIOSplitsAtBlockBoundaries(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 16 * mib, BlockSize: mib})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	data := pattern(7, 3*mib)
	// Buffers of odd sizes; only the total is sector aligned.
	var bufs [][]byte
	for rest, n := data, 1; len(rest) > 0; n = n*7 + 3 {
		k := min(len(rest), n%(700*kib)+1)
		bufs = append(bufs, rest[:k])
		rest = rest[k:]
	}
	off := int64(mib - 4096)
	if err := im.WriteVec(bufs, off); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data)+8192)
	if _, err := im.ReadAt(got, off-4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[4096:4096+len(data)], data) || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatal("WriteVec data does not read back with ReadAt")
	}
	out := make([]byte, len(got))
	var obufs [][]byte
	for rest, n := out, 5; len(rest) > 0; n = n*5 + 1 {
		k := min(len(rest), n%(900*kib)+1)
		obufs = append(obufs, rest[:k])
		rest = rest[k:]
	}
	for i := range out {
		out[i] = 0xAA // unallocated parts must be zero-filled
	}
	if err := im.ReadVec(obufs, off-4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, got) {
		t.Fatal("ReadVec differs from ReadAt")
	}
}

// TestConcurrentWritesToFreshBlocksAllocateOnce races writers on the same
// and on different unallocated blocks; every block must end up allocated
// once, with each writer's sectors intact.
func TestConcurrentWritesToFreshBlocksAllocateOnce(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 32 * mib, BlockSize: mib})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for blk := range 16 {
				off := int64(blk)*mib + int64(w)*4096
				if _, err := im.WriteAt(pattern(int64(blk*writers+w), 4096), off); err != nil {
					errs <- err
					return
				}
				if _, err := im.ReadAt(make([]byte, 4096), off); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := im.Info().AllocatedBytes; got != 16*mib {
		t.Errorf("allocated %d bytes, want %d", got, 16*mib)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for blk := range 16 {
		for w := range writers {
			got := make([]byte, 4096)
			if _, err := im.ReadAt(got, int64(blk)*mib+int64(w)*4096); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pattern(int64(blk*writers+w), 4096)) {
				t.Fatalf("block %d writer %d: data lost", blk, w)
			}
		}
	}
	if fi, _ := os.Stat(p); fi.Size() != 4*mib+16*mib {
		t.Errorf("file size %d, want %d (one block per written block)", fi.Size(), 4*mib+16*mib)
	}
}

func TestExtentsMergeRuns(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 10*mib - 512, BlockSize: mib})
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for _, blk := range []int64{1, 2, 5} {
		if _, err := im.WriteAt(make([]byte, 512), blk*mib); err != nil {
			t.Fatal(err)
		}
	}
	got, err := im.Extents()
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{
		{0, mib, 0, false, -1},
		{mib, 2 * mib, 4 * mib, true, 0},
		{3 * mib, 2 * mib, 0, false, -1},
		{5 * mib, mib, 6 * mib, true, 0},
		{6 * mib, 4*mib - 512, 0, false, -1},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Extents = %v\nwant %v", got, want)
	}
}

func TestCreateRefusesBadOptions(t *testing.T) {
	long := string(bytes.Repeat([]byte("x"), 257))
	tests := []struct {
		name string
		o    CreateOptions
	}{
		{"ZeroSize", CreateOptions{}},
		{"SizeNotSectorMultiple", CreateOptions{Size: mib + 100}},
		{"SizeNot4KMultiple", CreateOptions{Size: mib + 512, LogicalSectorSize: 4096}},
		{"SizeOver64TiB", CreateOptions{Size: 64*tib + 512}},
		{"BlockSizeNotPowerOfTwo", CreateOptions{Size: mib, BlockSize: 3 * mib}},
		{"BlockSizeTooBig", CreateOptions{Size: mib, BlockSize: 512 * mib}},
		{"LogicalSector", CreateOptions{Size: mib, LogicalSectorSize: 1024}},
		{"PhysicalSector", CreateOptions{Size: mib, PhysicalSectorSize: 1024}},
		{"LogSizeUnaligned", CreateOptions{Size: mib, LogSize: mib + 4096}},
		{"Differencing", CreateOptions{Size: mib, Type: Differencing}},
		{"CreatorTooLong", CreateOptions{Size: mib, Creator: long}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := CreateStorage(newMemStorage(nil), tt.o); !errors.Is(err, ErrInvalidArgument) {
				t.Errorf("CreateStorage: %v, want ErrInvalidArgument", err)
			}
		})
	}
	t.Run("ExistingPath", func(t *testing.T) {
		p := createFile(t, CreateOptions{Size: mib})
		if err := Create(p, CreateOptions{Size: mib}); err == nil {
			t.Error("Create overwrote an existing image")
		}
	})
}

func TestCreateRecordsOptions(t *testing.T) {
	id := [16]byte{1, 2, 3}
	s := createMem(t, CreateOptions{Size: 3 * mib, LogSize: 2 * mib, PhysicalSectorSize: 512, DiskID: id, Creator: "vhost-vhdx tést"})
	im, err := OpenStorage(s, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	info := im.Info()
	if info.LogLength != 2*mib || info.PhysicalSectorSize != 512 || info.DiskID != id ||
		info.Creator != "vhost-vhdx tést" || info.BlockSize != 8*mib || info.LogicalSectorSize != 512 {
		t.Errorf("Info = %+v", info)
	}
}

func TestDefaultBlockSizeGrowsWithDisk(t *testing.T) {
	for _, tc := range []struct {
		size uint64
		want uint32
	}{{mib, 8 * mib}, {gib, 8 * mib}, {gib + 512, 16 * mib}, {100 * gib, 32 * mib}, {64 * tib, 32 * mib}} {
		if got := defaultBlockSize(tc.size); got != tc.want {
			t.Errorf("defaultBlockSize(%d) = %d, want %d", tc.size, got, tc.want)
		}
	}
}
