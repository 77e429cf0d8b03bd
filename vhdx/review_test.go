package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

// sparseTail makes a Storage look like a larger sparse file: Size reports
// size and reads past the backing data return zeros, as a file extended by
// truncate(2) would. A hostile image can be such a file at no disk cost.
type sparseTail struct {
	Storage
	size int64
}

func (s sparseTail) Size() (int64, error) { return s.size, nil }

func (s sparseTail) ReadAt(p []byte, off int64) (int, error) {
	n, err := s.Storage.ReadAt(p, off)
	if n < len(p) && off >= 0 && off+int64(len(p)) <= s.size {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// TestInMemoryReplayOfLargeZeroDescriptorKeepsOverlaySmall: a zero
// descriptor may cover the whole (sparse) file. Replaying it in memory, as
// every read-write open of a dirty image does first and as read-only opens
// with ReplayLogInMemory do, must not keep one overlay record per 64 KiB of
// the range: that is memory proportional to the apparent file size, e.g.
// tens of GiB for a 64 TiB sparse file.
func TestInMemoryReplayOfLargeZeroDescriptorKeepsOverlaySmall(t *testing.T) {
	const size = 1 << 30 // apparent file size
	tests := []struct {
		name    string
		off     uint64
		zeroLen uint64
	}{
		{"InsideTheFile", tMeta, size - tMeta},
		{"CrossingTheEnd", tMeta, size},
		{"TwoDescriptorsEachWholeFile", tMeta, size - tMeta},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := newLogFixture()
			descs := []tDesc{{zero: true, off: tt.off, zeroLen: tt.zeroLen}}
			if tt.name == "TwoDescriptorsEachWholeFile" {
				descs = append(descs, descs[0])
			}
			putTestEntry(t, base, 0, encodeTestEntry(tEntry{seq: 1, descs: descs}))
			ov, err := newOverlayStorage(sparseTail{base, size})
			if err != nil {
				t.Fatal(err)
			}
			if ok, err := replayLog(ov, tLR); err != nil || !ok {
				t.Fatalf("replayLog = %v, %v", ok, err)
			}
			if n := len(ov.writes); n > 2*len(descs) {
				t.Errorf("overlay holds %d records for %d zero descriptors", n, len(descs))
			}
			end := int64(tt.off + tt.zeroLen)
			if got, _ := ov.Size(); got != max(end, size) {
				t.Errorf("size %#x, want %#x", got, max(end, size))
			}
			// The zeroed range reads as zeros.
			got := make([]byte, 8192)
			for _, at := range []int64{int64(tt.off), end - 8192, size/2 + 4096} {
				for i := range got {
					got[i] = 0xAA
				}
				if _, err := ov.ReadAt(got, at); err != nil {
					t.Fatalf("read at %#x: %v", at, err)
				}
				if !bytes.Equal(got, make([]byte, len(got))) {
					t.Errorf("range at %#x is not zero after replay", at)
				}
			}
		})
	}
}

// TestCheckRepairKeepsSpaceOfBlocksThatRetainTheirOffset: §2.5.1.1 lets an
// UNDEFINED or UNMAPPED entry keep its FileOffsetMB ("leave the field
// unmodified"), and a nonzero FileOffsetMB must stay unique across the BAT
// (§2.5.1). Hyper-V leaves trimmed blocks so. That space is not leaked:
// Check --repair must not cut it off, and a later allocation must not place
// a new block at the same offset.
func TestCheckRepairKeepsSpaceOfBlocksThatRetainTheirOffset(t *testing.T) {
	for _, st := range []uint64{stateUndefined, stateUnmapped, stateUnmappedV095} {
		t.Run(fmt.Sprintf("State%d", st), func(t *testing.T) {
			p := createFile(t, CreateOptions{Size: 16 * mib, BlockSize: mib})
			im, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, off := range []int64{0, mib} { // blocks at 4 MiB and 5 MiB
				if _, err := im.WriteAt(pattern(off, 4096), off); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			// Trim block 1 the Hyper-V way: new state, offset kept.
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			e := binary.LittleEndian.Uint64(batEntryAt(b, 1))
			if batState(e) != stateFullyPresent || batFileOffset(e) != 5*mib {
				t.Fatalf("BAT entry 1 = %#x, want block at 5 MiB", e)
			}
			binary.LittleEndian.PutUint64(batEntryAt(b, 1), makeBATEntry(st, batFileOffset(e)))
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}

			rep, err := Check(p, true)
			if err != nil || rep.Damaged() {
				t.Fatalf("Check --repair: %v %+v", err, rep)
			}
			if rep.LeakedBytes != 0 {
				t.Errorf("Check reports %d leaked bytes; the block of BAT entry 1 still owns them", rep.LeakedBytes)
			}
			if fi, err := os.Stat(p); err != nil || fi.Size() != 6*mib {
				t.Errorf("file size after repair %v (%v), want %d", fi.Size(), err, 6*mib)
			}

			im, err = Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(9, 4096), 2*mib); err != nil {
				t.Fatal(err)
			}
			got := im.bat.load(batIndex(2, im.l.chunkRatio))
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if batFileOffset(got) == batFileOffset(e) {
				t.Errorf("new block placed at %#x, the offset BAT entry 1 still holds", batFileOffset(got))
			}
		})
	}
}

