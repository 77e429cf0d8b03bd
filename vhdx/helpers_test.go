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

// parallelSweep marks t as one of the package's long tests (a crash, EIO,
// no-space or every-alignment sweep: seconds to minutes each under -race;
// or an oracle test, which mostly waits for another reader's process) and
// lets it run beside the others. Go starts parallel top-level tests only
// after every sequential one has returned, and then two at a time on this
// machine's two cores; the package's tests otherwise run one after another
// and leave a core idle. A test may run in parallel only if it builds its
// own storages and images (the samples it only reads), counts nothing
// process-wide (TestOpenAllocationsDoNotGrowWithTheBAT stays sequential)
// and touches no package-level variable: the switches tests set
// (batInPlace, batPageBuiltHook, maxChainDepth) are set only by tests that
// stay sequential. What is per image or per file may be set by a parallel
// test on its own: a chain's bitmap caches (shrinkBitmapCaches), Commit's
// hooks (commitHooks, keyed by the child's path).
func parallelSweep(t *testing.T) {
	t.Helper()
	t.Parallel()
}

// sameBytes is bytes.Equal for the crash and fault sweeps' checks of what
// a reopened image reads. Under -race, bytes.Equal (string(a) == string(b))
// has both whole ranges checked by the race detector before it compares,
// which costs ten times the comparison (and as much when the first byte
// differs); the sweeps compare gigabytes that way. bytes.Compare is
// assembly the detector does not see. Only for buffers no other goroutine
// can reach: a missed race there would be a missed product bug.
func sameBytes(a, b []byte) bool { return bytes.Compare(a, b) == 0 }

func (m *memStorage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 {
		return 0, os.ErrInvalid
	}
	return readImageAt(m.data, p, off)
}

// readImageAt is ReadAt (off ≥ 0) over data, an in-memory file: what lies
// past the end is io.EOF, as a file's ReadAt reports it.
func readImageAt(data, p []byte, off int64) (int, error) {
	if off >= int64(len(data)) {
		return 0, io.EOF
	}
	n := copy(p, data[off:])
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
	// Half as much again as room: an image grows a block at a time, and
	// an exact fit copied the whole image once per block, which under
	// -race (fresh arrays cost their shadow memory) dominated many tests.
	nd := make([]byte, n, n+n/2)
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

// sampleDir holds the sample images made by other tools (QEMU's
// qemu-iotests sample_images; see its README.md for origin and licence).
// Tests run in the package directory.
const sampleDir = "testdata/samples"

// samplePath returns the path of a sample image in sampleDir, or "" when
// there is none.
func samplePath(name string) string {
	p := filepath.Join(sampleDir, name+".bz2")
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// sample decompresses a sample image into a temp dir. The samples are part
// of the repository, so a missing one is a failure, never a skip.
func sample(t testing.TB, name string) string {
	t.Helper()
	src := samplePath(name)
	if src == "" {
		t.Fatalf("sample %s.bz2 not found in %s", name, sampleDir)
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
