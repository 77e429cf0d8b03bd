package vhdx

import (
	"path/filepath"
	"reflect"
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

// TestCountersAddSumsEveryField guards Add against a counter added to the
// struct but not to the sum (a daemon's totals across checkpoints would
// silently drop it).
func TestCountersAddSumsEveryField(t *testing.T) {
	var a, b Counters
	va, vb := reflect.ValueOf(&a).Elem(), reflect.ValueOf(&b).Elem()
	for i := 0; i < va.NumField(); i++ {
		va.Field(i).SetUint(uint64(i + 1))
		vb.Field(i).SetUint(uint64(100 * (i + 1)))
	}
	sum := reflect.ValueOf(a.Add(b))
	for i := 0; i < sum.NumField(); i++ {
		if got, want := sum.Field(i).Uint(), uint64(101*(i+1)); got != want {
			t.Errorf("Add: %s = %d, want %d", sum.Type().Field(i).Name, got, want)
		}
	}
}