// droppingSync models Linux after a writeback error: the failed fdatasync
// reports it once, the dirty pages are marked clean (their writes never
// reach the disk), and the next fdatasync succeeds.
type droppingSync struct {
	*faultStorage
	failNext bool
}

func (d *droppingSync) Sync() error {
	if d.failNext {
		d.failNext = false
		d.faultStorage.mu.Lock()
		d.faultStorage.pending = nil
		d.faultStorage.mu.Unlock()
		return errFault
	}
	return d.faultStorage.Sync()
}

// TestFlushAfterAFailedSyncDoesNotReportLostWritesDurable: once any sync of
// the image has failed, writes completed before it may be gone although the
// next fdatasync succeeds. A later Flush returning nil would tell the guest
// they are durable; it must keep failing instead (or the writes must really
// be durable).
func TestFlushAfterAFailedSyncDoesNotReportLostWritesDurable(t *testing.T) {
	tests := []struct {
		name string
		// fail runs with the next sync armed to fail and returns its error.
		fail func(im *Image) error
	}{
		{"FailedFlush", func(im *Image) error { return im.Flush() }},
		{"FailedAllocation", func(im *Image) error {
			_, err := im.WriteAt(pattern(3, 4096), 5*mib) // fresh block: the journal syncs
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := newFaultStorage(nil)
			if err := CreateStorage(base, CreateOptions{Size: 16 * mib, BlockSize: mib}); err != nil {
				t.Fatal(err)
			}
			d := &droppingSync{faultStorage: newFaultStorage(base.current())}
			im, err := OpenStorage(d, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil { // allocates block 0
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			w := pattern(2, 4096)
			if _, err := im.WriteAt(w, 4096); err != nil { // completes, not yet durable
				t.Fatal(err)
			}
			d.failNext = true
			if err := tt.fail(im); err == nil {
				t.Fatal("the armed sync failure was not reported")
			}
			if err := im.Flush(); err != nil {
				return // the loss is reported: correct
			}
			// Flush said every completed write is durable: check it.
			rs := newMemStorage(d.crashImage(crashDrop))
			ro, err := OpenStorage(rs, OpenOptions{ReadOnly: true, ReplayLogInMemory: true})
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			got := make([]byte, len(w))
			if _, err := ro.ReadAt(got, 4096); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, w) {
				t.Error("Flush returned nil after a failed sync, but a write completed before it is lost")
			}
		})
	}
}

// failingReads fails every read touching [from, ∞) with an I/O error.
type failingReads struct {
	Storage
	from int64
}

var errReadFault = errors.New("injected read error")

func (f failingReads) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.from {
		return 0, errReadFault
	}
	return f.Storage.ReadAt(p, off)
}

// TestOverlayReadReportsBaseIOErrors: the in-memory replay overlay reads
// the base file under its recorded writes. An I/O error from the base must
// come back as an error, not as a block of zeros; only the part past the
// end of the base file (extended by the replay) reads as zeros.
func TestOverlayReadReportsBaseIOErrors(t *testing.T) {
	base := newMemStorage(bytes.Repeat([]byte{0xEE}, 2*mib))
	ov, err := newOverlayStorage(failingReads{base, mib})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ov.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		off     int64
		wantErr bool
	}{
		{"BeforeTheFault", 0, false},
		{"InsideTheFault", mib + 4096, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := make([]byte, 4096)
			_, err := ov.ReadAt(got, tt.off)
			if tt.wantErr && !errors.Is(err, errReadFault) {
				t.Errorf("ReadAt = %v, want the base's I/O error", err)
			}
			if !tt.wantErr && err != nil {
				t.Errorf("ReadAt = %v", err)
			}
		})
	}
}

