package qemu_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Live migration on one host: a guest streams O_DIRECT writes (chunk i
// with pattern seed 1000+i, cycling over 64 slots of 1 MiB) while QEMU migrates it from a source QEMU on socket A to a
// destination QEMU on socket B of one `vhost-vhdx serve --socket-path A
// --socket-path B` (qemu-storage-daemon: two exports of one node). The
// source logs the pages the back-end writes (LOG_ALL, SET_LOG_BASE), stops
// its rings at the switch (GET_VRING_BASE drains); the destination's rings
// start after that. Meanwhile a second guest process reads back a region
// written before the stream over and over (O_DIRECT: every byte comes from
// the back-end into guest RAM, and completions through the used ring). The
// host tells the guest, now on the destination, that the migration
// happened; the stream stops there after eight more chunks, the guest
// verifies the last chunk of every slot, and the host compares the image
// with the same computation: nothing lost or duplicated across the switch.
//
// This test does not prove the dirty log complete: QEMU moves 512 MiB in
// about a second here, and with marking disabled in the daemon it still
// passes. TestDirtyLogMarksExactlyThePagesTheDeviceWrites (vhostuser) checks
// the marks page by page.
func TestGuestMigratesMidStreamBetweenTwoQEMUsOnOneImage(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "migrate.vhdx", 96*mib, 512)
	b := e.startBackend(t, img, backendOpts{secondSocket: true})

	const slots, chunk = 64, mib
	slotOf := func(v string) string { return fmt.Sprintf("$((%s %% %d * %d))", v, slots, chunk) }
	fixed := region{seed: 999, off: 80 * mib, len: 8 * mib}
	guest := script(
		fixed.guestWrite("/dev/vda", 64*1024),
		"( while [ ! -e /tmp/stop ]; do",
		"    "+fixed.guestVerify("/dev/vda", 64*1024)+" >/dev/null",
		"  done ) &",
		"r=$!",
		"( i=0",
		"  while [ ! -e /tmp/stop ] && [ $i -lt 100000 ]; do",
		fmt.Sprintf("    guestcmd write -dev /dev/vda -seed $((1000+i)) -off %s -len %d -bs 65536 -direct", slotOf("i"), chunk),
		"    echo \"CHUNK $i\"",
		"    i=$((i+1))",
		"  done",
		"  echo $i >/tmp/count ) &",
		"w=$!",
		"wait_host MIGRATED",
		"touch /tmp/stop",
		"wait $w",
		"wait $r",
		"n=$(cat /tmp/count)",
		// Eight more chunks, all written on the destination.
		"e=$((n+8)); i=$n",
		"while [ $i -lt $e ]; do",
		fmt.Sprintf("  guestcmd write -dev /dev/vda -seed $((1000+i)) -off %s -len %d -bs 65536 -direct", slotOf("i"), chunk),
		"  echo \"CHUNK $i\"",
		"  i=$((i+1))",
		"done",
		"n=$e",
		"echo \"STREAM $n\"",
		// The last chunk of each slot s < n is i = s + slots*((n-1-s)/slots).
		fmt.Sprintf("s=0; while [ $s -lt %d ] && [ $s -lt $n ]; do", slots),
		fmt.Sprintf("  i=$((s + %d*((n-1-s)/%d)))", slots, slots),
		fmt.Sprintf("  guestcmd verify -dev /dev/vda -seed $((1000+i)) -off %s -len %d -bs 65536 -direct", slotOf("i"), chunk),
		"  s=$((s+1))",
		"done",
	)

	dir := filepath.Join(e.work, "migrate")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd")
	// Both QEMUs have a control port: open it first, as boot does.
	if err := e.writeInitrd(initrd, "open_host\n"+guest); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*e.timeout)
	defer cancel()
	type vm struct {
		name, console, ctl, qmp string
		cmd                     *exec.Cmd
		out                     lockedBuffer
		done                    chan error
	}
	start := func(name, sock string, extra ...string) *vm {
		v := &vm{name: name, console: filepath.Join(dir, name+"-console.log"), ctl: filepath.Join(dir, name+"-ctl.sock"), qmp: filepath.Join(dir, name+"-qmp.sock"), done: make(chan error, 1)}
		args := e.qemuArgs(sock, initrd, v.console, v.ctl, vmOpts{control: true})
		args = append(args, "-qmp", "unix:"+v.qmp+",server=on,wait=off")
		args = append(args, extra...)
		e.record(args, true)
		v.cmd = exec.CommandContext(ctx, args[0], args[1:]...)
		v.cmd.Stdout, v.cmd.Stderr = &v.out, &v.out
		if err := v.cmd.Start(); err != nil {
			t.Fatalf("starting %s QEMU: %v", name, err)
		}
		go func() { v.done <- v.cmd.Wait() }()
		t.Cleanup(func() { v.cmd.Process.Kill() })
		return v
	}
	src := start("source", b.sock)
	dst := start("destination", b.sock2, "-incoming", "defer")
	fail := func(why string) {
		t.Helper()
		src.cmd.Process.Kill()
		dst.cmd.Process.Kill()
		sc, _ := os.ReadFile(src.console)
		dc, _ := os.ReadFile(dst.console)
		t.Fatalf("%s\n--- source QEMU ---\n%s\n--- source console ---\n%s\n--- destination QEMU ---\n%s\n--- destination console ---\n%s\n--- backend log ---\n%s",
			why, src.out.String(), tailString(string(sc), 40), dst.out.String(), tailString(string(dc), 40), tail(b.log, 40))
	}
	waitConsole := func(v *vm, marker string) {
		for {
			if c, _ := os.ReadFile(v.console); strings.Contains(string(c), marker) {
				return
			}
			select {
			case err := <-v.done:
				fail(fmt.Sprintf("%s QEMU exited (%v) before its console showed %q", v.name, err, marker))
			case <-ctx.Done():
				fail(fmt.Sprintf("%s console showed no %q before the timeout", v.name, marker))
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	// The stream is under way on the source.
	waitConsole(src, "CHUNK 2")
	srcQ, dstQ := dialQMP(ctx, t, src.qmp), dialQMP(ctx, t, dst.qmp)
	mig := "unix:" + filepath.Join(dir, "migration.sock")
	if _, err := dstQ.cmd("migrate-incoming", map[string]any{"uri": mig}); err != nil {
		fail(fmt.Sprintf("migrate-incoming: %v", err))
	}
	if _, err := srcQ.cmd("migrate", map[string]any{"uri": mig}); err != nil {
		fail(fmt.Sprintf("migrate: %v", err))
	}
	e.note("# QMP: migrate-incoming on the destination, migrate on the source")
	for {
		r, err := srcQ.cmd("query-migrate", nil)
		if err != nil {
			fail(fmt.Sprintf("query-migrate: %v", err))
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		_ = json.Unmarshal(r, &st)
		if st.Status == "completed" {
			break
		}
		if st.Status == "failed" || st.Status == "cancelled" {
			fail(fmt.Sprintf("migration %s: %s", st.Status, st.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			fail("migration did not complete before the timeout")
		case <-time.After(100 * time.Millisecond):
		}
	}
	before, _ := os.ReadFile(src.console)
	t.Logf("migration completed; the source wrote %d chunks", strings.Count(string(before), "CHUNK "))
	// The guest now runs on the destination: tell it to stop the stream.
	c, err := net.Dial("unix", dst.ctl)
	if err != nil {
		fail(fmt.Sprintf("destination control port: %v", err))
	}
	defer c.Close()
	if _, err := c.Write([]byte("MIGRATED\n")); err != nil {
		fail(fmt.Sprintf("destination control port: %v", err))
	}
	if _, err := srcQ.cmd("quit", nil); err != nil {
		t.Logf("quit on the source: %v", err)
	}
	if err := <-src.done; err != nil {
		t.Logf("source QEMU: %v", err)
	}
	var derr error
	select {
	case derr = <-dst.done:
	case <-ctx.Done():
		fail("the destination guest did not power off before the timeout")
	}
	dc, _ := os.ReadFile(dst.console)
	out := string(dc)
	if derr != nil {
		fail(fmt.Sprintf("destination QEMU: %v", derr))
	}
	if m := regexp.MustCompile(resultMark + `(PASS|FAIL[^\r\n]*)`).FindStringSubmatch(out); m == nil || m[1] != "PASS" {
		fail(fmt.Sprintf("destination guest result %q", m))
	}
	if strings.Count(out, "CHUNK ") < 9 {
		fail("the stream did not go on on the destination")
	}
	m := regexp.MustCompile(`STREAM (\d+)`).FindStringSubmatch(out)
	if m == nil {
		fail("no STREAM line on the destination console")
	}
	n, _ := strconv.Atoi(m[1])
	t.Logf("stream of %d chunks, %d of them written after the switch", n, strings.Count(out, "CHUNK "))
	b.stop(t)
	e.check(t, img)
	want := e.newExpected(t, img)
	want.write(t, fixed.seed, fixed.off, fixed.len)
	for s := 0; s < slots && s < n; s++ {
		i := s + slots*((n-1-s)/slots)
		want.write(t, uint64(1000+i), int64(i%slots)*chunk, chunk)
	}
	e.compare(t, img, want)
}

// qmpConn is a minimal QMP client (docs/interop/qmp-spec): one command at a
// time, events skipped.
type qmpConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialQMP(ctx context.Context, t *testing.T, path string) *qmpConn {
	t.Helper()
	var c net.Conn
	for {
		var err error
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("QMP socket %s: %v", path, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Cleanup(func() { c.Close() })
	q := &qmpConn{c: c, r: bufio.NewReader(c)}
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		t.Fatalf("QMP greeting: %v", err)
	}
	if _, err := q.cmd("qmp_capabilities", nil); err != nil {
		t.Fatalf("qmp_capabilities: %v", err)
	}
	return q
}

// cmd runs one command and returns its "return" value.
func (q *qmpConn) cmd(name string, args map[string]any) (json.RawMessage, error) {
	req := map[string]any{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, err
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class, Desc string
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %q: %w", line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("%s: %s", resp.Error.Class, resp.Error.Desc)
		default:
			return resp.Return, nil
		}
	}
}

// lockedBuffer collects a QEMU's output. exec copies the output from a
// goroutine of its own until Wait returns, and a failing test reads it
// right after killing QEMU, maybe before that copy ended: the mutex keeps
// the two apart (a data race under -race otherwise).
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
