package qemu_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// records is a stream of n 64 KiB records from off, step apart, record i
// tagged with its sequence number (pattern seed first+i): the guest writes
// them in order with O_DIRECT and prints "ACKED i." once each returned.
type records struct {
	first uint64
	n     int
	off   int64
	step  int64
}

const recordLen = 64 * 1024

func (r records) region(i int) region {
	return region{seed: r.first + uint64(i), off: r.off + int64(i)*r.step, len: recordLen}
}

func (r records) all() []region {
	out := make([]region, r.n)
	for i := range out {
		out[i] = r.region(i)
	}
	return out
}

func (r records) guestStream() string {
	return script(
		"i=0",
		fmt.Sprintf("while [ $i -lt %d ]; do", r.n),
		fmt.Sprintf("  guestcmd write -dev /dev/vda -seed $((%d+i)) -off $((%d+i*%d)) -len %d -bs %d -direct >/dev/null", r.first, r.off, r.step, recordLen, recordLen),
		`  echo "ACKED $i."`,
		"  i=$((i+1))",
		"done",
	)
}

// ctlCall runs one control command for a guest test on a connection of
// its own, failing the guest on an error.
func ctlCall(g *guestRun, sock, name string, args, ret any) {
	call, closeCtl := ctlClient(g, sock)
	defer closeCtl()
	call(name, args, ret)
}

// ctlClient connects a guest test to the control socket sock: call runs
// one command on that connection, with a minute to answer, failing the
// guest on an error; closeCtl closes the connection.
func ctlClient(g *guestRun, sock string) (call func(name string, args, ret any), closeCtl func()) {
	cl, err := control.Dial(sock)
	if err != nil {
		g.failGuest("control socket: " + err.Error())
	}
	call = func(name string, args, ret any) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := cl.Call(ctx, name, args, ret); err != nil {
			g.failGuest(name + ": " + err.Error())
		}
	}
	return call, func() { cl.Close() }
}

// mergeState is the merge part of status.
type mergeState struct {
	State    string `json:"state"`
	Done     int64  `json:"done"`
	Total    int64  `json:"total"`
	Recopied int64  `json:"recopied"`
	Running  bool   `json:"running"`
}

func mergeStatus(g *guestRun, sock string) mergeState {
	var st struct {
		Merge *mergeState `json:"merge"`
	}
	ctlCall(g, sock, "status", nil, &st)
	if st.Merge == nil {
		g.failGuest("status shows no merge")
	}
	return *st.Merge
}

// A real guest writes a verified stream through resize +1G, a checkpoint
// and a live merge: it writes, the disk grows and it writes past the old
// end, a checkpoint is taken and it writes over part of what it wrote,
// then a merge runs while it writes a stream of records tagged with their
// sequence numbers. The merge completes with the stream running; the
// guest reads everything back, the checkpoint file is gone, and the base
// file alone reads exactly what the guest wrote through qemu-img compare,
// our convert and libvhdi, and checks clean.
func TestLiveMergeUnderARealGuestKeepsEveryRecord(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("merge is vhost-vhdx's")
	}
	const small, big = 16 * mib, 16*mib + 1024*mib
	img := e.newImage(t, "merge.vhdx", small, 512)
	cp := filepath.Join(e.work, "merge-checkpoint.vhdx")
	first := region{seed: 71, off: mib / 2, len: 2 * mib}
	past := region{seed: 72, off: small + 3*mib, len: mib}
	over := region{seed: 73, off: mib, len: 2 * mib}
	stream := records{first: 1000, n: 48, off: 4 * mib, step: 192 * 1024}
	grown := &image{path: img.path, size: big, logicalSector: 512}
	want := e.newExpected(t, grown)
	for _, r := range append([]region{first, past, over}, stream.all()...) {
		want.write(t, r.seed, r.off, r.len)
	}

	b := e.startBackend(t, img, backendOpts{controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			writes(64*1024, first),
			"echo P1",
			"wait_host RESIZED",
			"i=0; while [ \"$(cat /sys/block/vda/size)\" != "+fmt.Sprint(big/512)+" ]; do i=$((i+1)); [ $i -gt 300 ] && fail 'capacity did not change'; sleep 0.1; done",
			writes(64*1024, past),
			"echo P2",
			"wait_host CHECKPOINTED",
			writes(64*1024, over),
			"echo STREAM",
			stream.guestStream(),
			"echo STREAMED",
			"wait_host MERGED",
			verifies(4096, region{seed: first.seed, off: first.off, len: over.off - first.off}, past, over),
			verifies(4096, stream.all()...),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("P1")
			ctlCall(g, b.ctl, "resize", map[string]string{"size": "+1G"}, nil)
			g.send("RESIZED")
			g.waitFor("P2")
			ctlCall(g, b.ctl, "checkpoint", map[string]string{"path": cp}, nil)
			g.send("CHECKPOINTED")
			g.waitFor("STREAM")
			// 2 MiB/s: the copy of the checkpoint's blocks overlaps the
			// stream, whose blocks are copied again as it goes on.
			ctlCall(g, b.ctl, "merge", map[string]any{"rate": "2M"}, nil)
			deadline := time.Now().Add(90 * time.Second)
			var m mergeState
			for m = mergeStatus(g, b.ctl); m.Running; m = mergeStatus(g, b.ctl) {
				if time.Now().After(deadline) {
					g.failGuest(fmt.Sprintf("the merge did not end in 90s: %+v", m))
				}
				time.Sleep(200 * time.Millisecond) // polling
			}
			if m.State != "done" {
				g.failGuest(fmt.Sprintf("the merge ended %+v", m))
			}
			t.Logf("merge: %+v", m)
			g.waitFor("STREAMED")
			g.send("MERGED")
			return b
		},
	})
	b.stop(t)
	if _, err := os.Stat(cp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the merged checkpoint %s still exists: %v", cp, err)
	}
	e.check(t, grown)
	e.compare(t, grown, want)
	// The disk is 1 GiB: our convert is compared by cmp (fast), libvhdi
	// (python) reads what was written and the last MiB.
	raw := img.path + ".ours.raw"
	e.run(t, e.daemon, "convert", "-O", "raw", img.path, raw)
	if out, err := e.runErr("cmp", raw, want.path); err != nil {
		t.Fatalf("vhost-vhdx convert of the merged file differs from what the guest wrote: %v\n%s", err, out)
	}
	spans := []vhdxtest.Span{{Off: 0, N: past.off + past.len + mib}, {Off: big - mib, N: mib}}
	got := vhdxtest.ReadSpansWithLibvhdi(t, img.path, nil, spans)
	for i, sp := range spans {
		w := make([]byte, sp.N)
		if _, err := want.f.ReadAt(w, sp.Off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[i], w) {
			t.Fatalf("libvhdi reads the merged file differently at byte %d", sp.Off+int64(vhdxtest.FirstDiff(got[i], w)))
		}
	}
	t.Log("libvhdi: the written part and the end of the merged file read as the guest wrote")
}

