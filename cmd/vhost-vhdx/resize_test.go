package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// resize takes absolute and qemu-img style relative sizes, shrinks only
// with --shrink, and info reports each new size.
func TestResizeCommandAbsoluteAndRelativeSizes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "r.vhdx")
	mustRun(t, "create", "--size", "64M", "--block-size", "1M", path)
	for _, step := range []struct {
		args []string
		want uint64
	}{
		{[]string{"resize", path, "+64M"}, 128 << 20},
		{[]string{"resize", path, "1G"}, 1 << 30},
		{[]string{"resize", "--shrink", path, "-512M"}, 512 << 20},
		{[]string{"resize", path, "--shrink", "100M"}, 100 << 20},
	} {
		mustRun(t, step.args...)
		if got := infoJSON(t, path).VirtualSize; got != step.want {
			t.Fatalf("%v: virtual size %d, want %d", step.args, got, step.want)
		}
	}
	for _, bad := range [][]string{
		{"resize", path, "50M"},   // smaller without --shrink
		{"resize", path, "-200M"}, // below zero
		{"resize", path, "lots"},  // not a size
		{"resize", path},          // no size
		{"resize", path + ".missing", "1G"},
	} {
		if code, _, stderr := runCLI(t, bad...); code == 0 || stderr == "" {
			t.Errorf("%v: status %d, stderr %q; want a failure with a message", bad, code, stderr)
		} else if !strings.Contains(stderr, "resize") {
			t.Errorf("%v: message %q does not name the command", bad, stderr)
		}
	}
}
