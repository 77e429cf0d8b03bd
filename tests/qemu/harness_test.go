package qemu_test

// The harness: it finds the assets built by setup.sh, starts a vhost-user-blk
// backend on a unix socket, boots a small TCG guest whose /test.sh is given
// by each test, and checks the image on the host afterwards.
//
// Environment:
//
//	VHOST_VHDX_QEMU_TESTS=1       run these tests (otherwise they skip); when
//	                              set, missing assets or binaries FAIL the tests
//	VHOST_VHDX_TEST_BACKEND       vhost-vhdx (default) or qsd (qemu-storage-daemon)
//	VHOST_VHDX_BIN                the daemon binary (default <repo>/bin/vhost-vhdx)
//	VHOST_VHDX_ASSETS             asset cache (default <repo>/.cache/qemu-assets)
//	VHOST_VHDX_QEMU_ACCEL         QEMU accelerator (default tcg)
//	VHOST_VHDX_QEMU_TIMEOUT       hard limit for one guest boot (default 180s)
//	VHOST_VHDX_QEMU_KEEP=1        keep every work directory (failed ones are always kept)

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/tests/qemu/pattern"
)

const (
	envEnable   = "VHOST_VHDX_QEMU_TESTS"
	envBackend  = "VHOST_VHDX_TEST_BACKEND"
	envBin      = "VHOST_VHDX_BIN"
	envAssets   = "VHOST_VHDX_ASSETS"
	envAccel    = "VHOST_VHDX_QEMU_ACCEL"
	envTimeout  = "VHOST_VHDX_QEMU_TIMEOUT"
	envKeep     = "VHOST_VHDX_QEMU_KEEP"
	resultMark  = "VHOSTVHDX-RESULT: "
	guestMemory = "512M"
	mib         = int64(1) << 20
)

// Backend kinds.
const (
	backendVhostVHDX = "vhost-vhdx"
	backendQSD       = "qsd"
)

var (
	toolsOnce sync.Once
	toolsErr  error
	toolsDir  string // holds the guestcmd binary built for the guest
)

func TestMain(m *testing.M) {
	code := m.Run()
	if toolsDir != "" {
		os.RemoveAll(toolsDir)
	}
	os.Exit(code)
}

// env is what a test needs to boot guests.
type env struct {
	root     string // repository root
	assets   string
	kernel   string
	initrd   string // base initramfs from setup.sh
	guestcmd string
	backend  string // backendVhostVHDX or backendQSD
	daemon   string // bin/vhost-vhdx, for backendVhostVHDX
	accel    string
	timeout  time.Duration
	work     string // this test's work directory
	// cmds collects the command lines run, printed on failure as a reproducer.
	mu   sync.Mutex
	cmds []string
	// actSock is the listening socket of activated backends: like a
	// .socket unit's, it outlives each daemon.
	actSock *os.File
}