// SIGKILL of the daemon in the middle of a slow merge while the guest
// writes records: restarted with the checkpoint's path as before (the
// parent's log replayed, the merge abandoned), the daemon serves the chain
// again, the guest (reconnect=1) finishes its stream and reads every
// record, the one acknowledged before the kill included; the chain is
// valid and converts to exactly what the guest wrote.
func TestKilledDuringMergeTheRestartedDaemonServesTheChainWithEveryAcknowledgedWrite(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("merge is vhost-vhdx's")
	}
	const size = 32 * mib
	img := e.newImage(t, "kmerge.vhdx", size, 512)
	cp := &image{path: filepath.Join(e.work, "kmerge-checkpoint.vhdx"), size: size, logicalSector: 512}
	before := region{seed: 81, off: 0, len: 4 * mib}
	after := region{seed: 82, off: 2 * mib, len: 6 * mib}
	stream := records{first: 2000, n: 40, off: 12 * mib, step: 320 * 1024}
	want := e.newExpected(t, cp)
	for _, r := range append([]region{before, after}, stream.all()...) {
		want.write(t, r.seed, r.off, r.len)
	}
	const killAt = 6

	b := e.startBackend(t, img, backendOpts{controlSocket: true})
	e.boot(t, b, "boot", vmOpts{
		control:   true,
		reconnect: true,
		script: script(
			writes(64*1024, before),
			"echo P1",
			"wait_host CHECKPOINTED",
			writes(64*1024, after),
			"echo P2",
			"wait_host MERGING",
			stream.guestStream(),
			verifies(4096, region{seed: before.seed, off: before.off, len: after.off - before.off}, after),
			verifies(4096, stream.all()...),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("P1")
			ctlCall(g, b.ctl, "checkpoint", map[string]string{"path": cp.path}, nil)
			g.send("CHECKPOINTED")
			g.waitFor("P2")
			// 512 KiB/s for 6 MiB: the merge is mid-way at the kill.
			ctlCall(g, b.ctl, "merge", map[string]any{"rate": "512K"}, nil)
			g.send("MERGING")
			g.waitFor(fmt.Sprintf("ACKED %d.", killAt))
			// Mid-way: at least one block copied (2 s at this rate) and
			// the merge still running (12 s in all).
			m := mergeStatus(g, b.ctl)
			for deadline := time.Now().Add(60 * time.Second); m.Running && m.Done == 0 && time.Now().Before(deadline); m = mergeStatus(g, b.ctl) {
				time.Sleep(100 * time.Millisecond) // polling
			}
			if !m.Running || m.Done == 0 {
				g.failGuest(fmt.Sprintf("at the kill the merge is not mid-way: %+v", m))
			}
			t.Logf("killing the daemon mid-merge: %+v", m)
			b.kill(t)
			b = e.startBackend(t, cp, backendOpts{controlSocket: true})
			return b
		},
	})
	b.stop(t)
	if _, err := os.Stat(cp.path); err != nil {
		t.Fatalf("the checkpoint is gone after an interrupted merge: %v", err)
	}
	e.run(t, e.daemon, "check", cp.path)
	e.run(t, e.daemon, "check", img.path)
	raw := cp.path + ".ours.raw"
	e.run(t, e.daemon, "convert", "-O", "raw", cp.path, raw)
	sameAsExpected(t, "vhost-vhdx convert of the chain after the kill", raw, want)
	libvhdi := cp.path + ".libvhdi.raw"
	e.libvhdiToRaw(t, cp.path, libvhdi, img.path)
	sameAsExpected(t, "libvhdi reading the chain after the kill", libvhdi, want)
}
