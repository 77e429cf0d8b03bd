package qemu_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// These run without QEMU: they check the harness's own helpers.

func TestFirstDifferenceFindsTheFirstDifferingByteOrLength(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	base := bytes.Repeat([]byte{7}, 3<<20+5)
	changed := bytes.Clone(base)
	changed[2<<20+3] = 8
	for _, c := range []struct {
		name string
		b    []byte
		want int64
	}{
		{"same", bytes.Clone(base), -1},
		{"changed", changed, 2<<20 + 3},
		{"shorter", base[:1<<20+1], 1<<20 + 1},
		{"longer", append(bytes.Clone(base), 0), int64(len(base))},
	} {
		got, err := firstDifference(write("base", base), write(c.name, c.b))
		if err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("%s: firstDifference = %d, want %d", c.name, got, c.want)
		}
	}
}

// The overlay archive must unpack with a standard cpio reader, as the
// kernel's initramfs unpacker expects the same newc format.
func TestOverlayArchiveIsReadableNewcCpio(t *testing.T) {
	vhdxtest.NeedTool(t, "cpio")
	var buf bytes.Buffer
	w := cpioWriter{w: &buf}
	w.file("test.sh", 0o755, []byte("echo hi\n"))
	w.file("bin/tool", 0o755, []byte("odd length!"))
	w.trailer()
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-i", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	for name, want := range map[string]string{"test.sh": "echo hi\n", "bin/tool": "odd length!"} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
		st, _ := os.Stat(filepath.Join(dir, name))
		if st.Mode().Perm() != 0o755 {
			t.Errorf("%s mode = %v, want 0755", name, st.Mode().Perm())
		}
	}
}

func TestListeningSeesOnlyAListeningUnixSocket(t *testing.T) {
	dir := t.TempDir()
	bound := filepath.Join(dir, "bound.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: bound}); err != nil {
		t.Fatal(err)
	}
	if listening(t, bound) {
		t.Errorf("a bound socket that does not listen counts as listening")
	}
	if err := syscall.Listen(fd, 1); err != nil {
		t.Fatal(err)
	}
	if !listening(t, bound) {
		t.Errorf("a listening socket does not count as listening")
	}
	if listening(t, filepath.Join(dir, "absent.sock")) {
		t.Errorf("a path with no socket counts as listening")
	}
}