// newEnv gates the test on VHOST_VHDX_QEMU_TESTS and checks every
// prerequisite. Once the tests are enabled a missing prerequisite is a
// failure, not a skip, so a broken CI setup cannot pass silently.
func newEnv(t *testing.T) *env {
	t.Helper()
	if os.Getenv(envEnable) != "1" {
		t.Skipf("QEMU tests are off: set %s=1 (make test does) after running tests/qemu/setup.sh", envEnable)
	}
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{root: root, backend: backendVhostVHDX, accel: "tcg", timeout: 180 * time.Second}
	if b := os.Getenv(envBackend); b != "" {
		e.backend = b
	}
	if e.backend != backendVhostVHDX && e.backend != backendQSD {
		t.Fatalf("%s=%q: want %q or %q", envBackend, e.backend, backendVhostVHDX, backendQSD)
	}
	if a := os.Getenv(envAccel); a != "" {
		e.accel = a
	}
	if s := os.Getenv(envTimeout); s != "" {
		if e.timeout, err = time.ParseDuration(s); err != nil {
			t.Fatalf("%s: %v", envTimeout, err)
		}
	}
	e.assets = os.Getenv(envAssets)
	if e.assets == "" {
		e.assets = filepath.Join(root, ".cache", "qemu-assets")
	}
	e.kernel = filepath.Join(e.assets, "vmlinuz")
	e.initrd = filepath.Join(e.assets, "initramfs.cpio.gz")
	for _, f := range []string{e.kernel, e.initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("guest asset missing: %v\nrun tests/qemu/setup.sh (make test does)", err)
		}
	}
	if err := assetsCurrent(root, e.assets); err != nil {
		t.Fatalf("%v\nrun tests/qemu/setup.sh (make test does)", err)
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run tests/qemu/setup.sh", tool)
		}
	}
	switch e.backend {
	case backendQSD:
		if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
			t.Fatal("qemu-storage-daemon not found: run tests/qemu/setup.sh")
		}
	case backendVhostVHDX:
		e.daemon = os.Getenv(envBin)
		if e.daemon == "" {
			e.daemon = filepath.Join(root, "bin", "vhost-vhdx")
		}
		if st, err := os.Stat(e.daemon); err != nil || st.IsDir() {
			t.Fatalf("bin/vhost-vhdx not built (%s missing): run `make build`, "+
				"or set %s=%s to run these tests against qemu-storage-daemon", e.daemon, envBackend, backendQSD)
		}
	}

	toolsOnce.Do(func() { toolsErr = buildGuestTools(root) })
	if toolsErr != nil {
		t.Fatal(toolsErr)
	}
	e.guestcmd = filepath.Join(toolsDir, "guestcmd")

	// The work directory survives a failed test so the reproducer works.
	e.work, err = os.MkdirTemp("", "vhost-vhdx-qemu-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv(envKeep) == "1" {
			t.Logf("work directory kept: %s", e.work)
			e.logReproducer(t)
			return
		}
		os.RemoveAll(e.work)
	})
	t.Logf("backend %s, accel %s, work %s", e.backend, e.accel, e.work)
	return e
}

// assetsCurrent reports whether the assets were built from the current
// setup.sh and guest files: setup.sh records the same hash in its manifest.
func assetsCurrent(root, assets string) error {
	h := sha256.New()
	for _, f := range []string{"setup.sh", "guest/init", "guest/testlib.sh"} {
		b, err := os.ReadFile(filepath.Join(root, "tests", "qemu", f))
		if err != nil {
			return err
		}
		h.Write(b)
	}
	want := fmt.Sprintf("setup=%x", h.Sum(nil))[:len("setup=")+16]
	manifest, err := os.ReadFile(filepath.Join(assets, "manifest"))
	if err != nil {
		return fmt.Errorf("guest assets missing: %v", err)
	}
	for _, line := range strings.Split(string(manifest), "\n") {
		if line == want {
			return nil
		}
	}
	return fmt.Errorf("guest assets in %s are stale (built from other tests/qemu files; want %s)", assets, want)
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// buildGuestTools builds guestcmd as a static binary for the guest.
func buildGuestTools(root string) error {
	dir, err := os.MkdirTemp("", "vhost-vhdx-guesttools-")
	if err != nil {
		return err
	}
	toolsDir = dir
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, "guestcmd"), "./tests/qemu/guestcmd")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building guestcmd: %v\n%s", err, out)
	}
	return nil
}

// record remembers a command line for the reproducer.
func (e *env) record(args []string, background bool) {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	line := strings.Join(q, " ")
	if background {
		line += " &"
	}
	e.note(line)
}

// note adds a raw shell line to the reproducer.
func (e *env) note(line string) {
	e.mu.Lock()
	e.cmds = append(e.cmds, line)
	e.mu.Unlock()
}

func (e *env) logReproducer(t *testing.T) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var b strings.Builder
	b.WriteString("reproducer (the commands in the order the test ran them):\n")
	for _, c := range e.cmds {
		b.WriteString("  " + c + "\n")
	}
	t.Log(b.String())
}

