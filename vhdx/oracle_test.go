package vhdx

// External oracles: libvhdi (Debian python3-libvhdi, through
// scripts/libvhdi-read.py) and 7-Zip (Debian 7zip, `7zz e -tvhdx -so`) read
// VHDX images with code this project did not write, so a misreading of the
// spec that our reader and writer share shows up as a difference. Without
// the tools a test skips, unless VHOST_VHDX_REQUIRE_SAMPLES is set (make
// test sets it; tests/qemu/setup.sh installs both), when it fails.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// vspan is a byte range of the virtual disk.
type vspan struct{ off, n int64 }

// needOracle fails the test when VHOST_VHDX_REQUIRE_SAMPLES is set and skips
// it otherwise.
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
	path string // a python3 that imports pyvhdi
	err  error
}

// libvhdiPython finds a python3 that can import pyvhdi: Debian's
// /usr/bin/python3 first (python3-libvhdi installs there; a python3 earlier
// on PATH, such as a pyenv one, does not see it), then python3 on PATH.
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

// libvhdiCommand returns the command that reads ranges of path (whose
// parents, nearest first, are given) through libvhdi; no vspan reads the
// whole disk.
func libvhdiCommand(t testing.TB, path string, parents []string, spans []vspan) *exec.Cmd {
	t.Helper()
	py, err := libvhdiPython()
	if err != nil {
		needOracle(t, "libvhdi: %v", err)
	}
	script, err := filepath.Abs(filepath.Join("..", "scripts", "libvhdi-read.py"))
	if err != nil {
		t.Fatal(err)
	}
	args := []string{script}
	for _, p := range parents {
		args = append(args, "--parent", p)
	}
	args = append(args, path)
	for _, s := range spans {
		args = append(args, fmt.Sprintf("%d:%d", s.off, s.n))
	}
	return exec.Command(py, args...)
}

// sevenZipCommand returns the command that writes the virtual disk of path
// to stdout through 7-Zip, which follows a differencing image's parent
// locator by itself.
func sevenZipCommand(t testing.TB, path string) *exec.Cmd {
	t.Helper()
	bin, err := exec.LookPath("7zz")
	if err != nil {
		needOracle(t, "7-Zip: 7zz not installed")
	}
	return exec.Command(bin, "e", "-tvhdx", "-so", path)
}

// streamCommand runs cmd and hands its stdout to consume; it fails the test
// when the command fails (its stderr in the message) or consume leaves
// output unread.
func streamCommand(t testing.TB, cmd *exec.Cmd, consume func(r io.Reader)) {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// A 1 MiB pipe (the unprivileged maximum) instead of 64 KiB halves
	// the time to stream a disk of zeros; without it, it is only slower.
	_, _ = unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 1<<20)
	cmd.Stdout = w
	err = cmd.Start()
	w.Close()
	if err != nil {
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	finished := false
	defer func() {
		if !finished { // consume failed the test: say what the tool said
			r.Close()
			_ = cmd.Wait()
			t.Logf("%v: stderr: %s", cmd.Args, stderr.Bytes())
		}
	}()
	consume(r)
	extra, _ := io.Copy(io.Discard, r)
	finished = true
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, stderr.Bytes())
	}
	if extra != 0 {
		t.Fatalf("%v: %d bytes more output than expected", cmd.Args, extra)
	}
}

func readAllOf(t testing.TB, cmd *exec.Cmd) []byte {
	t.Helper()
	var b []byte
	streamCommand(t, cmd, func(r io.Reader) {
		var err error
		if b, err = io.ReadAll(r); err != nil {
			t.Fatal(err)
		}
	})
	return b
}

// readWithLibvhdi returns the whole virtual disk of path as libvhdi reads it,
// with the parents (nearest first) attached for a differencing chain.
func readWithLibvhdi(t testing.TB, path string, parents ...string) []byte {
	t.Helper()
	return readAllOf(t, libvhdiCommand(t, path, parents, nil))
}

// readRangesWithLibvhdi returns each vspan as libvhdi reads it, in one run.
func readRangesWithLibvhdi(t testing.TB, path string, parents []string, spans []vspan) [][]byte {
	t.Helper()
	out := make([][]byte, len(spans))
	streamCommand(t, libvhdiCommand(t, path, parents, spans), func(r io.Reader) {
		for i, s := range spans {
			out[i] = make([]byte, s.n)
			if _, err := io.ReadFull(r, out[i]); err != nil {
				t.Fatalf("libvhdi output for %d:%d: %v", s.off, s.n, err)
			}
		}
	})
	return out
}

