package vhdxtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
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
	// A short path: tests put unix sockets beside their images, and a
	// socket path has at most 107 bytes.
	dir, err := os.MkdirTemp("", "smallfs")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0755", size)); err != nil {
		os.Remove(dir)
		Missing(t, fmt.Sprintf("mount -t tmpfs -o size=%d on %s: %v", size, dir, err))
	}
	// A lazy unmount cannot fail on a file a daemon still holds open.
	t.Cleanup(func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
	})
	return dir
}

// SmallExt4 makes an ext4 file system of size bytes in a file, mounts it
// through a loop device on a fresh directory and returns the directory;
// the test's cleanup unmounts it. ext4 differs from tmpfs where it
// matters here: blocks are reserved at write(2) time (delayed
// allocation), fallocate(2) allocates extents, and metadata takes space.
// Root only, like SmallFS; missing mkfs.ext4 or loop support is Missing.
func SmallExt4(t testing.TB, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("loop-mounting a %d-byte ext4 needs root (CAP_SYS_ADMIN); run as root to test a real full file system", size)
	}
	mkfs := NeedTool(t, "mkfs.ext4")
	backing, err := os.CreateTemp("", "smallext4-*.img")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(backing.Name()) })
	err = backing.Truncate(size)
	backing.Close()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mkfs, "-q", "-F", backing.Name()).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	dir, err := os.MkdirTemp("", "smallext4")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", backing.Name(), dir).CombinedOutput(); err != nil {
		os.Remove(dir)
		Missing(t, fmt.Sprintf("mount -o loop %s: %v: %s", backing.Name(), err, out))
	}
	// A lazy unmount; the loop device is released with the last user
	// (mount -o loop sets autoclear).
	t.Cleanup(func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
	})
	return dir
}

// Fill writes a file of n bytes at path (real pages, not a hole): it holds
// space on a SmallFS until removed.
func Fill(t testing.TB, path string, n int64) {
	t.Helper()
	f, buf := createFiller(t, path)
	defer f.Close()
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := f.Write(buf[:c]); err != nil {
			t.Fatalf("fill %s: %v", path, err)
		}
		n -= c
	}
}

// FillUp writes a file at path until the file system is full and returns
// its size: the next write that needs space fails with ENOSPC until the
// file is removed.
func FillUp(t testing.TB, path string) int64 {
	t.Helper()
	f, buf := createFiller(t, path)
	defer f.Close()
	var n int64
	for size := len(buf); size >= 512; {
		c, err := f.Write(buf[:size])
		n += int64(c)
		if errors.Is(err, unix.ENOSPC) {
			size /= 2 // fill the last partial chunk too
			continue
		}
		if err != nil {
			t.Fatalf("fill %s: %v", path, err)
		}
	}
	return n
}

// createFiller creates the file at path for Fill and FillUp and returns it
// with a 64 KiB buffer of non-zero bytes to write into it (data, so that
// no file system can keep it as a hole).
func createFiller(t testing.TB, path string) (*os.File, []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	return f, buf
}
