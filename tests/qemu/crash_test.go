package qemu_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/tests/qemu/pattern"
)

// Crash consistency with a real guest (issue 5, item 2): the guest writes a
// stream of fsync'd O_DIRECT writes, each at the start of a new 1 MiB VHDX
// block so every one allocates (data, journaled BAT update, file growth),
// and prints an acknowledgement after each fsync returns. The backend is
// SIGKILLed in the middle of the stream. The image as the dead process left
// it must hold every write the guest saw acknowledged, read two
// independent ways: by QEMU after `qemu-img check -r all` (which replays our
// log) on one copy, and by vhost-vhdx after `check --repair` (our replay) on
// another. Then the backend is restarted, the guest (chardev reconnect=1)
// finishes its stream and the whole image is verified as usual.
func TestKilledBackendKeepsEveryAcknowledgedAllocatingWrite(t *testing.T) {
	e := newEnv(t)
	if e.backend == backendQSD {
		t.Skip("qemu-storage-daemon offers no INFLIGHT_SHMFD: the guest cannot finish after the restart")
	}
	const (
		writes   = 160
		writeLen = 64 * 1024
		seed     = 300
		killAt   = 12 // acknowledgements seen before the kill
	)
	img := e.newImage(t, "crash-acked.vhdx", 192*mib, 512)
	want := e.newExpected(t, img)
	all := make([]region, writes)
	for i := range all {
		all[i] = region{seed: seed, off: int64(i) * mib, len: writeLen}
		want.write(t, seed, all[i].off, writeLen)
	}

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{
		reconnect: true,
		script: script(
			"i=0",
			fmt.Sprintf("while [ $i -lt %d ]; do", writes),
			fmt.Sprintf("  guestcmd write -dev /dev/vda -seed %d -off $((i*%d)) -len %d -bs %d -direct >/dev/null", seed, mib, writeLen, writeLen),
			`  echo "ACKED $i."`,
			"  i=$((i+1))",
			"done",
			verifies(writeLen, all...),
		),
		during: func(g *guestRun) *backend {
			g.waitFor(fmt.Sprintf("ACKED %d.", killAt))
			b.kill(t)
			// Acknowledgements on the console now were all given before the
			// kill: no request completes without the backend.
			console, err := os.ReadFile(g.console)
			if err != nil {
				t.Fatal(err)
			}
			acked := -1
			for _, m := range regexp.MustCompile(`ACKED (\d+)\.`).FindAllStringSubmatch(string(console), -1) {
				n, _ := strconv.Atoi(m[1])
				acked = max(acked, n)
			}
			if acked >= writes-1 {
				t.Fatalf("the guest finished all %d writes before the kill: the test did not crash mid-stream", writes)
			}
			if acked < killAt {
				t.Fatalf("console shows ACKED %d, but the test waited for %d", acked, killAt)
			}
			t.Logf("backend killed after %d acknowledged allocating writes", acked+1)
			checkAcknowledged(t, e, img, all[:acked+1])

			b = e.startBackend(t, img, backendOpts{})
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// checkAcknowledged copies the crashed image twice, repairs one copy with
// qemu-img and one with vhost-vhdx, converts both to raw and requires every
// acknowledged region in both.
func checkAcknowledged(t *testing.T, e *env, img *image, acked []region) {
	t.Helper()
	data, err := os.ReadFile(img.path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	theirs, ours := filepath.Join(dir, "qemu.vhdx"), filepath.Join(dir, "ours.vhdx")
	for _, p := range []string{theirs, ours} {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("qemu-img check -r all: %s", e.run(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", theirs))
	e.run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", theirs, theirs+".raw")
	t.Logf("vhost-vhdx check --repair: %s", e.run(t, e.daemon, "check", "--repair", ours))
	e.run(t, e.daemon, "convert", "-O", "raw", ours, ours+".raw")

	for _, raw := range []string{theirs + ".raw", ours + ".raw"} {
		f, err := os.Open(raw)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64*1024)
		for i, r := range acked {
			n := min(int64(len(buf)), r.len)
			if _, err := f.ReadAt(buf[:n], r.off); err != nil {
				t.Fatalf("%s: read acknowledged write %d: %v", raw, i, err)
			}
			if bad := pattern.Mismatch(buf[:n], r.seed, r.off); bad >= 0 {
				f.Close()
				t.Fatalf("%s: acknowledged write %d at %#x lost: byte %#x differs", filepath.Base(raw), i, r.off, r.off+int64(bad))
			}
		}
		f.Close()
	}
}