func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=,:+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// run runs a host command and fails the test if it does not exit 0.
func (e *env) run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := e.runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func (e *env) runErr(name string, args ...string) (string, error) {
	e.record(append([]string{name}, args...), false)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// ---- images ----

// image describes a VHDX image under test.
type image struct {
	path string
	size int64
	// logicalSector is 512 or 4096. QEMU 7.2's vhdx driver opens only
	// 512-byte-sector images, so 4096 ones are checked with vhost-vhdx alone.
	logicalSector int
}

// newImage creates an empty dynamic VHDX with 1 MiB blocks, so offsets in
// the tests straddle real block boundaries. A 512-byte-sector image is made
// by qemu-img for either backend (so vhost-vhdx is also tested on images it
// did not write); a 4096-byte-sector one only by vhost-vhdx create, as
// QEMU's vhdx driver always writes 512.
func (e *env) newImage(t *testing.T, name string, size int64, logicalSector int) *image {
	t.Helper()
	img := &image{path: filepath.Join(e.work, name), size: size, logicalSector: logicalSector}
	switch logicalSector {
	case 512:
		e.run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", img.path, strconv.FormatInt(size, 10))
	case 4096:
		if e.backend != backendVhostVHDX {
			t.Fatalf("a %d-byte-sector image needs vhost-vhdx create", logicalSector)
		}
		e.run(t, e.daemon, "create", "--size", strconv.FormatInt(size, 10), "--block-size", "1M", "--logical-sector", "4096", img.path)
	default:
		t.Fatalf("unsupported logical sector size %d", logicalSector)
	}
	return img
}

// check requires the image to be consistent: qemu-img check (the
// independent oracle) for 512-byte-sector images, and vhost-vhdx check too
// when the daemon is the backend.
func (e *env) check(t *testing.T, img *image) {
	t.Helper()
	if img.logicalSector != 4096 {
		out := e.run(t, "qemu-img", "check", "-f", "vhdx", img.path)
		t.Logf("qemu-img check %s: %s", filepath.Base(img.path), strings.TrimSpace(out))
	}
	if e.daemon != "" {
		// Exit 3 is qemu-img check's "only leaked space": harmless (qemu-img
		// create leaves such a tail), so it passes; any other failure fails.
		out, err := e.runErr(e.daemon, "check", img.path)
		var ee *exec.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
			t.Fatalf("vhost-vhdx check %s: %v\n%s", img.path, err, out)
		}
		t.Logf("vhost-vhdx check %s: %s", filepath.Base(img.path), strings.TrimSpace(out))
	}
}

// compare requires the image's virtual disk to equal the expected raw disk:
// qemu-img compare for 512-byte-sector images; a 4096 one is converted to
// raw by vhost-vhdx convert and compared byte by byte.
func (e *env) compare(t *testing.T, img *image, want *expected) {
	t.Helper()
	if img.logicalSector != 4096 {
		out, err := e.runErr("qemu-img", "compare", "-f", "vhdx", "-F", "raw", img.path, want.path)
		if err != nil {
			t.Fatalf("image %s differs from the expected contents %s: %v\n%s", img.path, want.path, err, out)
		}
		t.Logf("qemu-img compare: %s", strings.TrimSpace(out))
		return
	}
	raw := img.path + ".raw"
	os.Remove(raw)
	e.run(t, e.daemon, "convert", "-O", "raw", img.path, raw)
	if off, err := firstDifference(raw, want.path); err != nil {
		t.Fatal(err)
	} else if off >= 0 {
		t.Fatalf("image %s differs from the expected contents %s at byte %d (compared %s)", img.path, want.path, off, raw)
	}
	t.Logf("vhost-vhdx convert -O raw: identical to the expected contents")
}

