package main

// Tests that run the built daemon as a service manager or an operator
// would: socket activation, socket ownership, the log file and SIGHUP,
// make run, make install.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// daemonBinary builds vhost-vhdx once per test run.
func daemonBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vhost-vhdx-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "vhost-vhdx")
		if out, err := exec.Command("go", "build", "-race", "-o", binPath, ".").CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// shortDir is a temp dir with a short path: unix socket paths are limited
// to 108 bytes and t.TempDir's can be longer.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// daemonProc is a running vhost-vhdx serve process and its log.
type daemonProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	log    strings.Builder
	lines  chan string // every log line, in order, until the process exits
	exited chan error
}

// startDaemon starts cmd with its stderr captured line by line.
func startDaemon(t *testing.T, cmd *exec.Cmd) *daemonProc {
	t.Helper()
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	cmd.Stdout = pw
	d := &daemonProc{cmd: cmd, lines: make(chan string, 1024), exited: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.mu.Lock()
			d.log.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			select {
			case d.lines <- sc.Text():
			default:
			}
		}
		close(d.lines)
	}()
	go func() {
		err := cmd.Wait()
		pw.Close()
		d.exited <- err
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-d.exited
		}
	})
	return d
}

// waitFor reads log lines until one contains s; it fails if the process
// ends first.
func (d *daemonProc) waitFor(t *testing.T, s string) string {
	t.Helper()
	for line := range d.lines {
		if strings.Contains(line, s) {
			return line
		}
	}
	t.Fatalf("the daemon ended without logging %q; its output:\n%s", s, d.output())
	return ""
}

func (d *daemonProc) output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

// stop sends SIGTERM to pid and expects a clean exit with the image
// flushed and closed.
func (d *daemonProc) stop(t *testing.T, pid int) {
	t.Helper()
	d.stop2(t, pid)
	if out := d.output(); !strings.Contains(out, "stopped; image flushed and closed") {
		t.Errorf("no clean stop logged:\n%s", out)
	}
}

// checkClean runs check on the image: no log to replay, nothing damaged.
func checkClean(t *testing.T, img string) {
	t.Helper()
	code, stdout, stderr := runCLI(t, "check", img)
	if code != 0 || !strings.Contains(stdout, "No errors found") {
		t.Errorf("check after the daemon stopped: status %d\n%s%s", code, stdout, stderr)
	}
}

// useDisk connects a front-end and runs a short verified read/write load,
// as a guest would.
func useDisk(t *testing.T, sock string) {
	t.Helper()
	code, stdout, stderr := runCLI(t, "bench", "--socket", sock, "--rw", "randrw", "--bs", "4K",
		"--ios", "200", "--iodepth", "4", "--verify", "--seed", "3", "--json")
	if code != 0 {
		t.Fatalf("bench through %s: status %d: %s\n%s", sock, code, stderr, stdout)
	}
}

func newImage(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(dir, "d.vhdx")
	mustRun(t, "create", "--size", "64M", "--block-size", "1M", img)
	return img
}

// TestSocketActivatedDaemonServesAFrontEnd starts serve as systemd does
// for a .socket unit: the listening socket as fd 3, LISTEN_FDS=1 and
// LISTEN_PID set to the daemon's own pid (the shell sets it to $$ and execs
// the daemon, so the pid is the same).
func TestSocketActivatedDaemonServesAFrontEnd(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false) // systemd's socket outlives the daemon
	lf, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	defer lf.Close()

	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, bin, "serve", "--log-level", "debug", img)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=s.sock")
	cmd.ExtraFiles = []*os.File{lf} // fd 3
	d := startDaemon(t, cmd)
	lf.Close()
	if line := d.waitFor(t, "serving VHDX image"); !strings.Contains(line, "activated=true") {
		t.Errorf("serve did not say it was socket-activated: %s", line)
	}
	useDisk(t, sock)
	// QEMU reconnects after a disconnect: the socket is served again.
	useDisk(t, sock)
	d.stop(t, cmd.Process.Pid)
	checkClean(t, img)
	// The socket belongs to systemd: serve leaves it in place.
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("socket-activated serve removed the socket: %v", err)
	}
}

