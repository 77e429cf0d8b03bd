package vhdxtest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// SmallFS mounts a tmpfs of size bytes (a multiple of 4 KiB) on a fresh
// directory and returns it; the test's cleanup unmounts it. It is how the
// out-of-space tests get a real file system that fills up: tmpfs with
// size= returns ENOSPC from write(2) and fallocate(2) as a full disk does.
// Mounting needs root (CAP_SYS_ADMIN): other users skip with the reason.
// Root whose mount fails reports it Missing: a skip, or a failure under
// RequireToolsEnv.
func SmallFS(t testing.TB, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("mounting a %d-byte tmpfs needs root (CAP_SYS_ADMIN); run as root to test a real full file system", size)
	}
	dir := filepath.Join(t.TempDir(), "smallfs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0755", size)); err != nil {
		Missing(t, fmt.Sprintf("mount -t tmpfs -o size=%d on %s: %v", size, dir, err))
	}
	// Registered after TempDir's cleanup, so it runs first (LIFO). A
	// lazy unmount cannot fail on a file a daemon still holds open.
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// Fill writes a file of n bytes at path (real pages, not a hole): it holds
// space on a SmallFS until removed.
func Fill(t testing.TB, path string, n int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := f.Write(buf[:c]); err != nil {
			t.Fatalf("fill %s: %v", path, err)
		}
		n -= c
	}
}