// firstDifference returns the first offset at which the files differ
// (a length difference counts), or -1.
func firstDifference(a, b string) (int64, error) {
	fa, err := os.Open(a)
	if err != nil {
		return 0, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return 0, err
	}
	defer fb.Close()
	ba := make([]byte, 1<<20)
	bb := make([]byte, 1<<20)
	for off := int64(0); ; {
		na, erra := io.ReadFull(fa, ba)
		nb, errb := io.ReadFull(fb, bb)
		for i := 0; i < min(na, nb); i++ {
			if ba[i] != bb[i] {
				return off + int64(i), nil
			}
		}
		if na != nb {
			return off + int64(min(na, nb)), nil
		}
		off += int64(na)
		if erra != nil || errb != nil {
			for _, err := range []error{erra, errb} {
				if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
					return 0, err
				}
			}
			return -1, nil
		}
	}
}

// expected is a sparse raw file holding what the disk should contain.
type expected struct {
	path string
	f    *os.File
}

func (e *env) newExpected(t *testing.T, img *image) *expected {
	t.Helper()
	p := filepath.Join(e.work, filepath.Base(img.path)+".expected.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(img.size); err != nil {
		t.Fatal(err)
	}
	return &expected{path: p, f: f}
}

// write records that the guest wrote stream seed at [off, off+n).
func (x *expected) write(t *testing.T, seed uint64, off, n int64) {
	t.Helper()
	buf := make([]byte, min(n, 4*mib))
	for done := int64(0); done < n; {
		c := min(int64(len(buf)), n-done)
		pattern.Fill(buf[:c], seed, off+done)
		if _, err := x.f.WriteAt(buf[:c], off+done); err != nil {
			t.Fatal(err)
		}
		done += c
	}
}

// zero records that the guest zeroed [off, off+n).
func (x *expected) zero(t *testing.T, off, n int64) {
	t.Helper()
	if _, err := x.f.WriteAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
}

// region is one pattern write: the guest writes it, the host expects it.
type region struct {
	seed     uint64
	off, len int64
}

// guestWrite and guestVerify render guestcmd invocations for a region.
func (r region) guestWrite(dev string, bs int64) string {
	return fmt.Sprintf("guestcmd write -dev %s -seed %d -off %d -len %d -bs %d -direct", dev, r.seed, r.off, r.len, bs)
}

func (r region) guestVerify(dev string, bs int64) string {
	return fmt.Sprintf("guestcmd verify -dev %s -seed %d -off %d -len %d -bs %d -direct", dev, r.seed, r.off, r.len, bs)
}

// ---- backends ----

type backendOpts struct {
	readOnly  bool
	numQueues int
	// logicalBlockSize is passed to qemu-storage-daemon's export; vhost-vhdx
	// takes the logical sector size from the image itself.
	logicalBlockSize int
	serial           string // vhost-vhdx only
	// activated starts vhost-vhdx as systemd's socket activation does: the
	// env's listening socket (created once, kept across backends, see
	// activationSocket) as fd 3, LISTEN_FDS=1, LISTEN_PID. qemu-storage-
	// daemon (the harness check) ignores it and listens itself.
	activated bool
	// secondSocket serves the image on a second socket too (sock2), as a
	// one-host migration needs: vhost-vhdx with a second --socket-path,
	// qemu-storage-daemon with a second export of the node.
	secondSocket bool
	// controlSocket, vhost-vhdx only: serve --control-socket at
	// backend.ctl.
	controlSocket bool
	// onENOSPC, vhost-vhdx only: serve --on-enospc (report or wait).
	onENOSPC string
}

type backend struct {
	env   *env
	args  []string
	sock  string
	sock2 string // with backendOpts.secondSocket
	ctl   string // control socket, with backendOpts.controlSocket
	log   string
	cmd   *exec.Cmd
	done  chan struct{}
	err   error // Wait's result, valid after done is closed
}

