// Package vhdxtest runs the external VHDX readers the tests compare against:
// libvhdi (Debian python3-libvhdi, through scripts/libvhdi-read.py) and 7-Zip
// (Debian 7zip, `7zz e -tvhdx -so`), and checks that QEMU's tools are
// present. Readers this project did not write show up a misreading of the
// spec that our reader and writer share.
//
// It is for tests only: the vhdx package's own tests, the command's tests
// and tests/qemu import it; no non-test code may. It does not import vhdx,
// so vhdx's internal tests can use it without an import cycle.
//
// A missing tool skips the test, or fails it when VHOST_VHDX_REQUIRE_TOOLS
// is set (make test sets it; tests/qemu/setup.sh installs the tools), so a
// broken setup cannot pass by skipping the comparisons.
package vhdxtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireToolsEnv is the environment variable that turns a missing tool
// from a skip into a failure.
const RequireToolsEnv = "VHOST_VHDX_REQUIRE_TOOLS"

const installHint = "tests/qemu/setup.sh installs the test tools; Debian packages python3-libvhdi, 7zip, qemu-utils, cpio"

// Missing skips the test with msg, or fails it when RequireToolsEnv is set.
func Missing(t testing.TB, msg string) {
	t.Helper()
	msg += " (" + installHint + ")"
	if os.Getenv(RequireToolsEnv) != "" {
		t.Fatalf("%s; %s is set", msg, RequireToolsEnv)
	}
	t.Skip(msg)
}

// NeedTool returns the path of the program name on PATH, or reports it
// Missing.
func NeedTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name+" not installed")
	}
	return p
}

// NeedQEMU reports Missing unless both qemu-img and qemu-io are installed.
func NeedQEMU(t testing.TB) {
	t.Helper()
	NeedTool(t, "qemu-img")
	NeedTool(t, "qemu-io")
}

var libvhdiPy struct {
	once sync.Once
	path string // a python3 that imports pyvhdi
	err  error
}

