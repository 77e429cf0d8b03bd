package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// compact reports what it reclaimed and leaves a smaller file that reads
// the same; a fixed image is refused with a message.
func TestCompactCommandReportsWhatItReclaimed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.vhdx")
	mustRun(t, "create", "--size", "32M", "--block-size", "1M", path)
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	for b := int64(0); b < 8; b++ {
		buf := data
		if b == 3 {
			buf = make([]byte, 1<<20) // all zeros
		}
		if _, err := im.WriteAt(buf, b<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Discard(0, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	out := mustRun(t, "compact", path)
	if !strings.Contains(out, "1 all-zero blocks unmapped") || !strings.Contains(out, "reclaimed") {
		t.Fatalf("compact output:\n%s", out)
	}
	if got := infoJSON(t, path).AllocatedBytes; got != 5<<20 {
		t.Fatalf("allocated %d bytes after compact, want 5 MiB", got)
	}
	fixed := filepath.Join(dir, "f.vhdx")
	mustRun(t, "create", "--size", "8M", "--block-size", "1M", "--type", "fixed", fixed)
	if code, _, stderr := runCLI(t, "compact", fixed); code == 0 || !strings.Contains(stderr, "fixed") {
		t.Fatalf("compact of a fixed image: status %d, %q", code, stderr)
	}
}
