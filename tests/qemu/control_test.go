package qemu_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/control"
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
			cl, err := control.Dial(b.ctl)
			if err != nil {
				g.failGuest("control socket: " + err.Error())
			}
			defer cl.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
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
			if err := cl.Call(ctx, "status", nil, &st); err != nil {
				g.failGuest("status: " + err.Error())
			}
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
			if err := cl.Call(ctx, "stats", nil, &stats); err != nil {
				g.failGuest("stats: " + err.Error())
			}
			w := stats.Total.Ops["write"]
			if w.Bytes < uint64(r.len) || w.Ops < uint64(r.len/(64*1024)) || w.Errors != 0 || w.P50 == 0 {
				g.failGuest(fmt.Sprintf("stats after the guest wrote %d bytes: %+v", r.len, w))
			}
			if err := cl.Call(ctx, "flush", nil, nil); err != nil {
				g.failGuest("flush: " + err.Error())
			}
			g.send("CHECKED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
