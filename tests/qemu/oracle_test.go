package qemu_test

// External VHDX readers the host-side checks compare against: libvhdi
// (Debian python3-libvhdi, through scripts/libvhdi-read.py) and 7-Zip
// (Debian 7zip). setup.sh installs both; with the QEMU tests enabled a
// missing one fails the test.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// libvhdiPython finds a python3 that imports pyvhdi: Debian's
// /usr/bin/python3 first (a pyenv python3 earlier on PATH does not see
// python3-libvhdi), then python3 on PATH.
func libvhdiPython(t *testing.T) string {
	t.Helper()
	cands := []string{"/usr/bin/python3"}
	if p, err := exec.LookPath("python3"); err == nil {
		cands = append(cands, p)
	}
	var tried []string
	for _, c := range cands {
		out, err := exec.Command(c, "-c", "import pyvhdi").CombinedOutput()
		if err == nil {
			return c
		}
		tried = append(tried, fmt.Sprintf("%s: %v: %s", c, err, bytes.TrimSpace(out)))
	}
	t.Fatalf("libvhdi: no python3 imports pyvhdi (%s): run tests/qemu/setup.sh", strings.Join(tried, "; "))
	return ""
}

// toRawWith runs cmd with its stdout in the file out.
func (e *env) toRawWith(t *testing.T, out string, args ...string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	e.record(append(args, ">", out), false)
	var stderr bytes.Buffer
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = f, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, stderr.Bytes())
	}
}

// libvhdiToRaw writes the virtual disk of img, as libvhdi reads it with
// parents (nearest first) attached, into the file out.
func (e *env) libvhdiToRaw(t *testing.T, img, out string, parents ...string) {
	t.Helper()
	args := []string{libvhdiPython(t), filepath.Join(e.root, "scripts", "libvhdi-read.py")}
	for _, p := range parents {
		args = append(args, "--parent", p)
	}
	e.toRawWith(t, out, append(args, img)...)
}

// sevenZipToRaw writes the virtual disk of img, as 7-Zip reads it
// (following a differencing image's locator), into the file out.
func (e *env) sevenZipToRaw(t *testing.T, img, out string) {
	t.Helper()
	bin, err := exec.LookPath("7zz")
	if err != nil {
		t.Fatal("7-Zip (7zz) not found: run tests/qemu/setup.sh")
	}
	e.toRawWith(t, out, bin, "e", "-tvhdx", "-so", img)
}

// sameAsExpected fails unless the raw file got equals the expected disk.
func sameAsExpected(t *testing.T, who, got string, want *expected) {
	t.Helper()
	if off, err := firstDifference(got, want.path); err != nil {
		t.Fatal(err)
	} else if off >= 0 {
		t.Fatalf("%s differs from the expected contents %s at byte %d (compared %s)", who, want.path, off, got)
	}
	t.Logf("%s: identical to the expected contents", who)
}
