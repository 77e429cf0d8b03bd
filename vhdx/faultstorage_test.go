package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// faultStorage is an in-memory Storage that models what survives a power
// failure. It keeps the durable image (as of the last Sync) and the writes
// and truncates issued since; crashImage builds the image a crash would
// leave, with the pending operations dropped, kept, or torn.
//
// Operations that change state (WriteAt, Sync, Truncate) are numbered from 1.
// With crashAt = N the N-th operation and every later one fail with
// errCrashed and have no effect: the "power" went out just before operation
// N. Enumerating N over 1..ops()+1 visits every boundary between operations.
// failAt = N instead fails only operation N (an I/O error) and lets later
// ones proceed.
type faultStorage struct {
	mu      sync.Mutex
	durable []byte
	cur     []byte
	pending []faultOp
	ops     int
	crashAt int
	failAt  int
	maxSize int64
	// volatile: no durable image is tracked (crashImage is meaningless);
	// for fuzzing, where copying the image per operation would dominate.
	volatile bool
}

// faultOp is one operation not yet made durable by Sync.
type faultOp struct {
	truncate bool
	off      int64 // write offset, or the new size for a truncate
	data     []byte
}

// crashMode says what happens to the operations pending at the crash.
type crashMode int

const (
	crashDrop      crashMode = iota // every unsynced operation is lost
	crashKeep                       // every unsynced operation reached the disk
	crashTear                       // each unsynced write keeps only the first half of its 512-byte sectors
	crashAlternate                  // every other unsynced operation is lost, starting with the first
	crashLast                       // only the newest unsynced operation reached the disk
)

func (m crashMode) String() string {
	return [...]string{"drop", "keep", "tear", "alternate", "last"}[m]
}

var allCrashModes = []crashMode{crashDrop, crashKeep, crashTear, crashAlternate, crashLast}

var (
	errCrashed = errors.New("faultstorage: crashed")
	errFault   = errors.New("faultstorage: injected I/O error")
)

// faultTearSector is the unit a torn write keeps or loses.
const faultTearSector = 512

// newFaultStorage starts from img, which is durable.
func newFaultStorage(img []byte) *faultStorage {
	return &faultStorage{
		durable: cloneImage(img),
		cur:     cloneImage(img),
		maxSize: 256 << 20, // a hostile LastFileOffset must not exhaust memory
	}
}

// newVolatileStorage uses img in place (no copy) and keeps no durable
// image, with writes limited to maxSize bytes.
func newVolatileStorage(img []byte, maxSize int64) *faultStorage {
	return &faultStorage{cur: img, maxSize: maxSize, volatile: true}
}

// step counts one state-changing operation and reports whether it may run.
func (f *faultStorage) step() error {
	f.ops++
	if f.crashAt > 0 && f.ops >= f.crashAt {
		return errCrashed
	}
	if f.failAt > 0 && f.ops == f.failAt {
		return errFault
	}
	return nil
}

func (f *faultStorage) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("faultstorage: negative offset %d", off)
	}
	return readImageAt(f.cur, p, off)
}

func (f *faultStorage) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(); err != nil {
		return 0, err
	}
	if off < 0 || off > f.maxSize || int64(len(p)) > f.maxSize-off {
		return 0, fmt.Errorf("faultstorage: write [%d, +%d) beyond the %d-byte limit", off, len(p), f.maxSize)
	}
	f.cur = applyFaultOp(f.cur, faultOp{off: off, data: p})
	if !f.volatile {
		f.pending = append(f.pending, faultOp{off: off, data: bytes.Clone(p)})
	}
	return len(p), nil
}

func (f *faultStorage) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(); err != nil {
		return err
	}
	if size < 0 || size > f.maxSize {
		return fmt.Errorf("faultstorage: truncate to %d beyond the %d-byte limit", size, f.maxSize)
	}
	op := faultOp{truncate: true, off: size}
	f.cur = applyFaultOp(f.cur, op)
	if !f.volatile {
		f.pending = append(f.pending, op)
	}
	return nil
}

func (f *faultStorage) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(); err != nil {
		return err
	}
	for _, op := range f.pending { // cheaper than copying the whole image
		f.durable = applyFaultOp(f.durable, op)
	}
	f.pending = nil
	return nil
}

func (f *faultStorage) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(len(f.cur)), nil
}

// opCount is the number of state-changing operations issued so far.
func (f *faultStorage) opCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ops
}

// crashAfter arms a crash just before the n-th operation from now (n ≥ 1).
func (f *faultStorage) crashAfter(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.crashAt = f.ops + n
}

// failAfter makes the n-th operation from now fail once (n ≥ 1).
func (f *faultStorage) failAfter(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failAt = f.ops + n
}

// current returns a copy of what reads see now.
func (f *faultStorage) current() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.cur)
}

// crashImage returns the image a crash leaves now under mode.
func (f *faultStorage) crashImage(mode crashMode) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	img := cloneImage(f.durable)
	for i, op := range f.pending {
		switch mode {
		case crashDrop:
			continue
		case crashAlternate:
			if i%2 == 0 {
				continue
			}
		case crashLast:
			if i != len(f.pending)-1 {
				continue
			}
		case crashTear:
			if !op.truncate {
				keep := len(op.data) / faultTearSector / 2 * faultTearSector
				if op.off%faultTearSector != 0 || len(op.data)%faultTearSector != 0 {
					keep = 0 // an unaligned write is not atomic at all: lose it
				}
				op.data = op.data[:keep]
			}
		}
		img = applyFaultOp(img, op)
	}
	return img
}

