package vhdxtest

import (
	"os"
	"slices"
	"testing"
)

func TestFirstDiffFindsTheFirstDifferenceOrTheShorterLength(t *testing.T) {
	for _, tc := range []struct {
		a, b []byte
		want int
	}{
		{nil, nil, -1},
		{[]byte{1, 2, 3}, []byte{1, 2, 3}, -1},
		{[]byte{1, 2, 3}, []byte{1, 9, 3}, 1},
		{[]byte{1, 2, 3}, []byte{1, 2}, 2},
		{[]byte{}, []byte{0}, 0},
	} {
		if got := FirstDiff(tc.a, tc.b); got != tc.want {
			t.Errorf("FirstDiff(%v, %v) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// The sizes 7-Zip 26.02 was seen to refuse and to accept (the rows of the
// geometry oracle test).
func TestSevenZipRefusesSizesWithTheSectorSizeBitSet(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		size    uint64
		lss     uint32
		refuses bool
	}{
		{5*mib + 512, 512, true},
		{300*mib + 3584, 512, true},
		{9*mib + 4096, 4096, true},
		{5*mib + 1024, 512, false},
		{3*mib + 8192, 4096, false},
		{40*mib + 8192, 4096, false},
	} {
		if got := SevenZipRefusesSize(tc.size, tc.lss); got != tc.refuses {
			t.Errorf("SevenZipRefusesSize(%#x, %d) = %v, want %v", tc.size, tc.lss, got, tc.refuses)
		}
	}
}

func TestLibvhdiArgsNameTheParentsNearestFirstThenTheSpans(t *testing.T) {
	got := LibvhdiArgs("py", "top", []string{"mid", "base"}, []Span{{Off: 0, N: 512}, {Off: 4096, N: 8}})
	want := []string{"py", LibvhdiScript(), "--parent", "mid", "--parent", "base", "top", "0:512", "4096:8"}
	if !slices.Equal(got, want) {
		t.Fatalf("args %q, want %q", got, want)
	}
	if _, err := os.Stat(LibvhdiScript()); err != nil {
		t.Errorf("the libvhdi script: %v", err)
	}
}
