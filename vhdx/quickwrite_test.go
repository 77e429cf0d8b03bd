package vhdx

import "testing"

// QuickWrite says yes only for a range lying wholly in blocks this file
// holds, once the session's first write has updated the header; anything
// that would allocate, fall outside the disk or be refused says no.
func TestQuickWriteOnlyForOverwritesOfAllocatedBlocks(t *testing.T) {
	im, _ := openCounting(t)
	if im.QuickWrite(0, 4*kib) {
		t.Error("quick before any write: the first write updates the header and allocates")
	}
	for _, b := range []int64{0, 1} {
		if _, err := im.WriteAt(make([]byte, 512), b*mib); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		off, n int64
		want   bool
	}{
		{"inside an allocated block", 4 * kib, 4 * kib, true},
		{"across two allocated blocks", mib - 4*kib, 8 * kib, true},
		{"into an unallocated block", 2*mib - 4*kib, 8 * kib, false},
		{"wholly unallocated", 10 * mib, 4 * kib, false},
		{"unaligned", 100, 4 * kib, false},
		{"past the end", 64 * mib, 4 * kib, false},
		{"empty", 0, 0, false},
	}
	for _, tc := range tests {
		if got := im.QuickWrite(tc.off, tc.n); got != tc.want {
			t.Errorf("%s: QuickWrite(%d, %d) = %t, want %t", tc.name, tc.off, tc.n, got, tc.want)
		}
	}
}
