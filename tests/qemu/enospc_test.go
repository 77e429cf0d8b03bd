package qemu_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// A real guest fills the host file system under its disk (issue 13 item 2):
// the image lives on a 16 MiB tmpfs (vhdxtest.SmallFS), the guest writes a
// pattern while there is space, then the host fills the file system with a
// filler file and the guest writes a fresh region, which needs new 1 MiB
// blocks. The host frees space by removing the filler; the same daemon,
// never restarted, takes the write. Both regions verify in the guest and
// the image checks clean and compares equal to what the guest wrote.

// fullDiskImage creates a dynamic 64 MiB image (qemu-img, 1 MiB blocks) on
// a fresh 16 MiB tmpfs and returns it with the filler's path there.
func fullDiskImage(t *testing.T, e *env) (*image, string) {
	t.Helper()
	if e.backend != backendVhostVHDX {
		t.Skip("--on-enospc is vhost-vhdx's")
	}
	dir := vhdxtest.SmallFS(t, 16*mib)
	img := &image{path: filepath.Join(dir, "full.vhdx"), size: 64 * mib, logicalSector: 512}
	e.run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", img.path, fmt.Sprint(img.size))
	return img, filepath.Join(dir, "filler")
}

// fillHostDisk waits until the guest wrote the region before, fills the
// host file system with filler and tells the guest (FULL).
func fillHostDisk(t *testing.T, e *env, g *guestRun, filler string) {
	t.Helper()
	g.waitFor("WROTE-BEFORE.")
	n := vhdxtest.FillUp(t, filler)
	e.note(fmt.Sprintf("# host: filled the file system with %d bytes", n))
	g.send("FULL")
}

// freeHostDisk removes the filler, giving the host file system its space
// back.
func freeHostDisk(e *env, g *guestRun, filler string) {
	if err := os.Remove(filler); err != nil {
		g.failGuest(err.Error())
	}
	e.note("# host: removed the filler")
}

// The regions: before is written while there is space; after needs four
// fresh blocks that do not fit until the filler is removed.
var (
	enospcBefore = region{seed: 1301, off: 0, len: 2 * mib}
	enospcAfter  = region{seed: 1302, off: 8 * mib, len: 4 * mib}
)

// TestGuestWriteToAFullHostDiskFailsThenSucceedsOnceSpaceIsFreed: with
// --on-enospc report the guest's write gets an I/O error, what it wrote
// before still verifies, and after the host frees space the same write
// succeeds without a daemon restart.
func TestGuestWriteToAFullHostDiskFailsThenSucceedsOnceSpaceIsFreed(t *testing.T) {
	e := newEnv(t)
	img, filler := fullDiskImage(t, e)
	want := e.newExpected(t, img)
	want.write(t, enospcBefore.seed, enospcBefore.off, enospcBefore.len)
	want.write(t, enospcAfter.seed, enospcAfter.off, enospcAfter.len)
	const bs = 64 * 1024
	b := e.startBackend(t, img, backendOpts{onENOSPC: "report"})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(bs, enospcBefore),
			"echo WROTE-BEFORE.",
			"wait_host FULL",
			`expect_fail "write to a full host disk" `+enospcAfter.guestWrite("/dev/vda", bs),
			verifies(bs, enospcBefore),
			"echo FAILED-AS-EXPECTED.",
			"wait_host FREED",
			writes(bs, enospcAfter),
			verifies(bs, enospcBefore, enospcAfter),
		),
		during: func(g *guestRun) *backend {
			fillHostDisk(t, e, g, filler)
			g.waitFor("FAILED-AS-EXPECTED.")
			freeHostDisk(e, g, filler)
			g.send("FREED")
			return b
		},
	})
	b.stop(t)
	if log, _ := os.ReadFile(b.log); !strings.Contains(string(log), "no space left on device") {
		t.Errorf("the backend log does not report the full disk:\n%s", tail(b.log, 20))
	}
	e.check(t, img)
	e.compare(t, img, want)
}

// TestGuestWriteToAFullHostDiskWaitsUntilSpaceIsFreed: with --on-enospc
// wait the guest's write does not complete while the host disk is full
// (the control socket shows it waiting), completes once the host frees
// space, and verifies; the backend logs the episode's start and end once.
func TestGuestWriteToAFullHostDiskWaitsUntilSpaceIsFreed(t *testing.T) {
	e := newEnv(t)
	img, filler := fullDiskImage(t, e)
	want := e.newExpected(t, img)
	want.write(t, enospcBefore.seed, enospcBefore.off, enospcBefore.len)
	want.write(t, enospcAfter.seed, enospcAfter.off, enospcAfter.len)
	const bs = 64 * 1024
	b := e.startBackend(t, img, backendOpts{onENOSPC: "wait", controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(bs, enospcBefore),
			"echo WROTE-BEFORE.",
			"wait_host FULL",
			writes(bs, enospcAfter),
			"echo WROTE-AFTER.",
			verifies(bs, enospcBefore, enospcAfter),
		),
		during: func(g *guestRun) *backend {
			fillHostDisk(t, e, g, filler)
			call, closeCtl := ctlClient(g, b.ctl)
			defer closeCtl()
			var st struct {
				ENOSPC struct {
					Policy   string     `json:"policy"`
					Waiting  int        `json:"waiting"`
					Since    *time.Time `json:"since"`
					Episodes uint64     `json:"episodes"`
				} `json:"enospc"`
			}
			deadline := time.Now().Add(90 * time.Second)
			for {
				call("status", nil, &st)
				if st.ENOSPC.Waiting > 0 {
					break
				}
				if time.Now().After(deadline) {
					g.failGuest(fmt.Sprintf("no write waiting for space 90 s after the host filled the disk: %+v", st.ENOSPC))
				}
				time.Sleep(100 * time.Millisecond) // polling the daemon's state, not timing it
			}
			if st.ENOSPC.Policy != "wait" || st.ENOSPC.Since == nil || st.ENOSPC.Episodes != 1 {
				g.failGuest(fmt.Sprintf("status enospc while held: %+v", st.ENOSPC))
			}
			if c, _ := os.ReadFile(g.console); strings.Contains(string(c), "WROTE-AFTER.") {
				g.failGuest("the guest's write completed while a write was held for space")
			}
			freeHostDisk(e, g, filler)
			g.waitFor("WROTE-AFTER.")
			return b
		},
	})
	b.stop(t)
	log, _ := os.ReadFile(b.log)
	if full, back := strings.Count(string(log), "host file system full"), strings.Count(string(log), "host space is back"); full != 1 || back != 1 {
		t.Errorf("backend log has %d 'full' and %d 'space is back' lines, want one each:\n%s", full, back, tail(b.log, 20))
	}
	e.check(t, img)
	e.compare(t, img, want)
}
