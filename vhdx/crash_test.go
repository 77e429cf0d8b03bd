package vhdx

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// Crash tests: run a workload on a faultStorage, cut the power before every
// single state-changing operation in turn, and check what each crash mode
// (drop, keep, tear, alternate; see faultStorage) leaves behind once the log
// is replayed.

// contiguousCommit returns n data updates to consecutive sectors of the
// metadata area from sector first; the journal applies them as one write,
// which keeps the number of crash points of a large entry small.
func contiguousCommit(rng *rand.Rand, first, n int) []logUpdate {
	us := make([]logUpdate, n)
	for i := range us {
		d := make([]byte, 4096)
		rng.Read(d)
		us[i] = logUpdate{offset: tMeta + uint64(first+i)*4096, data: d}
	}
	return us
}

// journalWorkload is a run of commits whose entries cover the interesting
// placements in a 1 MiB log: the first entry at 0, a large entry right after
// it, one too large to fit after or before that one (a bridge entry first),
// and small ones after.
func journalWorkload() [][]logUpdate {
	rng := rand.New(rand.NewSource(3))
	return [][]logUpdate{
		randomCommit(rng, 3, true),
		contiguousCommit(rng, 20, 130),
		append(contiguousCommit(rng, 100, 131), randomCommit(rng, 2, true)...),
		randomCommit(rng, 2, false),
		randomCommit(rng, 1, true),
	}
}

// TestJournalCrashAtEveryBoundaryYieldsOldOrNewMetadata: whatever the crash
// point and whatever survives of the unsynced writes, replaying the log
// leaves the file outside the log exactly as after the last commit that
// returned, or as after the one in flight; never a mix of the two.
func TestJournalCrashAtEveryBoundaryYieldsOldOrNewMetadata(t *testing.T) {
	parallelSweep(t)
	work := journalWorkload()

	// Reference states and the operation count of a run without a crash.
	ref := newLogFixture()
	states := [][]byte{ref.current()}
	j := newJournal(ref, tLR)
	var bridges int
	for i, c := range work {
		before := j.seq
		if err := j.commit(c, 1<<20, tFileSize); err != nil {
			t.Fatalf("reference commit %d: %v", i, err)
		}
		bridges += int(j.seq - before - 1)
		states = append(states, ref.current())
	}
	if bridges == 0 {
		t.Fatal("workload wrote no bridge entry; it must exercise that path")
	}
	total := ref.opCount()

	base := newLogFixture().current()
	for crash := 1; crash <= total+1; crash++ {
		// The run up to the crash is the same for every mode; only what
		// survives of the pending writes differs.
		s := newFaultStorage(base)
		j := newJournal(s, tLR)
		s.crashAfter(crash)
		done := 0
		for _, c := range work {
			if err := j.commit(c, 1<<20, tFileSize); err != nil {
				if !errors.Is(err, errCrashed) {
					t.Fatalf("crash %d: commit error %v is not the crash", crash, err)
				}
				break
			}
			done++
		}
		for _, mode := range allCrashModes {
			rs := newMemStorage(s.crashImage(mode))
			if _, err := replayLog(rs, tLR); err != nil {
				t.Fatalf("crash before op %d (%s), %d commits done: replay: %v", crash, mode, done, err)
			}
			got := rs.data
			switch {
			case equalOutsideLog(got, states[done]):
			case done < len(work) && equalOutsideLog(got, states[done+1]):
			default:
				t.Fatalf("crash before op %d (%s), %d commits done: replayed image is neither state %d nor %d",
					crash, mode, done, done, done+1)
			}
		}
	}
}

// equalOutsideLog compares two images, ignoring the log region.
func equalOutsideLog(a, b []byte) bool {
	return len(a) == len(b) && sameBytes(a[:tLogOff], b[:tLogOff]) && sameBytes(a[tLogOff+tLogLen:], b[tLogOff+tLogLen:])
}

// imageWrite is one guest write in the image-level workload.
type imageWrite struct {
	off  int64
	data []byte
}

func imageWorkload() []imageWrite {
	const bs = 1 << 20
	return []imageWrite{
		{0, pattern(1, 4096)},             // allocates block 0
		{5*bs + 512, pattern(2, 8192)},    // allocates block 5, unaligned in the block
		{4096, pattern(3, 4096)},          // rewrites allocated block 0
		{63*bs - 4096, pattern(4, 12288)}, // spans blocks 62 and 63
	}
}