// startBackend starts the configured backend serving img and waits until
// its socket exists.
func (e *env) startBackend(t *testing.T, img *image, o backendOpts) *backend {
	t.Helper()
	if o.numQueues == 0 {
		o.numQueues = 1
	}
	b := &backend{env: e, sock: filepath.Join(e.work, "vhost.sock")}
	// A socket file left by an earlier backend stays: a restarted daemon
	// must cope with it, as after a crash under a service manager.
	switch e.backend {
	case backendQSD:
		ro := "off"
		writable := "on"
		if o.readOnly {
			ro, writable = "on", "off"
		}
		export := fmt.Sprintf("type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path=%s,writable=%s,num-queues=%d",
			b.sock, writable, o.numQueues)
		if o.serial != "" {
			t.Fatal("qemu-storage-daemon's vhost-user-blk export has no serial option")
		}
		if o.logicalBlockSize != 0 {
			export += fmt.Sprintf(",logical-block-size=%d", o.logicalBlockSize)
		}
		b.args = []string{"qemu-storage-daemon",
			"--blockdev", fmt.Sprintf("driver=file,node-name=file,filename=%s,read-only=%s", img.path, ro),
			"--blockdev", fmt.Sprintf("driver=vhdx,node-name=disk,file=file,read-only=%s", ro),
			"--export", export}
		if o.secondSocket {
			b.sock2 = filepath.Join(e.work, "vhost-b.sock")
			b.args = append(b.args, "--export", strings.Replace(strings.Replace(export, "id=e0", "id=e1", 1), b.sock, b.sock2, 1))
		}
	case backendVhostVHDX:
		// Debug level traces every vhost-user message (one line each, none
		// per I/O): a failed test's backend log then shows how far the
		// front-end got, above all after a reconnect.
		b.args = []string{e.daemon, "serve", "--socket", b.sock, "--log-level", "debug"}
		if o.readOnly {
			b.args = append(b.args, "--read-only")
		}
		if o.numQueues != 1 {
			b.args = append(b.args, "--num-queues", strconv.Itoa(o.numQueues))
		}
		if o.serial != "" {
			b.args = append(b.args, "--serial", o.serial)
		}
		if o.secondSocket {
			b.sock2 = filepath.Join(e.work, "vhost-b.sock")
			b.args = append(b.args, "--socket-path", b.sock2)
		}
		if o.controlSocket {
			b.ctl = filepath.Join(e.work, "ctl.sock")
			b.args = append(b.args, "--control-socket", b.ctl)
		}
		if o.onENOSPC != "" {
			b.args = append(b.args, "--on-enospc", o.onENOSPC)
		}
		b.args = append(b.args, img.path)
	}
	var extra []*os.File
	var env []string
	if o.activated && e.backend == backendVhostVHDX {
		b.args, extra, env = e.activated(t, b.sock, b.args)
	}
	e.record(b.args, true)

	logf, err := os.CreateTemp(e.work, "backend-*.log")
	if err != nil {
		t.Fatal(err)
	}
	b.log = logf.Name()
	b.cmd = exec.Command(b.args[0], b.args[1:]...)
	b.cmd.Stdout, b.cmd.Stderr = logf, logf
	b.cmd.ExtraFiles = extra
	if env != nil {
		b.cmd.Env = append(os.Environ(), env...)
	}
	if err := b.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting backend: %v", err)
	}
	logf.Close()
	b.done = make(chan struct{})
	go func() { b.err = b.cmd.Wait(); close(b.done) }()
	t.Cleanup(func() {
		select {
		case <-b.done:
		default:
			b.cmd.Process.Kill()
			<-b.done
		}
	})

	// Wait until the socket listens (without connecting to it, which would
	// take the backend's one front-end slot); a backend that dies first
	// fails the test.
	deadline := time.After(30 * time.Second)
	for {
		if listening(t, b.sock) && (b.sock2 == "" || listening(t, b.sock2)) {
			return b
		}
		select {
		case <-b.done:
			t.Fatalf("backend exited before listening: %v\n%s", b.err, tail(b.log, 40))
		case <-deadline:
			t.Fatalf("backend did not listen on %s within 30s\n%s", b.sock, tail(b.log, 40))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// listening reports whether a unix socket bound to path is in the listening
// state, from /proc/net/unix: "Num RefCount Protocol Flags Type St Inode
// Path", where Flags 00010000 is __SO_ACCEPTCON.
func listening(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 8 && f[7] == path && f[3] == "00010000" {
			return true
		}
	}
	return false
}

// kill ends the backend with SIGKILL, as a crash would.
func (b *backend) kill(t *testing.T) {
	t.Helper()
	b.env.note("kill -KILL $!  # crash the backend")
	b.cmd.Process.Kill()
	<-b.done
}

// stop sends SIGTERM and requires a clean exit, as a service manager would.
func (b *backend) stop(t *testing.T) {
	t.Helper()
	b.env.note("kill -TERM $!; wait $!  # stop the backend")
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("SIGTERM to backend: %v", err)
	}
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		b.cmd.Process.Kill()
		<-b.done
		t.Fatalf("backend did not exit within 30s of SIGTERM\n%s", tail(b.log, 40))
	}
	if b.err != nil {
		t.Fatalf("backend exit after SIGTERM: %v (want status 0)\n%s", b.err, tail(b.log, 40))
	}
}