func TestSocketActivationVariablesAreCheckedLikeSdListenFDs(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	for _, tc := range []struct {
		name     string
		script   string // run by sh -c with the daemon as $0
		env      []string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"LISTEN_PID of another process is not for us", `LISTEN_PID=1 exec "$0" "$@"`, []string{"LISTEN_FDS=1"},
			nil, exitUsage, "give exactly one of --socket-path and --fd"},
		{"two sockets", `LISTEN_PID=$$ exec "$0" "$@"`, []string{"LISTEN_FDS=2"},
			nil, exitFailure, "passed 2 sockets"},
		{"a count that is not a number", `LISTEN_PID=$$ exec "$0" "$@"`, []string{"LISTEN_FDS=x"},
			nil, exitFailure, `LISTEN_FDS="x" is not a count`},
		{"an activation socket and --socket-path", `LISTEN_PID=$$ exec "$0" "$@"`, []string{"LISTEN_FDS=1"},
			[]string{"--socket-path", filepath.Join(dir, "other.sock")}, exitUsage, "use one"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-c", tc.script, bin, "serve"}, tc.args...)
			cmd := exec.Command("sh", append(args, img)...)
			cmd.Env = append(os.Environ(), tc.env...)
			// fd 3 is a listening socket, as systemd would pass.
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "a.sock"), Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			lf, err := ln.File()
			if err != nil {
				t.Fatal(err)
			}
			defer lf.Close()
			cmd.ExtraFiles = []*os.File{lf}
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.wantCode || !strings.Contains(string(out), tc.wantErr) {
				t.Errorf("status %d, output %q; want status %d and %q", code, out, tc.wantCode, tc.wantErr)
			}
		})
	}
}

// The variables are for this process only: once read they are unset, so a
// child cannot mistake them for its own (sd_listen_fds with
// unset_environment). Variables naming another pid are left alone.
func TestActivationVariablesAreUnsetOnceReadAndKeptWhenForAnotherProcess(t *testing.T) {
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()+1))
	t.Setenv("LISTEN_FDS", "1")
	if _, ok, err := activationFD(); ok || err != nil {
		t.Fatalf("variables for another pid: ok %v, err %v", ok, err)
	}
	if os.Getenv("LISTEN_FDS") != "1" {
		t.Error("variables meant for another process were unset")
	}
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	t.Setenv("LISTEN_FDS", "0")
	t.Setenv("LISTEN_FDNAMES", "")
	if _, ok, err := activationFD(); ok || err != nil {
		t.Fatalf("LISTEN_FDS=0: ok %v, err %v", ok, err)
	}
	for _, k := range activationEnv {
		if v, set := os.LookupEnv(k); set {
			t.Errorf("%s=%q still set after activationFD read it", k, v)
		}
	}
}

// TestServeGivesItsSocketTheOwnerAndModeAsked: libvirt's QEMU runs as
// another user (libvirt-qemu on Debian) and must be able to connect.
func TestServeGivesItsSocketTheOwnerAndModeAsked(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroupId(me.Gid)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(me.Uid)
	gid, _ := strconv.Atoi(me.Gid)
	type want struct {
		uid, gid int
		mode     os.FileMode
	}
	cases := []struct {
		name  string
		owner string
		mode  string
		want  want
	}{
		{"names", me.Username + ":" + grp.Name, "0660", want{uid, gid, 0o660}},
		{"only the mode", "", "0600", want{uid, gid, 0o600}},
		{"only the group", ":" + grp.Name, "", want{uid, gid, 0o777 &^ os.FileMode(currentUmask())}},
	}
	if os.Geteuid() == 0 {
		// Only root can give a file away.
		cases = append(cases,
			struct {
				name  string
				owner string
				mode  string
				want  want
			}{"numeric ids of another user", "12345:23456", "0640", want{12345, 23456, 0o640}})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(dir, "o.sock")
			args := []string{"serve", "--socket-path", sock}
			if tc.owner != "" {
				args = append(args, "--socket-owner", tc.owner)
			}
			if tc.mode != "" {
				args = append(args, "--socket-mode", tc.mode)
			}
			cmd := exec.Command(bin, append(args, img)...)
			d := startDaemon(t, cmd)
			d.waitFor(t, "serving VHDX image")
			fi, err := os.Lstat(sock)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if fi.Mode()&os.ModeSocket == 0 || int(st.Uid) != tc.want.uid || int(st.Gid) != tc.want.gid || fi.Mode().Perm() != tc.want.mode {
				t.Errorf("socket %v owned by %d:%d, want %v owned by %d:%d", fi.Mode(), st.Uid, st.Gid, tc.want.mode, tc.want.uid, tc.want.gid)
			}
			f, err := frontend.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.GetFeatures(); err != nil {
				t.Errorf("GET_FEATURES over the socket: %v", err)
			}
			f.Close()
			d.stop(t, cmd.Process.Pid)
			if _, err := os.Lstat(sock); !os.IsNotExist(err) {
				t.Errorf("serve left its socket behind: %v", err)
			}
		})
	}
}