// runImageWorkload opens s read-write, issues the workload with a Flush
// after every write, and closes. It returns how many writes were followed
// by a successful Flush, and the first error (nil: the run completed).
func runImageWorkload(s Storage, work []imageWrite) (int, error) {
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		return 0, fmt.Errorf("open: %w", err)
	}
	durable := 0
	for _, w := range work {
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			return durable, fmt.Errorf("write at %#x: %w", w.off, err)
		}
		if err := im.Flush(); err != nil {
			return durable, fmt.Errorf("flush: %w", err)
		}
		durable++
	}
	return durable, im.Close()
}

// TestImageCrashAtEveryBoundaryKeepsFlushedWrites: a dynamic image takes
// allocating writes, each followed by Flush. After a crash before any
// operation, a read-write open (which replays the log) succeeds, every write
// whose Flush returned reads back, and QEMU agrees the image is consistent.
func TestImageCrashAtEveryBoundaryKeepsFlushedWrites(t *testing.T) {
	parallelSweep(t)
	work := imageWorkload()
	base := newFaultStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	created := base.current()

	ref := newFaultStorage(created)
	if n, err := runImageWorkload(ref, work); err != nil || n != len(work) {
		t.Fatalf("reference run: %d writes, %v", n, err)
	}
	total := ref.opCount()

	qemuChecked := false
	for crash := 1; crash <= total+1; crash++ {
		s := newFaultStorage(created)
		s.crashAfter(crash)
		durable, err := runImageWorkload(s, work)
		if err != nil && !errors.Is(err, errCrashed) {
			t.Fatalf("crash %d: workload error %v is not the crash", crash, err)
		}
		for _, mode := range allCrashModes {
			img := s.crashImage(mode)
			where := fmt.Sprintf("crash before op %d of %d (%s), %d writes flushed", crash, total, mode, durable)

			if !qemuChecked && mode == crashDrop && durable > 0 && imageHasActiveLog(t, img) {
				// The first crash that leaves a log to replay: QEMU must
				// replay our entry to the same disk contents as we do.
				compareReplayWithQEMU(t, img, where)
				qemuChecked = true
			}

			rs := newMemStorage(img)
			im, err := OpenStorage(rs, OpenOptions{})
			if err != nil {
				t.Fatalf("%s: reopen: %v", where, err)
			}
			for i, w := range work[:durable] {
				got := make([]byte, len(w.data))
				if _, err := im.ReadAt(got, w.off); err != nil {
					t.Fatalf("%s: read back write %d: %v", where, i, err)
				}
				if !sameBytes(got, w.data) {
					t.Fatalf("%s: flushed write %d at %#x lost", where, i, w.off)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatalf("%s: close after reopen: %v", where, err)
			}
			im, err = OpenStorage(rs, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("%s: read-only open after recovery: %v", where, err)
			}
			im.Close()
		}
	}
	if !qemuChecked {
		t.Error("no crash point left a log to replay; the workload does not exercise replay")
	}
}

// imageHasActiveLog reports whether img's current header names a log with
// an active sequence.
func imageHasActiveLog(t *testing.T, img []byte) bool {
	t.Helper()
	s := newMemStorage(img)
	h, _, err := readHeaders(s, nil)
	if err != nil {
		t.Fatalf("crashed image headers: %v", err)
	}
	active, err := hasActiveLog(s, logRegion{offset: h.logOffset, length: h.logLength, guid: h.logGUID})
	if err != nil {
		t.Fatalf("crashed image log: %v", err)
	}
	return active
}

// compareReplayWithQEMU replays img with QEMU (qemu-img check -r all) and
// with OpenStorage, and checks that qemu-img compare finds the two disks
// identical. This checks our entry encoding against an independent reader.
func compareReplayWithQEMU(t *testing.T, img []byte, where string) {
	t.Helper()
	vhdxtest.NeedQEMU(t)
	dir := t.TempDir()
	theirs, ours := filepath.Join(dir, "theirs.vhdx"), filepath.Join(dir, "ours.vhdx")
	if err := os.WriteFile(theirs, img, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", theirs)
	s := newFaultStorage(img)
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatalf("%s: open: %v", where, err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ours, s.current(), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-q", "-f", "vhdx", "-F", "vhdx", ours, theirs)
}
