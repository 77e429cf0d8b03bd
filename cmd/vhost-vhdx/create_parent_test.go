package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreateParentMakesAChildReadingTheParent: `create --parent` takes the
// parent's geometry, the child converts to the parent's raw contents, and
// a geometry given against the parent's is refused.
func TestCreateParentMakesAChildReadingTheParent(t *testing.T) {
	dir := t.TempDir()
	raw, base, child := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "base.vhdx"), filepath.Join(dir, "snap", "child.avhdx")
	want := testRaw(t, raw, 16<<20, map[int]int{0: 4096, 3<<20 + 512: 70000})
	mustRun(t, "convert", "-O", "vhdx", "--block-size", "1M", "--logical-sector", "4096", raw, base)
	os.Mkdir(filepath.Dir(child), 0o755)
	mustRun(t, "create", "--parent", base, child)
	info := infoJSON(t, child)
	if info.Type != "differencing" || info.VirtualSize != 16<<20 || info.BlockSize != 1<<20 || info.LogicalSectorSize != 4096 {
		t.Errorf("child info %+v", info)
	}
	out := filepath.Join(dir, "flat.raw")
	if got := convertToRaw(t, child, out); !bytes.Equal(got, want) {
		t.Error("the new child does not read its parent's contents")
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"create", "--parent", base, "--size", "8M", filepath.Join(dir, "a.avhdx")}, 1, "differs from the parent's"},
		{[]string{"create", "--parent", base, "--logical-sector", "512", filepath.Join(dir, "b.avhdx")}, 1, "differs from the parent's"},
		{[]string{"create", "--parent", base, "--type", "fixed", filepath.Join(dir, "c.avhdx")}, 2, "cannot be --type fixed"},
		{[]string{"create", "--parent", filepath.Join(dir, "missing.vhdx"), filepath.Join(dir, "d.avhdx")}, 1, "missing.vhdx"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: status %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
}
