package vhdx

import (
	"path/filepath"
	"testing"
)

func TestCountersCountAllocationsAndJournalCommits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.vhdx")
	if err := Create(path, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if c := im.Counters(); c != (Counters{}) {
		t.Fatalf("fresh image counters %+v", c)
	}
	buf := make([]byte, 4096)
	buf[0] = 1
	for _, off := range []int64{0, 4096, 3 << 20, 5 << 20} { // three blocks, one written twice
		if _, err := im.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	c := im.Counters()
	if c.Allocations != 3 {
		t.Errorf("allocations %d, want 3", c.Allocations)
	}
	if c.JournalCommits < 3 {
		t.Errorf("journal commits %d, want at least one per allocation", c.JournalCommits)
	}
}