// libvhdiSize is the virtual size libvhdi reports for path.
func libvhdiSize(t testing.TB, path string) int64 {
	t.Helper()
	cmd := libvhdiCommand(t, path, nil, nil)
	cmd.Args = append(cmd.Args[:2], "--size", path)
	out := readAllOf(t, cmd)
	n, err := strconv.ParseInt(string(bytes.TrimSpace(out)), 10, 64)
	if err != nil {
		t.Fatalf("libvhdi --size %s: %q: %v", path, out, err)
	}
	return n
}

// readWith7zip returns the whole virtual disk of path as 7-Zip reads it.
func readWith7zip(t testing.TB, path string) []byte {
	t.Helper()
	return readAllOf(t, sevenZipCommand(t, path))
}

// equalsReader reads exactly n bytes from r and compares them with
// [off, off+n) of im, in 4 MiB pieces, failing at the first difference.
func equalsReader(t testing.TB, who string, r io.Reader, im *Image, off, n int64) {
	t.Helper()
	const piece = 4 * mib
	ours, theirs := make([]byte, piece), make([]byte, piece)
	for pos := off; pos < off+n; pos += piece {
		k := min(piece, off+n-pos)
		if _, err := im.ReadAt(ours[:k], pos); err != nil {
			t.Fatalf("ReadAt(%#x): %v", pos, err)
		}
		if _, err := io.ReadFull(r, theirs[:k]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				t.Fatalf("%s ends before virtual byte %#x (disk size %#x)", who, pos+k, off+n)
			}
			t.Fatal(err)
		}
		if i := firstDiff(ours[:k], theirs[:k]); i >= 0 {
			t.Fatalf("virtual byte %#x: we read %#x, %s reads %#x", pos+int64(i), ours[i], who, theirs[i])
		}
	}
}

// oraclesReadWhole streams the whole virtual disk from libvhdi and from
// 7-Zip and compares each byte with what im reads.
func oraclesReadWhole(t testing.TB, im *Image, path string, parents ...string) {
	t.Helper()
	libvhdiReadsWhole(t, im, path, parents...)
	sevenZipReadsWhole(t, im, path)
}

func libvhdiReadsWhole(t testing.TB, im *Image, path string, parents ...string) {
	t.Helper()
	if got := libvhdiSize(t, path); got != im.Size() {
		t.Fatalf("libvhdi reports a %d-byte disk, we %d", got, im.Size())
	}
	streamCommand(t, libvhdiCommand(t, path, parents, nil), func(r io.Reader) {
		equalsReader(t, "libvhdi", r, im, 0, im.Size())
	})
}

// sevenZipReadsWhole: 7-Zip finds the parents of a differencing image by
// itself, through the parent locator.
func sevenZipReadsWhole(t testing.TB, im *Image, path string) {
	t.Helper()
	streamCommand(t, sevenZipCommand(t, path), func(r io.Reader) {
		equalsReader(t, "7-Zip", r, im, 0, im.Size())
	})
}

// libvhdiReadsSpans compares each vspan as libvhdi reads it with im and with
// want (the model of the disk: want(off, n) returns the expected bytes).
func libvhdiReadsSpans(t testing.TB, im *Image, path string, parents []string, spans []vspan, want func(off, n int64) []byte) {
	t.Helper()
	theirs := readRangesWithLibvhdi(t, path, parents, spans)
	for i, s := range spans {
		ours := make([]byte, s.n)
		if _, err := im.ReadAt(ours, s.off); err != nil {
			t.Fatalf("ReadAt(%#x, %d): %v", s.off, s.n, err)
		}
		if j := firstDiff(ours, theirs[i]); j >= 0 {
			t.Fatalf("virtual byte %#x: we read %#x, libvhdi reads %#x", s.off+int64(j), ours[j], theirs[i][j])
		}
		if w := want(s.off, s.n); !bytes.Equal(ours, w) {
			j := firstDiff(ours, w)
			t.Fatalf("virtual byte %#x: we and libvhdi read %#x, the test wrote %#x", s.off+int64(j), ours[j], w[j])
		}
	}
}
