package vhdx

import (
	"bytes"
	"compress/bzip2"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// memStorage is an in-memory Storage for tests and fuzzing.
type memStorage struct {
	mu    sync.Mutex
	data  []byte
	limit int64 // largest size the storage may grow to; 0: 16 GiB
}

func (m *memStorage) max() int64 {
	if m.limit > 0 {
		return m.limit
	}
	return 1 << 34
}

func newMemStorage(b []byte) *memStorage { return &memStorage{data: b} }

func (m *memStorage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 {
		return 0, os.ErrInvalid
	}
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memStorage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > m.max() {
		return 0, os.ErrInvalid
	}
	if end := off + int64(len(p)); end > int64(len(m.data)) {
		m.grow(end)
	}
	return copy(m.data[off:], p), nil
}

func (m *memStorage) grow(n int64) {
	if n <= int64(cap(m.data)) {
		m.data = m.data[:n]
		return
	}
	nd := make([]byte, n)
	copy(nd, m.data)
	m.data = nd
}

func (m *memStorage) Sync() error { return nil }
func (m *memStorage) Size() (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data)), nil
}

func (m *memStorage) Truncate(n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n < 0 || n > m.max() {
		return os.ErrInvalid
	}
	if n < int64(len(m.data)) {
		clear(m.data[n:])
		m.data = m.data[:n]
		return nil
	}
	m.grow(n)
	return nil
}

func (m *memStorage) bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data)
}

// createMem builds an image in memory with Create's defaults overridden by o.
func createMem(t testing.TB, o CreateOptions) *memStorage {
	t.Helper()
	s := newMemStorage(nil)
	if err := CreateStorage(s, o); err != nil {
		t.Fatalf("CreateStorage(%+v): %v", o, err)
	}
	return s
}

// createFile creates an image in a temp dir and returns its path.
func createFile(t testing.TB, o CreateOptions) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.vhdx")
	if err := Create(p, o); err != nil {
		t.Fatalf("Create(%+v): %v", o, err)
	}
	return p
}

// pattern returns n bytes of deterministic pseudo-random data.
func pattern(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// samplePath finds a sample image of ../shared/samples: in
// $VHOST_VHDX_SAMPLES, else in the shared/ folder beside the repository (where
// CI and developers' checkouts have it), else in /work/shared. It returns ""
// when there is none.
func samplePath(name string) string {
	var dirs []string
	if d := os.Getenv("VHOST_VHDX_SAMPLES"); d != "" {
		dirs = append(dirs, d)
	}
	// Tests run in the package directory: the repository is "..".
	dirs = append(dirs, filepath.Join("..", "..", "shared", "samples"), "/work/shared/samples")
	for _, d := range dirs {
		p := filepath.Join(d, name+".bz2")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// sample decompresses a shared sample image into a temp dir. Without the
// samples the test is skipped, unless VHOST_VHDX_REQUIRE_SAMPLES is set (make
// test sets it), when it fails.
func sample(t testing.TB, name string) string {
	t.Helper()
	src := samplePath(name)
	if src == "" {
		if os.Getenv("VHOST_VHDX_REQUIRE_SAMPLES") != "" {
			t.Fatalf("sample %s.bz2 not found (looked in $VHOST_VHDX_SAMPLES, ../shared/samples beside the repository, /work/shared/samples)", name)
		}
		t.Skipf("sample %s.bz2 not available", name)
	}
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dst := filepath.Join(t.TempDir(), name)
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, bzip2.NewReader(f)); err != nil {
		t.Fatalf("decompress %s: %v", src, err)
	}
	return dst
}

// needQEMU skips the test when qemu-img/qemu-io are not installed, unless
// VHOST_VHDX_REQUIRE_SAMPLES is set (make test), when it fails: they are
// oracles, and tests/qemu/setup.sh installs them.
func needQEMU(t testing.TB) {
	t.Helper()
	for _, b := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(b); err != nil {
			if os.Getenv("VHOST_VHDX_REQUIRE_SAMPLES") != "" {
				t.Fatalf("%s not installed (Debian: qemu-utils; tests/qemu/setup.sh installs it)", b)
			}
			t.Skipf("%s not installed", b)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func execOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