func applyFaultOp(img []byte, op faultOp) []byte {
	if op.truncate {
		if op.off <= int64(len(img)) {
			return img[:op.off] // growImage zeroes the capacity it reuses
		}
		return growImage(img, op.off)
	}
	if len(op.data) == 0 {
		return img
	}
	if end := op.off + int64(len(op.data)); end > int64(len(img)) {
		img = growImage(img, end)
	}
	copy(img[op.off:], op.data)
	return img
}

// growImage extends img to n bytes, the new ones zero. A new array gets
// half as much again as room: an image grows a block at a time, and under
// -race every fresh array costs far more than its copy (the race
// detector's shadow of fresh memory), which made a crash sweep spend most
// of its time growing images.
func growImage(img []byte, n int64) []byte {
	if n <= int64(cap(img)) {
		old := len(img)
		img = img[:n]
		clear(img[old:]) // bytes a truncate cut off must come back as zeros
		return img
	}
	grown := make([]byte, n, n+n/2)
	copy(grown, img)
	return grown
}

// cloneImage copies img into an array with room to grow (growImage).
func cloneImage(img []byte) []byte {
	c := make([]byte, len(img), len(img)+len(img)/2)
	copy(c, img)
	return c
}

func TestFaultStorageCrashKeepsOnlyWhatTheModeAllows(t *testing.T) {
	base := make([]byte, 8192)
	a := bytes.Repeat([]byte{0xAA}, 2048) // 4 sectors of 512 bytes
	b := bytes.Repeat([]byte{0xBB}, 512)
	build := func() *faultStorage {
		f := newFaultStorage(base)
		if _, err := f.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(b, 4096); err != nil { // pending
			t.Fatal(err)
		}
		if _, err := f.WriteAt(a, 2048); err != nil { // pending
			t.Fatal(err)
		}
		return f
	}
	tests := []struct {
		mode    crashMode
		at4096  byte // first byte of the 512-byte write
		at2048  byte // first sector of the 2048-byte write
		at3584  byte // last sector of the 2048-byte write
		durable byte // synced data must always survive
	}{
		{crashDrop, 0, 0, 0, 0xAA},
		{crashKeep, 0xBB, 0xAA, 0xAA, 0xAA},
		{crashTear, 0, 0xAA, 0, 0xAA}, // one sector: half is nothing; four sectors: two kept
		{crashAlternate, 0, 0xAA, 0xAA, 0xAA},
		{crashLast, 0, 0xAA, 0xAA, 0xAA},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			img := build().crashImage(tt.mode)
			got := [4]byte{img[4096], img[2048], img[3584], img[0]}
			want := [4]byte{tt.at4096, tt.at2048, tt.at3584, tt.durable}
			if got != want {
				t.Errorf("bytes at 4096/2048/3584/0 = %x, want %x", got, want)
			}
		})
	}
}

func TestFaultStorageCrashAtStopsThatOperationAndAllLater(t *testing.T) {
	f := newFaultStorage(make([]byte, 4096))
	f.crashAfter(2)
	if _, err := f.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("operation 1: %v", err)
	}
	if err := f.Sync(); !errors.Is(err, errCrashed) {
		t.Fatalf("operation 2 (Sync) = %v, want errCrashed", err)
	}
	if _, err := f.WriteAt([]byte{2}, 1); !errors.Is(err, errCrashed) {
		t.Fatalf("operation 3 = %v, want errCrashed", err)
	}
	if img := f.crashImage(crashKeep); img[0] != 1 || img[1] != 0 {
		t.Errorf("keep image starts %x, want 01 00: only operation 1 ran", img[:2])
	}
	if img := f.crashImage(crashDrop); img[0] != 0 {
		t.Errorf("drop image starts %x, want 00: operation 1 was never synced", img[:1])
	}
}

func TestFaultStorageBytesCutByATruncateComeBackAsZeros(t *testing.T) {
	f := newFaultStorage(bytes.Repeat([]byte{0xEE}, 8192))
	if err := f.Truncate(1024); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xAB}, 6000); err != nil { // regrows past the cut
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(512); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(8192); err != nil { // regrows by truncate
		t.Fatal(err)
	}
	want := make([]byte, 8192)
	copy(want, bytes.Repeat([]byte{0xEE}, 512))
	if got := f.current(); !bytes.Equal(got, want) {
		t.Errorf("current image: %d bytes differ from the 512 kept bytes and zeros", countDiff(got, want))
	}
	synced := make([]byte, 6001)
	copy(synced, bytes.Repeat([]byte{0xEE}, 1024))
	synced[6000] = 0xAB
	if got := f.crashImage(crashDrop); !bytes.Equal(got, synced) {
		t.Errorf("crash image (drop): %d bytes differ from the synced state", countDiff(got, synced))
	}
	if got := f.crashImage(crashKeep); !bytes.Equal(got, want) {
		t.Errorf("crash image (keep): %d bytes differ from the current state", countDiff(got, want))
	}
}

// countDiff counts the positions where a and b differ, and the length
// difference.
func countDiff(a, b []byte) int {
	n := max(len(a), len(b)) - min(len(a), len(b))
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}