func currentUmask() int {
	old := syscall.Umask(0)
	syscall.Umask(old)
	return old
}

func TestSocketOwnerAndModeAreCheckedBeforeAnythingStarts(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown user", []string{"--socket-path", "/tmp/x.sock", "--socket-owner", "no-such-user-vhdx"}, `user "no-such-user-vhdx"`},
		{"unknown group", []string{"--socket-path", "/tmp/x.sock", "--socket-owner", ":no-such-group-vhdx"}, `group "no-such-group-vhdx"`},
		{"empty group", []string{"--socket-path", "/tmp/x.sock", "--socket-owner", "0:"}, "empty group"},
		{"mode not octal", []string{"--socket-path", "/tmp/x.sock", "--socket-mode", "rw-rw----"}, "octal"},
		{"mode with more than permission bits", []string{"--socket-path", "/tmp/x.sock", "--socket-mode", "4755"}, "octal"},
		{"owner of an inherited socket", []string{"--fd", "3", "--socket-owner", "0:0"}, "apply to --socket-path only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, append(append([]string{"serve"}, tc.args...), "disk.vhdx")...)
			if code != exitUsage || !strings.Contains(stderr, tc.want) {
				t.Errorf("status %d, stderr %q; want %d and %q", code, stderr, exitUsage, tc.want)
			}
		})
	}
}

func TestLogFileIsReopenedAtItsPathOnSIGHUP(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	logPath := filepath.Join(dir, "serve.log")
	sock := filepath.Join(dir, "l.sock")
	cmd := exec.Command(bin, "serve", "--socket-path", sock, "--log-file", logPath, img)
	d := startDaemon(t, cmd)
	waitForFile(t, d, logPath, "serving VHDX image")
	if err := os.Rename(logPath, logPath+".1"); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitForFile(t, d, logPath, "log file reopened")
	useDisk(t, sock)
	d.stop2(t, cmd.Process.Pid)
	rotated, err := os.ReadFile(logPath + ".1")
	if err != nil {
		t.Fatal(err)
	}
	current, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(rotated), "serving VHDX image") || strings.Contains(string(rotated), "front-end connected") {
		t.Errorf("the rotated file has lines from after SIGHUP or lacks the start:\n%s", rotated)
	}
	for _, want := range []string{"log file reopened", "front-end connected", "stopped; image flushed and closed"} {
		if !strings.Contains(string(current), want) {
			t.Errorf("the reopened log lacks %q:\n%s", want, current)
		}
	}
	if out := d.output(); out != "" {
		t.Errorf("with --log-file, serve wrote to stderr:\n%s", out)
	}
	checkClean(t, img)
}

// stop2 is stop for a daemon that logs to a file, not to its stderr.
func (d *daemonProc) stop2(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-d.exited; err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, d.output())
	}
	for range d.lines {
	}
}

