package main

import (
	"encoding/json"
	"os"
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

// create --type fixed and convert to a fixed image occupy the whole disk on
// the host, as Hyper-V's fixed disks do; --preallocation falloc does the
// same for a dynamic image; info reports it.
func TestFixedImagesOccupyTheirSizeOnTheHost(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "src.raw")
	if err := writeSparse(raw, 32<<20); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"create fixed", []string{"create", "--size", "32M", "--block-size", "1M", "--type", "fixed"}},
		{"create dynamic falloc", []string{"create", "--size", "32M", "--block-size", "1M", "--preallocation", "falloc"}},
		{"convert to fixed", []string{"convert", "-O", "vhdx", "--type", "fixed", "--block-size", "1M", raw}},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".vhdx")
		mustRun(t, append(tc.args, path)...)
		out := mustRun(t, "info", "--json", path)
		var in struct {
			Host int64 `json:"host_allocated_bytes"`
		}
		if err := json.Unmarshal([]byte(out), &in); err != nil {
			t.Fatal(err)
		}
		if in.Host < 32<<20 {
			t.Errorf("%s: %d bytes allocated on the host for a 32 MiB disk", tc.name, in.Host)
		}
	}
	if code, _, stderr := runCLI(t, "create", "--size", "1M", "--preallocation", "lots", filepath.Join(dir, "x.vhdx")); code != 2 || !strings.Contains(stderr, "preallocation") {
		t.Errorf("bad --preallocation: status %d, %q", code, stderr)
	}
}

func writeSparse(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