// LibvhdiPython finds a python3 that imports pyvhdi: Debian's
// /usr/bin/python3 first (python3-libvhdi installs there; a python3 earlier
// on PATH, such as a pyenv one, does not see it), then python3 on PATH.
func LibvhdiPython() (string, error) {
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

// LibvhdiScript is the path of scripts/libvhdi-read.py in this source tree.
func LibvhdiScript() string {
	_, file, _, _ := runtime.Caller(0) // .../vhdx/vhdxtest/oracle.go
	return filepath.Join(filepath.Dir(file), "..", "..", "scripts", "libvhdi-read.py")
}

// SevenZip finds 7-Zip's 7zz on PATH.
func SevenZip() (string, error) { return exec.LookPath("7zz") }

// Span is a byte range of the virtual disk.
type Span struct{ Off, N int64 }

// LibvhdiArgs is the command line (python3 first) that has libvhdi write
// the spans of path's virtual disk to stdout, one after the other; no span
// means the whole disk. parents are path's parents, nearest first.
func LibvhdiArgs(python, path string, parents []string, spans []Span) []string {
	args := []string{python, LibvhdiScript()}
	for _, p := range parents {
		args = append(args, "--parent", p)
	}
	args = append(args, path)
	for _, s := range spans {
		args = append(args, fmt.Sprintf("%d:%d", s.Off, s.N))
	}
	return args
}

// LibvhdiCommand is the command of LibvhdiArgs; without libvhdi the test
// is reported Missing.
func LibvhdiCommand(t testing.TB, path string, parents []string, spans []Span) *exec.Cmd {
	t.Helper()
	py, err := LibvhdiPython()
	if err != nil {
		Missing(t, fmt.Sprintf("libvhdi: %v", err))
	}
	args := LibvhdiArgs(py, path, parents, spans)
	return exec.Command(args[0], args[1:]...)
}

// SevenZipCommand is the command that writes the virtual disk of path to
// stdout through 7-Zip, which follows a differencing image's parent
// locator by itself; without 7-Zip the test is reported Missing.
func SevenZipCommand(t testing.TB, path string) *exec.Cmd {
	t.Helper()
	bin, err := SevenZip()
	if err != nil {
		Missing(t, "7-Zip: 7zz not installed")
	}
	return exec.Command(bin, "e", "-tvhdx", "-so", path)
}

// SevenZipRefusesSize: 7-Zip (checked with 26.02) refuses to open a VHDX
// whose VirtualDiskSize has the bit of value LogicalSectorSize set (it
// tests size & LogicalSectorSize where MS-VHDX §2.6.2.2 asks for a multiple
// of it), whoever wrote the image: qemu-img's 5 MiB + 512 bytes image is
// refused too. Such sizes are valid; 7-Zip is not asked about them.
func SevenZipRefusesSize(size uint64, lss uint32) bool { return size&uint64(lss) != 0 }

// Stream runs cmd and hands its stdout to consume; it fails the test when
// the command fails (its stderr in the message) or consume leaves output
// unread.
func Stream(t testing.TB, cmd *exec.Cmd, consume func(r io.Reader)) {
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

// ReadAll runs cmd and returns its whole stdout.
func ReadAll(t testing.TB, cmd *exec.Cmd) []byte {
	t.Helper()
	var b []byte
	Stream(t, cmd, func(r io.Reader) {
		var err error
		if b, err = io.ReadAll(r); err != nil {
			t.Fatal(err)
		}
	})
	return b
}

// ReadWithLibvhdi returns the whole virtual disk of path as libvhdi reads
// it, with the parents (nearest first) attached for a differencing chain.
func ReadWithLibvhdi(t testing.TB, path string, parents ...string) []byte {
	t.Helper()
	return ReadAll(t, LibvhdiCommand(t, path, parents, nil))
}

// ReadSpansWithLibvhdi returns each span as libvhdi reads it, in one run.
func ReadSpansWithLibvhdi(t testing.TB, path string, parents []string, spans []Span) [][]byte {
	t.Helper()
	out := make([][]byte, len(spans))
	Stream(t, LibvhdiCommand(t, path, parents, spans), func(r io.Reader) {
		for i, s := range spans {
			out[i] = make([]byte, s.N)
			if _, err := io.ReadFull(r, out[i]); err != nil {
				t.Fatalf("libvhdi output for %d:%d: %v", s.Off, s.N, err)
			}
		}
	})
	return out
}

// LibvhdiSize is the virtual (media) size libvhdi reports for path.
func LibvhdiSize(t testing.TB, path string) int64 {
	t.Helper()
	return libvhdiNumber(t, "--size", path)
}

// LibvhdiSectorSize is the logical sector size libvhdi reports for path.
func LibvhdiSectorSize(t testing.TB, path string) int64 {
	t.Helper()
	return libvhdiNumber(t, "--sector-size", path)
}

func libvhdiNumber(t testing.TB, flag, path string) int64 {
	t.Helper()
	cmd := LibvhdiCommand(t, path, nil, nil)
	cmd.Args = append(cmd.Args[:2], flag, path)
	out := ReadAll(t, cmd)
	n, err := strconv.ParseInt(string(bytes.TrimSpace(out)), 10, 64)
	if err != nil {
		t.Fatalf("libvhdi %s %s: %q: %v", flag, path, out, err)
	}
	return n
}

// ReadWith7zip returns the whole virtual disk of path as 7-Zip reads it.
func ReadWith7zip(t testing.TB, path string) []byte {
	t.Helper()
	return ReadAll(t, SevenZipCommand(t, path))
}

// FirstDiff is the index of the first byte where a and b differ, the
// shorter length when one is a prefix of the other, -1 when they are equal.
func FirstDiff(a, b []byte) int {
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

// StreamEquals reads exactly n bytes from theirs (what the reader named
// who produced) and compares them with [off, off+n) of ours, in 4 MiB
// pieces, failing at the first difference. weDid says how ours came to be
// ("read" or "wrote") in the message.
func StreamEquals(t testing.TB, who string, theirs io.Reader, ours io.ReaderAt, weDid string, off, n int64) {
	t.Helper()
	const piece = 4 << 20
	a, b := make([]byte, piece), make([]byte, piece)
	for pos := off; pos < off+n; pos += piece {
		k := min(piece, off+n-pos)
		if m, err := ours.ReadAt(a[:k], pos); err != nil && !(err == io.EOF && int64(m) == k) {
			t.Fatalf("ReadAt(%#x): %v", pos, err)
		}
		if _, err := io.ReadFull(theirs, b[:k]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				t.Fatalf("%s ends before virtual byte %#x (disk size %#x)", who, pos+k, off+n)
			}
			t.Fatal(err)
		}
		if i := FirstDiff(a[:k], b[:k]); i >= 0 {
			t.Fatalf("virtual byte %#x: we %s %#x, %s reads %#x", pos+int64(i), weDid, a[i], who, b[i])
		}
	}
}

// SevenZipEquals streams the whole virtual disk of path through 7-Zip and
// compares it with the first size bytes of ours (see StreamEquals); 7-Zip
// must stream exactly size bytes.
func SevenZipEquals(t testing.TB, path string, ours io.ReaderAt, weDid string, size int64) {
	t.Helper()
	Stream(t, SevenZipCommand(t, path), func(r io.Reader) {
		StreamEquals(t, "7-Zip", r, ours, weDid, 0, size)
	})
}
