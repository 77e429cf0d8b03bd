package pattern

import (
	"bytes"
	"testing"
)

func TestFillDependsOnlyOnSeedAndAbsoluteOffset(t *testing.T) {
	whole := make([]byte, 4096)
	Fill(whole, 7, 1<<20)
	for _, c := range []struct{ start, end int }{{0, 1}, {3, 17}, {8, 16}, {1000, 4096}, {4095, 4096}} {
		part := make([]byte, c.end-c.start)
		Fill(part, 7, 1<<20+int64(c.start))
		if !bytes.Equal(part, whole[c.start:c.end]) {
			t.Errorf("Fill of [%d,%d) differs from the same range of a whole fill", c.start, c.end)
		}
	}
}

func TestFillDiffersBetweenSeedsAndOffsets(t *testing.T) {
	a := make([]byte, 512)
	b := make([]byte, 512)
	Fill(a, 1, 0)
	Fill(b, 2, 0)
	if bytes.Equal(a, b) {
		t.Error("seeds 1 and 2 give the same data")
	}
	Fill(b, 1, 512)
	if bytes.Equal(a, b) {
		t.Error("offsets 0 and 512 give the same data")
	}
	if bytes.Equal(a, make([]byte, 512)) {
		t.Error("pattern is all zeroes")
	}
}

func TestMismatchFindsTheFirstDifferentByte(t *testing.T) {
	buf := make([]byte, 200<<10)
	Fill(buf, 3, 4096)
	if got := Mismatch(buf, 3, 4096); got != -1 {
		t.Fatalf("Mismatch on matching data = %d, want -1", got)
	}
	buf[150<<10+5] ^= 1
	if got := Mismatch(buf, 3, 4096); got != 150<<10+5 {
		t.Fatalf("Mismatch = %d, want %d", got, 150<<10+5)
	}
	if got := Mismatch(buf, 3, 4104); got != 0 {
		t.Fatalf("Mismatch at a shifted offset = %d, want 0", got)
	}
}