// waitForFile polls path until it holds want: the daemon writes its log
// there, not to a pipe the test could block on. It fails if the daemon
// exits first.
func waitForFile(t *testing.T, d *daemonProc, path, want string) {
	t.Helper()
	for {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), want) {
			return
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			b, _ := os.ReadFile(path)
			t.Fatalf("the daemon exited (%v) before %s held %q:\n%s\nstderr:\n%s", err, path, want, b, d.output())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestSIGHUPWithoutALogFileDoesNotStopTheDaemon(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	sock := filepath.Join(dir, "h.sock")
	cmd := exec.Command(bin, "serve", "--socket-path", sock, img)
	d := startDaemon(t, cmd)
	d.waitFor(t, "serving VHDX image")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// Served after the SIGHUP: the daemon is still there.
	useDisk(t, sock)
	d.waitFor(t, "front-end connected")
	d.stop(t, cmd.Process.Pid)
	checkClean(t, img)
}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// makeRun is `make run` serving a fresh 64 MiB image, in a process group
// of its own so that a signal reaches make alone.
type makeRun struct {
	cmd       *exec.Cmd
	d         *daemonProc
	img, sock string
}

// startMakeRun starts make run and returns once a front-end has used the
// disk it serves.
func startMakeRun(t *testing.T) *makeRun {
	t.Helper()
	bin := daemonBinary(t)
	dir := shortDir(t)
	m := &makeRun{img: filepath.Join(dir, "run.vhdx"), sock: filepath.Join(dir, "run.sock")}
	// -o build: use the binary built above instead of rebuilding bin/.
	m.cmd = exec.Command("make", "-s", "-C", repoRoot(t), "-o", "build", "run",
		"BIN="+bin, "IMAGE="+m.img, "SOCKET="+m.sock, "SIZE=64M")
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // its own group: only make is signalled
	m.d = startDaemon(t, m.cmd)
	m.d.waitFor(t, "serving VHDX image")
	useDisk(t, m.sock)
	return m
}

// checkLeftClean checks, after make run ended, that the socket is gone and
// the image was closed clean.
func (m *makeRun) checkLeftClean(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(m.sock); !os.IsNotExist(err) {
		t.Errorf("the socket is still there after make run stopped: %v", err)
	}
	checkClean(t, m.img)
}

// TestMakeRunStopsCleanlyWhenMakeAloneGetsSIGTERM: make run is a
// foreground command; a supervisor or `kill PID` signals only make's own
// process, not its process group. GNU make passes SIGTERM on to the
// recipe, which is the daemon itself (exec), so the image is closed clean.
func TestMakeRunStopsCleanlyWhenMakeAloneGetsSIGTERM(t *testing.T) {
	m := startMakeRun(t)
	d := m.d
	if err := m.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// make waits for its recipe, then dies of the signal it got.
	err := <-d.exited
	if ee, ok := err.(*exec.ExitError); err != nil && (!ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM) {
		t.Fatalf("make run after SIGTERM: %v\n%s", err, d.output())
	}
	for range d.lines {
	}
	if out := d.output(); !strings.Contains(out, "stopped; image flushed and closed") {
		t.Errorf("the daemon did not stop cleanly:\n%s", out)
	}
	m.checkLeftClean(t)
}

// TestMakeInstallProducesTheServiceTree: make install DESTDIR=... lays out
// the binary, the vhost-user backend description and the systemd units,
// each pointing at the installed binary.
func TestMakeInstallProducesTheServiceTree(t *testing.T) {
	bin := daemonBinary(t)
	dest := t.TempDir()
	out, err := exec.Command("make", "-s", "-C", repoRoot(t), "-o", "build", "install", "BIN="+bin, "DESTDIR="+dest).CombinedOutput()
	if err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	const prefix = "/usr/local"
	var files []string
	err = filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			files = append(files, strings.TrimPrefix(p, dest))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	wantFiles := []string{
		"/etc/vhost-vhdx/NAME.conf.example",
		prefix + "/bin/vhost-vhdx",
		prefix + "/lib/systemd/system/vhost-vhdx@.service",
		prefix + "/lib/systemd/system/vhost-vhdx@.socket",
		prefix + "/lib/sysusers.d/vhost-vhdx.conf",
		prefix + "/share/doc/vhost-vhdx/LICENSE",
		prefix + "/share/doc/vhost-vhdx/README.md",
		prefix + "/share/qemu/vhost-user/50-vhost-vhdx.json",
	}
	if strings.Join(files, "\n") != strings.Join(wantFiles, "\n") {
		t.Errorf("installed files:\n%s\nwant:\n%s", strings.Join(files, "\n"), strings.Join(wantFiles, "\n"))
	}
	if fi, err := os.Stat(dest + prefix + "/bin/vhost-vhdx"); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("binary: %v %v", fi, err)
	}

	// The backend description (QEMU docs/interop/vhost-user.json) names
	// the installed binary, and that binary, run as the vhost-user backend
	// conventions say (BINARY --print-capabilities), reports the same type.
	var desc struct {
		Description string   `json:"description"`
		Type        string   `json:"type"`
		Binary      string   `json:"binary"`
		Tags        []string `json:"tags"`
	}
	b, err := os.ReadFile(dest + prefix + "/share/qemu/vhost-user/50-vhost-vhdx.json")
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&desc); err != nil {
		t.Fatalf("backend JSON: %v\n%s", err, b)
	}
	if desc.Type != "block" || desc.Binary != prefix+"/bin/vhost-vhdx" || desc.Description == "" {
		t.Errorf("backend JSON = %+v", desc)
	}
	capsOut, err := exec.Command(dest+desc.Binary, "--print-capabilities").Output()
	if err != nil {
		t.Fatal(err)
	}
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
	}
	if err := json.Unmarshal(capsOut, &caps); err != nil {
		t.Fatal(err)
	}
	if caps.Type != desc.Type || strings.Join(caps.Features, ",") != "read-only,blk-file" {
		t.Errorf("--print-capabilities %s does not match the backend JSON's type %q", capsOut, desc.Type)
	}

	unitDir := dest + prefix + "/lib/systemd/system"
	service, err := os.ReadFile(unitDir + "/vhost-vhdx@.service")
	if err != nil {
		t.Fatal(err)
	}
	socket, err := os.ReadFile(unitDir + "/vhost-vhdx@.socket")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ExecStart=" + prefix + "/bin/vhost-vhdx serve $OPTIONS ${IMAGE}",
		"EnvironmentFile=/etc/vhost-vhdx/%i.conf",
		"Requires=vhost-vhdx@%i.socket",
		"User=vhost-vhdx", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
		"StateDirectory=vhost-vhdx",
	} {
		if !strings.Contains(string(service), want+"\n") {
			t.Errorf("vhost-vhdx@.service lacks %q", want)
		}
	}
	for _, want := range []string{"ListenStream=/run/vhost-vhdx/%i.sock", "SocketMode=0660", "SocketGroup=libvirt-qemu", "Accept=no"} {
		if !strings.Contains(string(socket), want+"\n") {
			t.Errorf("vhost-vhdx@.socket lacks %q", want)
		}
	}
	// systemd chowns a service's RuntimeDirectory, and everything in it, to
	// User=: it would take the sockets away from their SocketGroup.
	if strings.Contains(string(service), "\nRuntimeDirectory=vhost-vhdx\n") {
		t.Error("vhost-vhdx@.service claims /run/vhost-vhdx, where the socket units keep their sockets")
	}
	for _, v := range []string{"@BINDIR@", "@DOCDIR@", "@SYSCONFDIR@", "@SYSUSERSDIR@"} {
		if strings.Contains(string(service)+string(socket)+string(b), v) {
			t.Errorf("an installed file still holds %s", v)
		}
	}
	verifyUnits(t, unitDir, dest+prefix+"/bin/vhost-vhdx")

	// make uninstall takes every file away again.
	if out, err := exec.Command("make", "-s", "-C", repoRoot(t), "uninstall", "DESTDIR="+dest).CombinedOutput(); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	err = filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			t.Errorf("make uninstall left %s", strings.TrimPrefix(p, dest))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// verifyUnits runs systemd-analyze verify on an instance of each template
