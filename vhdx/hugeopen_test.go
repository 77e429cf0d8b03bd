package vhdx

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// residentKiB is this process's resident set (VmRSS of /proc/self/status).
func residentKiB(tb testing.TB) int64 {
	tb.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		tb.Skipf("no /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return n
		}
	}
	tb.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// TestHelperOpenResident is not a test: run by openResidentKiB in a child
// process, it opens the image named by the environment and prints how much
// the resident set grew while the image is open.
func TestHelperOpenResident(t *testing.T) {
	p := os.Getenv("VHDX_TEST_OPEN_RESIDENT")
	if p == "" {
		t.Skip("helper process only")
	}
	before := residentKiB(t)
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	after := residentKiB(t)
	im.Close()
	fmt.Printf("resident-growth-kib %d\n", after-before)
}

// openResidentKiB opens the image at p in a fresh process (so that the
// entries array comes from the operating system, not from heap memory an
// earlier test freed, which Go zeroes and thereby makes resident) and
// returns how many KiB the resident set grew.
func openResidentKiB(t *testing.T, p string) int64 {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperOpenResident$", "-test.count=1")
	cmd.Env = append(os.Environ(), "VHDX_TEST_OPEN_RESIDENT="+p)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(line, "resident-growth-kib "); ok {
			n, err := strconv.ParseInt(rest, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("helper printed no resident growth:\n%s", out)
	return 0
}

// TestOpenOfASparse64TiBImageStaysSmall: a fresh 64 TiB image with 1 MiB
// blocks has a 512 MiB BAT, all NOT_PRESENT and a hole of the sparse file.
// Creating it writes none of the BAT, and opening it reads none of it and
// keeps almost none of the entries array resident.
func TestOpenOfASparse64TiBImageStaysSmall(t *testing.T) {
	p := hugeImage(t, 64*tib, false)
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	in := im.Info()
	if in.HostAllocatedBytes > 16*mib {
		t.Errorf("a fresh 64 TiB image occupies %d bytes on the host; Create wrote its BAT", in.HostAllocatedBytes)
	}
	if in.AllocatedBytes != 0 || in.VirtualSize != 64*tib {
		t.Errorf("Info = %+v", in)
	}
	buf := make([]byte, 4096)
	buf[0] = 1
	if _, err := im.ReadAt(buf, 64*tib-4096); err != nil || buf[0] != 0 {
		t.Errorf("last sector: %v, first byte %d", err, buf[0])
	}
	im.Close()

	const batKiB = 512 * 1024
	if grew := openResidentKiB(t, p); grew > 48*1024 {
		t.Errorf("opening grew the resident set by %d KiB; the BAT is %d KiB and all zero", grew, batKiB)
	}
}

// TestOpenOfAZeroStateBATStaysSmall: qemu-img writes a fresh image's BAT
// out with every payload entry in state ZERO. Those entries must read as
// ZERO (not NOT_PRESENT), but a page of them is held implicitly
// (battable.go), so opening does not make a table of the BAT's size
// resident.
func TestOpenOfAZeroStateBATStaysSmall(t *testing.T) {
	p := hugeImage(t, 16*tib, true)
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if e := im.bat.load(12345); e != stateZero {
		t.Errorf("entry 12345 = %#x, want state ZERO kept", e)
	}
	if e := im.bat.load(im.l.chunkRatio); e != 0 {
		t.Errorf("sector bitmap entry %d = %#x, want 0", im.l.chunkRatio, e)
	}
	im.Close()
	if raceEnabled {
		t.Skip("resident size checked without -race only: the race detector shadows what the open writes")
	}
	const batKiB = 128 * 1024
	if grew := openResidentKiB(t, p); grew > 16*1024 {
		t.Errorf("opening grew the resident set by %d KiB; the BAT is %d KiB, all of it in state ZERO", grew, batKiB)
	}
}

func TestOpenAllocationsDoNotGrowWithTheBAT(t *testing.T) {
	allocs := func(size uint64, zeroState bool) float64 {
		p := hugeImage(t, size, zeroState)
		return testing.AllocsPerRun(2, func() {
			im, err := Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			im.Close()
		})
	}
	for _, zeroState := range []bool{false, true} {
		small, big := allocs(1*tib, zeroState), allocs(16*tib, zeroState)
		// A few from the runtime, more under -race on a loaded machine (10
		// seen); per entry would be millions, per 1 MiB of BAT hundreds.
		if big > small+32 {
			t.Errorf("zero state %v: open of 1 TiB made %.0f allocations, of 16 TiB %.0f", zeroState, small, big)
		}
	}
}

// noHoles hides the storage's SEEK_DATA: every BAT chunk is read.
type noHoles struct{ Storage }

// TestSkippingBATHolesLoadsTheSameEntries: an image with blocks scattered
// over its BAT (some BAT pages written, the rest holes) loads the same
// entries whether holes are skipped or read.
func TestSkippingBATHolesLoadsTheSameEntries(t *testing.T) {
	for _, zeroState := range []bool{false, true} {
		t.Run(fmt.Sprintf("zeroState=%v", zeroState), func(t *testing.T) {
			p := hugeImage(t, 256*gib, zeroState)
			im, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, off := range []int64{0, 3 * mib, 70 * gib, 255*gib + 5*mib} {
				if _, err := im.WriteAt(pattern(off, 4096), off); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			skip, err := Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer skip.Close()
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			read, err := OpenStorage(noHoles{osStorage{f}}, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer read.Close()
			if skip.bat.len() != read.bat.len() {
				t.Fatalf("%d entries against %d", skip.bat.len(), read.bat.len())
			}
			for i := range skip.bat.len() {
				if a, b := skip.bat.load(i), read.bat.load(i); a != b {
					t.Fatalf("entry %d: %#x skipping holes, %#x reading them", i, a, b)
				}
			}
			if a, b := skip.allocated.Load(), read.allocated.Load(); a != 4 || b != 4 {
				t.Errorf("allocated blocks %d and %d, want 4", a, b)
			}
		})
	}
}

// TestCheckFindsOverlapsInAFileFarLargerThanItsBAT: a file more than 64
// times larger than what its BAT maps (sparse, crafted) would make the
// bitmap of file MiBs larger than the BAT, so overlaps are found by sorting
// instead; the same rules are still enforced and named.
func TestCheckFindsOverlapsInAFileFarLargerThanItsBAT(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 1 * gib, BlockSize: mib})
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const fileSize = 15 * tib
	if err := f.Truncate(fileSize); err != nil {
		f.Close()
		t.Skipf("cannot make a %d-byte sparse file here: %v", int64(fileSize), err)
	}
	im, err := openFileWith(p, OpenOptions{ReadOnly: true, NoLock: true}, openMetadata)
	if err != nil {
		t.Fatal(err)
	}
	l := im.l
	im.Close()
	if words := (uint64(fileSize)/mib + 63) / 64; words*8 <= l.batEntries*8+1*mib {
		t.Fatalf("the file is too small to take the sorting path (%d bitmap words)", words)
	}
	put := func(i, e uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], e)
		if _, err := f.WriteAt(b[:], int64(l.bat.offset+i*8)); err != nil {
			t.Fatal(err)
		}
	}
	shared := uint64(fileSize - 10*mib)
	put(1, makeBATEntry(stateFullyPresent, shared))
	put(2, makeBATEntry(stateFullyPresent, 100*mib))
	put(5, makeBATEntry(stateFullyPresent, shared))
	put(7, makeBATEntry(stateFullyPresent, l.meta.offset))
	f.Close()

	rep, err := Check(p, false)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, pr := range rep.Problems {
		if !pr.Leak {
			got = append(got, pr.What)
		}
	}
	want := []string{
		fmt.Sprintf("BAT entry 7 at offset %#x: block [%#x, %#x) overlaps metadata region", l.bat.offset+7*8, l.meta.offset, l.meta.offset+mib),
		fmt.Sprintf("BAT entry 5 at offset %#x: block [%#x, %#x) overlaps payload block of BAT entry 1 [%#x, %#x)", l.bat.offset+5*8, shared, shared+mib, shared, shared+mib),
	}
	if len(got) != len(want) {
		t.Fatalf("problems %q, want %d", got, len(want))
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) {
			t.Errorf("problem %d = %q, want it to contain %q", i, got[i], want[i])
		}
	}
	if _, err := Open(p, OpenOptions{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "overlaps") {
		t.Errorf("Open = %v, want the overlap refused", err)
	}
}

