package vhdx

import "testing"

// imageWithOldBlocks is the starting point of the crash sweeps: a dynamic
// image of size bytes (block size bs) whose blocks 0 to 3 hold
// pattern(10+b, bs), closed cleanly. It returns the file's bytes and each
// block's contents.
func imageWithOldBlocks(t *testing.T, size, bs int64) ([]byte, map[int64][]byte) {
	t.Helper()
	base := newFaultStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: uint64(size), BlockSize: uint32(bs)}); err != nil {
		t.Fatal(err)
	}
	im, err := OpenStorage(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	old := map[int64][]byte{}
	for b := int64(0); b < 4; b++ {
		old[b] = pattern(10+b, int(bs))
		if _, err := im.WriteAt(old[b], b*bs); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	return base.current(), old
}

// blockReader returns a function reading block b (block size bs) of im
// whole; a failed read fails t, naming where.
func blockReader(t *testing.T, im *Image, bs int64, where string) func(b int64) []byte {
	t.Helper()
	return func(b int64) []byte {
		t.Helper()
		got := make([]byte, bs)
		if _, err := im.ReadAt(got, b*bs); err != nil {
			t.Fatalf("%s: read block %d: %v", where, b, err)
		}
		return got
	}
}

// assertOldOrNewSectors fails t unless got, what a crashed disk reads, is
// old or next (the states before and after the write in flight at the
// crash) sector by sector.
func assertOldOrNewSectors(t *testing.T, where string, got, old, next []byte) {
	t.Helper()
	// Whole-disk comparisons first: most crash points read exactly one
	// state, and the sector walk is only needed for a mix.
	if sameBytes(got, old) || sameBytes(got, next) {
		return
	}
	for sec := 0; sec < len(got); sec += 512 {
		g := got[sec : sec+512]
		if !sameBytes(g, old[sec:sec+512]) && !sameBytes(g, next[sec:sec+512]) {
			t.Fatalf("%s: sector at %#x reads neither the old nor the new data", where, sec)
		}
	}
}