// (systemd's own parser: unknown keys, bad values, a missing binary).
func verifyUnits(t *testing.T, unitDir, bin string) {
	t.Helper()
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not installed: the units were checked by content only")
		return
	}
	dir := t.TempDir()
	for _, u := range []string{"service", "socket"} {
		b, err := os.ReadFile(unitDir + "/vhost-vhdx@." + u)
		if err != nil {
			t.Fatal(err)
		}
		// The installed path is below DESTDIR here.
		b = []byte(strings.ReplaceAll(string(b), "ExecStart=/usr/local/bin/vhost-vhdx", "ExecStart="+bin))
		if err := os.WriteFile(dir+"/vhost-vhdx@disk1."+u, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(analyze, "verify", "--man=no", dir+"/vhost-vhdx@disk1.socket", dir+"/vhost-vhdx@disk1.service")
	out, err := cmd.CombinedOutput()
	// verify only warns about unknown keys: any output is a finding.
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestOneImageOnTwoSocketsServesEachInTurn: `serve --socket-path A
// --socket-path B IMAGE` (the one-host migration set-up) serves a front-end
// on each socket, one after the other, and stops cleanly.
func TestOneImageOnTwoSocketsServesEachInTurn(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	a, b := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	cmd := exec.Command(bin, "serve", "--socket-path", a, "--socket-path", b, img)
	d := startDaemon(t, cmd)
	d.waitFor(t, "serving VHDX image")
	useDisk(t, a)
	useDisk(t, b)
	useDisk(t, a)
	d.stop(t, cmd.Process.Pid)
	for _, p := range []string{a, b} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("socket %s left behind", p)
		}
	}
	checkClean(t, img)
}
