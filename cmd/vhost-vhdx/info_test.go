package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// A serving daemon holds the image open read-write with an exclusive lock.
// info and map must still work (they open without a lock); convert must
// refuse to copy a disk that is being written.
func TestInspectionWorksWhileTheImageIsLockedByAServer(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "served.vhdx")
	mustRun(t, "create", "--size", "16M", "--block-size", "1M", path)
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()

	if info := infoJSON(t, path); info.VirtualSize != 16<<20 {
		t.Errorf("info while served: virtual size %d", info.VirtualSize)
	}
	if exts := mapJSON(t, path); len(exts) != 1 || exts[0].Data || exts[0].Length != 16<<20 {
		t.Errorf("map while served: %+v, want one 16 MiB zero extent", exts)
	}
	code, _, stderr := runCLI(t, "convert", "-O", "raw", path, filepath.Join(dir, "copy.raw"))
	if code != 1 || !strings.Contains(stderr, "in use") {
		t.Errorf("convert of a served image: status %d, stderr %q; want an in-use error", code, stderr)
	}
}

// Once the server has written, the image's log is live (log GUID set, the
// last entries still in the log). info should still describe the image.
func TestInfoWorksAfterTheServerHasWritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "served.vhdx")
	mustRun(t, "create", "--size", "16M", "--block-size", "1M", path)
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt(make([]byte, 4096), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	// The writer's log is live (LogGuid set, an active sequence present);
	// info replays it in memory and must see the allocated block.
	code, stdout, stderr := runCLI(t, "info", "--json", path)
	if code != 0 || !strings.Contains(stdout, `"virtual_size": 16777216`) || !strings.Contains(stdout, `"allocated_bytes": 1048576`) {
		t.Errorf("info after a write: status %d, stderr %q\n%s", code, stderr, stdout)
	}
}
