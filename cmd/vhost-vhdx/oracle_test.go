package main

// External oracles for the command tests: libvhdi (Debian python3-libvhdi,
// through scripts/libvhdi-read.py) and 7-Zip (Debian 7zip). The vhdx
// package's tests have the streaming versions (vhdx/oracle_test.go); the
// images here are small, so whole disks are read into memory. Without the
// tools a test skips, unless VHOST_VHDX_REQUIRE_SAMPLES is set (make test),
// when it fails.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func needOracle(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...) + " (Debian: apt-get install python3-libvhdi 7zip; tests/qemu/setup.sh installs them)"
	if os.Getenv("VHOST_VHDX_REQUIRE_SAMPLES") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

var libvhdiPy struct {
	once sync.Once
	path string
	err  error
}

// libvhdiPython finds a python3 that imports pyvhdi: Debian's
// /usr/bin/python3 first (a pyenv python3 earlier on PATH does not see
// python3-libvhdi), then python3 on PATH.
func libvhdiPython() (string, error) {
	libvhdiPy.once.Do(func() {
		cands := []string{"/usr/bin/python3"}
		if p, err := exec.LookPath("python3"); err == nil {
			cands = append(cands, p)
		}
		var tried []string
		for _, c := range cands {
			out, err := exec.Command(c, "-c", "import pyvhdi").CombinedOutput()
			if err == nil {
				libvhdiPy.path = c
				return
			}
			tried = append(tried, fmt.Sprintf("%s: %v: %s", c, err, bytes.TrimSpace(out)))
		}
		libvhdiPy.err = fmt.Errorf("no python3 imports pyvhdi (%s)", strings.Join(tried, "; "))
	})
	return libvhdiPy.path, libvhdiPy.err
}

func oracleOutput(t testing.TB, cmd *exec.Cmd) []byte {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, stderr.Bytes())
	}
	return out
}

// readWithLibvhdi returns the whole virtual disk of path as libvhdi reads
// it; for a differencing image the parents are given nearest first.
func readWithLibvhdi(t testing.TB, path string, parents ...string) []byte {
	t.Helper()
	py, err := libvhdiPython()
	if err != nil {
		needOracle(t, "libvhdi: %v", err)
	}
	script, err := filepath.Abs(filepath.Join("..", "..", "scripts", "libvhdi-read.py"))
	if err != nil {
		t.Fatal(err)
	}
	args := []string{script}
	for _, p := range parents {
		args = append(args, "--parent", p)
	}
	return oracleOutput(t, exec.Command(py, append(args, path)...))
}

// readWith7zip returns the whole virtual disk of path as 7-Zip reads it
// (it follows a differencing image's parent locator by itself).
func readWith7zip(t testing.TB, path string) []byte {
	t.Helper()
	bin, err := exec.LookPath("7zz")
	if err != nil {
		needOracle(t, "7-Zip: 7zz not installed")
	}
	return oracleOutput(t, exec.Command(bin, "e", "-tvhdx", "-so", path))
}

// firstDifference is the index of the first differing byte, -1 if none.
func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// sameBytes fails the test at the first byte where got differs from want.
func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if i := firstDifference(got, want); i >= 0 {
		g, w := "EOF", "EOF"
		if i < len(got) {
			g = fmt.Sprintf("%#x", got[i])
		}
		if i < len(want) {
			w = fmt.Sprintf("%#x", want[i])
		}
		t.Fatalf("%s: byte %#x is %s, want %s (lengths %d and %d)", what, i, g, w, len(got), len(want))
	}
}