// ---- guests ----

type vmOpts struct {
	cpus      int
	numQueues int
	// autoQueues leaves num-queues off the -device option, as the README's
	// attach line does, so QEMU picks its default (one queue per vCPU).
	autoQueues bool
	// packed adds packed=on to the device: the guest negotiates
	// VIRTIO_F_RING_PACKED if the backend offers it.
	packed bool
	// script is the body of /test.sh. It runs under `set -e` after
	// /etc/testlib.sh is sourced; the guest passes when it exits 0.
	script string
	// reconnect makes QEMU reconnect to the backend socket (chardev
	// reconnect=1), so a backend may restart while the guest runs.
	reconnect bool
	// control gives the guest a second serial port, /dev/ttyS1, on which
	// guestRun.send delivers lines (testlib's wait_host reads them).
	control bool
	// maxMem, if set, gives the guest DIMM slots: -m 512M,slots=4,maxmem=maxMem.
	maxMem string
	// extraArgs are appended to the QEMU command line (e.g. -qmp).
	extraArgs []string
	// during, if set, runs while the guest runs and returns the backend
	// serving it afterwards (it may have stopped b and started another).
	during func(g *guestRun) *backend
}

// guestRun is a running guest, for vmOpts.during.
type guestRun struct {
	t         *testing.T
	console   string
	qemuDone  chan error
	exited    bool
	exitErr   error
	deadline  time.Time
	failGuest func(why string)
	ctlSock   string
	ctl       net.Conn
}

// send writes one line to the guest's /dev/ttyS1 (vmOpts.control).
func (g *guestRun) send(line string) {
	g.t.Helper()
	if g.ctl == nil {
		c, err := net.Dial("unix", g.ctlSock)
		if err != nil {
			g.failGuest(fmt.Sprintf("control serial port: %v", err))
		}
		g.ctl = c // closed when boot returns
	}
	if _, err := io.WriteString(g.ctl, line+"\n"); err != nil {
		g.failGuest(fmt.Sprintf("control serial port: %v", err))
	}
}