// TestCloseKeepsLogForReplayAfterAFailedJournalWrite: when a journal commit
// fails on a write (not a sync), an entry may be durable but not applied.
// Close tries to recover the journal; when the file keeps failing it must
// keep LogGuid so the next open replays the log, rather than declaring the
// image clean; the image must reopen and validate.
func TestCloseKeepsLogForReplayAfterAFailedJournalWrite(t *testing.T) {
	created := createMem(t, CreateOptions{Size: 64 * mib, BlockSize: mib}).bytes()
	sawJournalFailure := false
	for extra := 1; extra <= 12; extra++ {
		s := newFaultStorage(created)
		im, err := OpenStorage(s, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
			t.Fatal(err)
		}
		s.crashAt = s.opCount() + extra                // fails this and every later operation
		_, werr := im.WriteAt(pattern(2, 4096), 8*mib) // allocates block 8
		im.mu.Lock()
		failedCommit := im.journal != nil && im.journal.err != nil
		im.mu.Unlock()
		cerr := im.Close()
		if werr == nil || !failedCommit {
			continue
		}
		sawJournalFailure = true
		if cerr == nil {
			t.Errorf("failure at op +%d: Close returned nil after a failed journal commit", extra)
		}
		re, err := OpenStorage(newMemStorage(bytes.Clone(s.cur)), OpenOptions{ReadOnly: true})
		if err == nil {
			re.Close()
			t.Errorf("failure at op +%d: the image reads as clean (LogGuid cleared) after a failed journal commit", extra)
		} else if !errors.Is(err, ErrDirtyLog) {
			t.Errorf("failure at op +%d: read-only reopen: %v, want ErrDirtyLog (log kept for replay)", extra, err)
		}
		rw, err := OpenStorage(newMemStorage(bytes.Clone(s.cur)), OpenOptions{})
		if err != nil {
			t.Fatalf("failure at op +%d: read-write reopen (replay): %v", extra, err)
		}
		got := make([]byte, 4096)
		if _, err := rw.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(1, 4096)) {
			t.Errorf("failure at op +%d: the earlier write is lost after replay (%v)", extra, err)
		}
		rw.Close()
	}
	if !sawJournalFailure {
		t.Fatal("no injected failure hit a journal commit: the test proves nothing")
	}
}

// TestZeroLengthWriteModifiesNothing: an empty write is not a modification
// (§2.2.2.1 header updates happen before the first one), so it must leave
// the file byte-for-byte as it was.
func TestZeroLengthWriteModifiesNothing(t *testing.T) {
	ms := createMem(t, CreateOptions{Size: 64 * mib, BlockSize: mib})
	before := bytes.Clone(ms.bytes())
	im, err := OpenStorage(ms, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := im.WriteAt(nil, 4096); n != 0 || err != nil {
		t.Fatalf("WriteAt(nil) = %d, %v", n, err)
	}
	if err := im.WriteVec([][]byte{{}, nil}, 8192); err != nil {
		t.Fatalf("WriteVec(empty) = %v", err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ms.bytes(), before) {
		t.Fatal("a zero-length write modified the image (headers rewritten)")
	}
}

// TestReplayingALargeZeroDescriptorPunchesAHoleInsteadOfWritingZeros: a log
// zero descriptor may cover most of a huge sparse file (a hostile image can
// claim terabytes). Applying it to the real file must not write zeros over
// the range, which would fill the disk, but punch a hole: the range reads as
// zeros and the file's allocated space shrinks rather than grows.
func TestReplayingALargeZeroDescriptorPunchesAHoleInsteadOfWritingZeros(t *testing.T) {
	const size = 2 * gib
	f, err := os.Create(t.TempDir() + "/sparse")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern(9, 4096), gib); err != nil {
		t.Fatal(err)
	}
	s := osStorage{f}
	j := newJournal(s, logRegion{offset: mib, length: uint32(mib), guid: uuid.New()})
	zero := logUpdate{offset: 4 * mib, zeroLength: size - 8*mib}
	if err := j.commit([]logUpdate{zero}, size, size); err != nil {
		t.Fatalf("commit of a zero descriptor: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := f.ReadAt(got, gib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("the zeroed range does not read as zeros")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 64*mib {
		t.Fatalf("the file now uses %d bytes of disk: zeros were written instead of a hole punched", used)
	}
}
