package qemu_test

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
)

// The control socket of a daemon serving a real guest: status shows the
// guest's virtio driver connected with its negotiated features and its
// queue running, stats count the guest's writes, flush succeeds, all while
// the guest waits with its I/O done.
func TestControlSocketReportsARunningGuestAndCountsItsWrites(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("the control socket is vhost-vhdx's")
	}
	img := e.newImage(t, "ctl.vhdx", 16*mib, 512)
	r := region{seed: 41, off: 2 * mib, len: 512 * 1024}
	want := e.newExpected(t, img)
	want.write(t, r.seed, r.off, r.len)
	b := e.startBackend(t, img, backendOpts{controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(64*1024, r),
			"echo WRITTEN",
			"wait_host CHECKED",
			verifies(4096, r),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("WRITTEN")
			call, closeCtl := ctlClient(g, b.ctl)
			defer closeCtl()
			var st struct {
				FrontEnd struct {
					Connected    bool     `json:"connected"`
					FeatureNames []string `json:"feature_names"`
					Queues       []struct {
						Started, Enabled bool
					} `json:"queues"`
				} `json:"front_end"`
				Chain []struct {
					AllocatedBytes int64 `json:"allocated_bytes"`
				} `json:"chain"`
			}
			call("status", nil, &st)
			fe := st.FrontEnd
			if !fe.Connected || len(fe.Queues) < 1 || !fe.Queues[0].Started || !fe.Queues[0].Enabled || !slices.Contains(fe.FeatureNames, "VERSION_1") {
				g.failGuest(fmt.Sprintf("status with a guest running: %+v", fe))
			}
			if len(st.Chain) != 1 || st.Chain[0].AllocatedBytes == 0 {
				g.failGuest(fmt.Sprintf("status chain %+v after the guest wrote", st.Chain))
			}
			var stats struct {
				Total blk.QueueSnapshot `json:"total"`
			}
			call("stats", nil, &stats)
			w := stats.Total.Ops["write"]
			if w.Bytes < uint64(r.len) || w.Ops < uint64(r.len/(64*1024)) || w.Errors != 0 || w.P50 == 0 {
				g.failGuest(fmt.Sprintf("stats after the guest wrote %d bytes: %+v", r.len, w))
			}
			call("flush", nil, nil)
			g.send("CHECKED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// A live checkpoint while a real guest writes: what the guest wrote before
// stays in the old top, which qemu-img then reads as exactly that; what it
// writes after goes to the new child; the guest reads both back without an
// error, and the chain converts to exactly everything the guest wrote.
func TestLiveCheckpointUnderARealGuestSplitsItsWritesAtOneInstant(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("checkpoint is vhost-vhdx's")
	}
	img := e.newImage(t, "base.vhdx", 16*mib, 512)
	before := region{seed: 51, off: mib, len: mib}
	after := region{seed: 52, off: mib + mib/2, len: mib} // overwrites half of before
	wantBase := e.newExpected(t, img)
	wantBase.write(t, before.seed, before.off, before.len)
	top := &image{path: filepath.Join(e.work, "checkpoint.vhdx"), size: img.size, logicalSector: 512}
	wantTop := e.newExpected(t, top)
	wantTop.write(t, before.seed, before.off, before.len)
	wantTop.write(t, after.seed, after.off, after.len)

	b := e.startBackend(t, img, backendOpts{controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(64*1024, before),
			"echo WRITTEN",
			"wait_host CHECKPOINTED",
			writes(64*1024, after),
			verifies(4096, region{seed: before.seed, off: before.off, len: before.len / 2}, after),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("WRITTEN")
			var rep struct {
				Top, Parent string
				Depth       int
			}
			ctlCall(g, b.ctl, "checkpoint", map[string]string{"path": top.path}, &rep)
			if rep.Top != top.path || rep.Depth != 1 {
				g.failGuest(fmt.Sprintf("checkpoint reply %+v", rep))
			}
			g.send("CHECKPOINTED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, wantBase) // qemu-img reads the frozen old top
	out := e.run(t, e.daemon, "check", top.path)
	t.Logf("vhost-vhdx check %s: %s", filepath.Base(top.path), strings.TrimSpace(out))
	raw := top.path + ".raw"
	e.run(t, e.daemon, "convert", "-O", "raw", top.path, raw)
	if off, err := firstDifference(raw, wantTop.path); err != nil {
		t.Fatal(err)
	} else if off >= 0 {
		t.Fatalf("the chain differs from what the guest wrote at byte %d", off)
	}
}

// ctl resize while a real guest runs: the guest's kernel sees the new
// capacity (dmesg "detected capacity change", /sys/block/vda/size) and
// writes and reads past the old end with no I/O error; the data written
// before is intact.
func TestGuestSeesOnlineResizeAndWritesPastTheOldEnd(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("resize is vhost-vhdx's")
	}
	const small, big = 16 * mib, 48 * mib
	img := e.newImage(t, "grow.vhdx", small, 512)
	before := region{seed: 61, off: small - mib, len: mib}
	past := region{seed: 62, off: big - 2*mib, len: 2 * mib}
	b := e.startBackend(t, img, backendOpts{controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(64*1024, before),
			expect("sectors before", "$(cat /sys/block/vda/size)", fmt.Sprint(small/512)),
			"echo READY",
			"wait_host RESIZED",
			"i=0; while [ \"$(cat /sys/block/vda/size)\" != "+fmt.Sprint(big/512)+" ]; do i=$((i+1)); [ $i -gt 300 ] && fail 'capacity did not change'; sleep 0.1; done",
			"dmesg | grep -q 'detected capacity change' || fail 'no capacity change in dmesg'",
			"echo ok: dmesg reports the capacity change",
			writes(64*1024, past),
			verifies(4096, before, past),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("READY")
			var rep struct {
				NewSize  uint64 `json:"new_size"`
				Notified bool   `json:"notified"`
			}
			ctlCall(g, b.ctl, "resize", map[string]string{"size": fmt.Sprintf("+%d", big-small)}, &rep)
			if rep.NewSize != uint64(big) || !rep.Notified {
				g.failGuest(fmt.Sprintf("resize reply %+v", rep))
			}
			g.send("RESIZED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	want := e.newExpected(t, &image{path: img.path, size: big, logicalSector: 512})
	want.write(t, before.seed, before.off, before.len)
	want.write(t, past.seed, past.off, past.len)
	e.compare(t, img, want)
}