// waitFor waits until the guest has printed marker on its console. The
// guest's own hang timeout bounds the wait; a guest that exits first fails
// the test.
func (g *guestRun) waitFor(marker string) {
	g.t.Helper()
	for {
		if b, _ := os.ReadFile(g.console); strings.Contains(string(b), marker) {
			return
		}
		if g.exited {
			g.failGuest(fmt.Sprintf("guest exited (%v) before printing %q", g.exitErr, marker))
		}
		if time.Now().After(g.deadline) {
			g.failGuest(fmt.Sprintf("guest printed no %q before the timeout", marker))
		}
		select {
		case g.exitErr = <-g.qemuDone:
			g.exited = true
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// boot runs one guest against the backend and returns its console log. The
// test fails unless the guest prints the PASS marker and QEMU exits.
func (e *env) boot(t *testing.T, b *backend, name string, o vmOpts) string {
	t.Helper()
	start := time.Now()
	dir := filepath.Join(e.work, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd")
	script := o.script
	if o.control {
		script = "open_host\n" + script // testlib.sh: before the host can send
	}
	if err := e.writeInitrd(initrd, script); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	ctlSock := filepath.Join(dir, "ctl.sock")
	args := e.qemuArgs(b.sock, initrd, console, ctlSock, o)
	e.record(args, false)

	ctx, cancel := context.WithTimeout(context.Background(), e.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting qemu-system-x86_64: %v", err)
	}
	return e.awaitGuest(ctx, t, cmd, &stderr, b, name, console, ctlSock, start, o)
}

// qemuArgs is the QEMU command line of a guest on the vhost-user socket
// sock.
func (e *env) qemuArgs(sock, initrd, console, ctlSock string, o vmOpts) []string {
	if o.cpus == 0 {
		o.cpus = 1
	}
	if o.numQueues == 0 {
		o.numQueues = 1
	}
	args := []string{"qemu-system-x86_64",
		"-accel", e.accel,
		"-m", guestMemory + map[bool]string{true: ",slots=4,maxmem=" + o.maxMem}[o.maxMem != ""],
		"-smp", strconv.Itoa(o.cpus),
		"-object", "memory-backend-memfd,id=mem,size=" + guestMemory + ",share=on",
		"-numa", "node,memdev=mem",
		"-nodefaults", "-display", "none", "-no-reboot",
		"-serial", "file:" + console,
		"-monitor", "none",
		"-kernel", e.kernel,
		"-initrd", initrd,
		// no_timer_check: under TCG on a loaded host the kernel's IO-APIC
		// timer check can miss ticks and panic ("IO-APIC + timer doesn't
		// work"); the check proves nothing about the disk.
		"-append", "console=ttyS0 panic=-1 quiet no_timer_check",
		"-chardev", "socket,id=c0,path=" + sock + map[bool]string{true: ",reconnect=1"}[o.reconnect],
		"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=c0,num-queues=%d", o.numQueues) + map[bool]string{true: ",packed=on"}[o.packed],
	}
	if o.autoQueues {
		args[len(args)-1] = "vhost-user-blk-pci,chardev=c0"
	}
	if o.control {
		args = append(args, "-chardev", "socket,id=ctl,server=on,wait=off,path="+ctlSock, "-serial", "chardev:ctl")
	}
	return append(args, o.extraArgs...)
}

// awaitGuest runs vmOpts.during and waits for the guest started as cmd to
// power off; see boot.
func (e *env) awaitGuest(ctx context.Context, t *testing.T, cmd *exec.Cmd, stderr *bytes.Buffer, b *backend, name, console, ctlSock string, start time.Time, o vmOpts) string {
	t.Helper()
	qemuDone := make(chan error, 1)
	go func() { qemuDone <- cmd.Wait() }()
	var err error
	backendDied := false
	if o.during != nil {
		g := &guestRun{t: t, console: console, qemuDone: qemuDone, deadline: start.Add(e.timeout), ctlSock: ctlSock}
		defer func() {
			if g.ctl != nil {
				g.ctl.Close()
			}
		}()
		g.failGuest = func(why string) {
			t.Helper()
			cmd.Process.Kill()
			if !g.exited {
				<-qemuDone
			}
			logText, _ := os.ReadFile(console)
			t.Fatalf("guest %s: %s\n--- QEMU output ---\n%s\n--- console (last 60 lines of %s) ---\n%s\n--- backend log (last 30 lines) ---\n%s",
				name, why, strings.TrimSpace(stderr.String()), console, tailString(string(logText), 60), tail(b.log, 30))
		}
		b = o.during(g)
		if g.exited {
			qemuDone <- g.exitErr // hand QEMU's result to the select below
		}
	}
	select {
	case err = <-qemuDone:
	case <-b.done:
		// A guest whose backend is gone would wait for its I/O until the
		// timeout; stop it now and report the backend's end instead.
		backendDied = true
		cmd.Process.Kill()
		err = <-qemuDone
	}
	logText, _ := os.ReadFile(console)
	out := string(logText)
	t.Logf("guest %s finished in %.1fs", name, time.Since(start).Seconds())

	fail := func(why string) {
		t.Helper()
		t.Fatalf("guest %s: %s\n--- QEMU output ---\n%s\n--- console (last 60 lines of %s) ---\n%s\n--- backend log (last 30 lines) ---\n%s",
			name, why, strings.TrimSpace(stderr.String()), console, tailString(out, 60), tail(b.log, 30))
	}
	if backendDied {
		fail(fmt.Sprintf("the backend exited while the guest ran (%v); QEMU killed", b.err))
	}
	if ctx.Err() != nil {
		fail(fmt.Sprintf("no poweroff within %v; QEMU killed (hang?)", e.timeout))
	}
	if err != nil {
		fail(fmt.Sprintf("qemu-system-x86_64: %v", err))
	}
	m := regexp.MustCompile(resultMark + `(PASS|FAIL[^\r\n]*)`).FindStringSubmatch(out)
	switch {
	case m == nil:
		fail("no result marker on the console")
	case m[1] != "PASS":
		fail("test script failed: " + m[1])
	}
	return out
}

// writeInitrd writes the base initramfs followed by a second cpio archive
// with /test.sh and /bin/guestcmd; the kernel unpacks both in order.
func (e *env) writeInitrd(path, script string) error {
	base, err := os.ReadFile(e.initrd)
	if err != nil {
		return err
	}
	guestcmd, err := os.ReadFile(e.guestcmd)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	buf.Write(base)
	// An uncompressed archive must start on a 4-byte boundary; the kernel
	// skips zero padding between archives.
	for buf.Len()%4 != 0 {
		buf.WriteByte(0)
	}
	test := "set -e\n. /etc/testlib.sh\nwait_dev /dev/vda\n" + script + "\n"
	w := cpioWriter{w: &buf}
	w.file("test.sh", 0o755, []byte(test))
	w.file("bin/guestcmd", 0o755, guestcmd)
	w.trailer()
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// cpioWriter writes the "newc" format the kernel's initramfs unpacker reads.
type cpioWriter struct {
	w   *bytes.Buffer
	ino int
}

func (c *cpioWriter) entry(name string, mode uint32, data []byte) {
	c.ino++
	fields := []uint32{uint32(c.ino), mode, 0, 0, 1, 0, uint32(len(data)), 0, 0, 0, 0, uint32(len(name) + 1), 0}
	c.w.WriteString("070701")
	for _, f := range fields {
		fmt.Fprintf(c.w, "%08X", f)
	}
	c.w.WriteString(name)
	c.w.WriteByte(0)
	c.pad()
	c.w.Write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	for c.w.Len()%4 != 0 {
		c.w.WriteByte(0)
	}
}

func (c *cpioWriter) file(name string, perm uint32, data []byte) {
	c.entry(name, syscall.S_IFREG|perm, data)
}

func (c *cpioWriter) trailer() { c.entry("TRAILER!!!", 0, nil) }

// ---- small helpers ----

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	return tailString(string(b), n)
}

func tailString(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// consoleValue returns the value printed by the guest as "KEY=value".
func consoleValue(t *testing.T, console, key string) string {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(console))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), key+"="); ok {
			return v
		}
	}
	t.Fatalf("guest printed no %s= line", key)
	return ""
}

// fileSum returns the SHA-256 of a file's bytes.
func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}