// TestCheckListsAtMostMaxProblemsAndCountsTheRest: a BAT broken in every
// entry yields maxProblems messages and one counting the others, not one
// message per entry.
func TestCheckListsAtMostMaxProblemsAndCountsTheRest(t *testing.T) {
	p := createFile(t, CreateOptions{Size: 4 * gib, BlockSize: mib})
	fillBAT(t, p, func(i, cr uint64) uint64 {
		if isBitmapIndex(i, cr) {
			return 0
		}
		return stateReserved4
	})
	rep, err := Check(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Damaged() {
		t.Fatal("a BAT of reserved states is not reported damaged")
	}
	if len(rep.Problems) != maxProblems+1 {
		t.Fatalf("%d problems listed, want %d", len(rep.Problems), maxProblems+1)
	}
	last := rep.Problems[maxProblems].What
	if want := fmt.Sprintf("%d more problems not listed", 4096-maxProblems); !strings.Contains(last, want) {
		t.Errorf("last problem %q, want it to contain %q", last, want)
	}
}

// TestScanningAnEmptyLogAllocatesNothingPerSector: looking for the active
// sequence in a log whose sectors hold no entry costs no allocation per
// sector (it used to format an error for each).
func TestScanningAnEmptyLogAllocatesNothingPerSector(t *testing.T) {
	s := newLogFixture()
	sc, err := newLogScan(s, tLR)
	if err != nil {
		t.Fatal(err)
	}
	n := testing.AllocsPerRun(5, func() {
		tail, head, err := sc.findActive()
		if err != nil || tail != nil || head != nil {
			t.Fatalf("findActive on an empty log = %v, %v, %v", tail, head, err)
		}
	})
	if n > 0 {
		t.Errorf("scanning %d empty log sectors made %.0f allocations", tLogLen/logSectorSize, n)
	}
}

// FuzzLoadBATInPlaceMatchesDecoding: whatever the first BAT entries hold,
// reading the BAT in place into the entries array gives the same entries,
// the same verdict (the same error when opening, the same problems when
// checking) and the same accounting as decoding it entry by entry.
func FuzzLoadBATInPlaceMatchesDecoding(f *testing.F) {
	le := binary.LittleEndian
	seed := func(es ...uint64) []byte {
		b := make([]byte, 8*len(es))
		for i, e := range es {
			le.PutUint64(b[8*i:], e)
		}
		return b
	}
	f.Add(seed(makeBATEntry(stateFullyPresent, 4*mib), stateZero, 0, makeBATEntry(stateFullyPresent, 4*mib)))
	f.Add(seed(stateZero, stateZero, stateZero, stateZero, stateZero, stateZero, stateZero, stateZero, 4, stateZero))
	f.Add(seed(makeBATEntry(stateUnmapped, 5*mib), makeBATEntry(stateFullyPresent, 3*mib), 1<<12|stateFullyPresent, 7))
	img := createMem(f, CreateOptions{Size: 4 * gib, BlockSize: mib}).bytes()
	ms := newMemStorage(img)
	im, err := openMetadata(ms, OpenOptions{ReadOnly: true}, nil)
	if err != nil {
		f.Fatal(err)
	}
	l := im.l
	l.fileSize = 16 * mib // blocks may lie up to here
	f.Fuzz(func(t *testing.T, bat []byte) {
		b := make([]byte, int(l.fileSize))
		copy(b, img)
		copy(b[l.bat.offset:l.bat.offset+uint64(l.bat.length)], bat)
		s := newMemStorage(b)
		load := func(inPlace, collect bool) (*batResult, []Problem, error) {
			defer func(v bool) { batInPlace = v }(batInPlace)
			batInPlace = inPlace
			ll := l
			var c *checker
			if collect {
				c = &checker{collect: true}
			}
			res, err := loadBAT(s, &ll, c)
			if c != nil {
				return res, c.listProblems(), err
			}
			return res, nil, err
		}
		for _, collect := range []bool{false, true} {
			a, ap, aerr := load(true, collect)
			d, dp, derr := load(false, collect)
			if fmt.Sprint(aerr) != fmt.Sprint(derr) || fmt.Sprint(ap) != fmt.Sprint(dp) {
				t.Fatalf("collect %v: in place %v %v, decoded %v %v", collect, aerr, ap, derr, dp)
			}
			if aerr != nil {
				continue
			}
			if a.allocated != d.allocated || a.usedEnd != d.usedEnd {
				t.Fatalf("collect %v: allocated/usedEnd %d/%#x in place, %d/%#x decoded", collect, a.allocated, a.usedEnd, d.allocated, d.usedEnd)
			}
			for i := range a.entries.len() {
				if x, y := a.entries.load(i), d.entries.load(i); x != y {
					t.Fatalf("collect %v: entry %d: %#x in place, %#x decoded", collect, i, x, y)
				}
				// Opened without a refusal, every entry is the file's.
				want := uint64(0)
				if i < l.batOnDisk {
					want = binary.LittleEndian.Uint64(b[l.bat.offset+i*8:])
				}
				if x := a.entries.load(i); !collect && x != want {
					t.Fatalf("entry %d: %#x in the table, %#x in the file", i, x, want)
				}
			}
		}
	})
}

// readLog records the offsets and lengths read from a storage.
type readLog struct {
	Storage
	reads [][2]int64
}

func (r *readLog) ReadAt(p []byte, off int64) (int, error) {
	r.reads = append(r.reads, [2]int64{off, int64(len(p))})
	return r.Storage.ReadAt(p, off)
}

// TestOpenOfADifferencingImageReadsNoSectorBitmap: sector bitmaps are read
// when a read needs them (bitmap.go), never by open.
func TestOpenOfADifferencingImageReadsNoSectorBitmap(t *testing.T) {
	_, b := diffChild(t)
	sb := int64(batFileOffset(diffEntry(b, diffSB0)))
	if batState(diffEntry(b, diffSB0)) != stateFullyPresent || sb == 0 {
		t.Fatal("the fixture has no sector bitmap block")
	}
	rl := &readLog{Storage: newMemStorage(b)}
	im, err := openStorage(rl, OpenOptions{ReadOnly: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for _, r := range rl.reads {
		if r[0] < sb+mib && sb < r[0]+r[1] {
			t.Errorf("open read [%#x, +%#x), inside the sector bitmap block at %#x", r[0], r[1], sb)
		}
	}
}
