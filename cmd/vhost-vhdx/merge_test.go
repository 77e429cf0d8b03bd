package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// callErr runs a command that must fail and returns its error text.
func (ld *liveDaemon) callErr(t *testing.T, name string, args any) string {
	t.Helper()
	cl, err := control.Dial(ld.ctl)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	err = cl.Call(context.Background(), name, args, nil)
	if err == nil {
		t.Fatalf("%s %v succeeded, want an error", name, args)
	}
	return err.Error()
}

// waitMergeEnd polls status until the merge is no longer running.
func (ld *liveDaemon) waitMergeEnd(t *testing.T) *MergeStatus {
	t.Helper()
	for {
		var st StatusReply
		ld.call(t, "status", nil, &st)
		if st.Merge == nil {
			t.Fatal("status shows no merge")
		}
		if !st.Merge.Running {
			return st.Merge
		}
		time.Sleep(20 * time.Millisecond) // polling, not a timed assertion
	}
}

// A merge started by the control command folds the checkpoint into its
// parent while the front-end writes: checkpoint, resize and a second merge
// are refused while it runs; afterwards the parent alone is the disk
// (status shows one layer, the child file is gone) and reads every write,
// live and after the daemon stops; it checks clean.
func TestMergeCommandFoldsTheTopIntoItsParentWhileTheFrontEndWrites(t *testing.T) {
	ld := startLiveDaemon(t, 2)
	f := ld.frontEnd(t, 2)
	ctx := context.Background()
	const s0, s1, s4, s9 = 0, (1 << 20) / 512, (4 << 20) / 512, (9 << 20) / 512
	write := func(q int, sector uint64, b byte) {
		r, err := f.Queues[q].Write(ctx, sector, fill4K(b))
		mustOK(t, r, err)
	}
	write(0, s0, 'A')
	if msg := ld.callErr(t, "merge", nil); !strings.Contains(msg, "no parent") {
		t.Errorf("merge of a base image: %q", msg)
	}
	for _, bad := range []any{"fast", "+1M", -5, true} {
		if msg := ld.callErr(t, "merge", map[string]any{"rate": bad}); !strings.Contains(msg, "rate") {
			t.Errorf("merge with rate %v: %q", bad, msg)
		}
	}
	cp1 := filepath.Join(filepath.Dir(ld.imgPath), "cp1.vhdx")
	ld.call(t, "checkpoint", map[string]any{"path": cp1}, nil)
	write(1, s1, 'B')
	write(0, s0, 'C')
	write(1, s4, 'X')

	// The copy is held until the refusals and writes below are done, so
	// they meet a running merge whatever the host's speed (at 1 MiB/s the
	// child's 12 KiB alone would be copied in about 12 ms).
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce) // before the daemon stops, which waits for the merge
	ld.d.beforeMergeCopy = func(context.Context) { <-release }
	var rep MergeReply
	ld.call(t, "merge", map[string]any{"rate": "1M"}, &rep)
	if rep.Top != cp1 || rep.Parent != ld.imgPath || rep.Rate != 1<<20 || rep.Total == 0 {
		t.Fatalf("merge reply %+v", rep)
	}
	for _, c := range []struct {
		name string
		args any
	}{{"merge", nil}, {"checkpoint", map[string]any{"path": cp1 + ".2"}}, {"resize", map[string]any{"size": "+1M"}}} {
		if msg := ld.callErr(t, c.name, c.args); !strings.Contains(msg, "merge") || !strings.Contains(msg, "running") {
			t.Errorf("%s during a merge: %q", c.name, msg)
		}
	}
	write(0, s4, 'D') // into a block the child holds
	write(1, s9, 'E') // into a block it does not
	code, out, stderr := runCLI(t, "ctl", ld.ctl, "status")
	if code != 0 || !strings.Contains(out, "merge:") {
		t.Errorf("ctl status during a merge: %d %q %q", code, out, stderr)
	}
	releaseOnce()
	m := ld.waitMergeEnd(t)
	if m.State != vhdx.MergeDone || m.Done != m.Total {
		t.Fatalf("merge ended %+v", m)
	}
	if _, err := os.Stat(cp1); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the merged child still exists: %v", err)
	}
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if len(st.Chain) != 1 || st.Chain[0].Path != ld.imgPath {
		t.Errorf("status chain after the merge %+v", st.Chain)
	}
	write(0, s1, 'F') // now into the parent
	want := map[uint64]byte{s0: 'C', s1: 'F', s4: 'D', s9: 'E'}
	for s, b := range want {
		if got := readBack(t, f.Queues[1], s); !bytes.Equal(got, fill4K(b)) {
			t.Errorf("front-end reads %q... at sector %d, want %c", got[:4], s, b)
		}
	}
	if !strings.Contains(ld.log.String(), "merge done") {
		t.Errorf("no log line for the merge's end:\n%s", ld.log.String())
	}
	ld.stop()
	im, err := vhdx.Open(ld.imgPath, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Parent() != nil {
		t.Error("the merged image still has a parent")
	}
	for s, b := range want {
		if got := readFile(t, im, int64(s)*512); !bytes.Equal(got, fill4K(b)) {
			t.Errorf("merged file reads %q... at sector %d, want %c", got[:4], s, b)
		}
	}
	checkClean(t, ld.imgPath)
}

// merge-cancel stops a slow merge: the chain is served as it was and reads
// the same; a merge started again completes; ctl merge --wait reports it.
func TestMergeCancelKeepsTheChainAndALaterMergeCompletes(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	f := ld.frontEnd(t, 1)
	ctx := context.Background()
	cp1 := filepath.Join(filepath.Dir(ld.imgPath), "cp1.vhdx")
	ld.call(t, "checkpoint", map[string]any{"path": cp1}, nil)
	for i := range 8 {
		r, err := f.Queues[0].Write(ctx, uint64(i)<<11, fill4K(byte('a'+i)))
		mustOK(t, r, err)
	}
	// The copy is held until the merge is cancelled, so the cancel meets
	// a running merge whatever the host's speed.
	ld.d.beforeMergeCopy = func(ctx context.Context) { <-ctx.Done() }
	ld.call(t, "merge", map[string]any{"rate": 4096}, nil)
	var m MergeStatus
	ld.call(t, "merge-cancel", nil, &m)
	if m.State != vhdx.MergeAbandoned || m.Running {
		t.Fatalf("after merge-cancel: %+v", m)
	}
	if msg := ld.callErr(t, "merge-cancel", nil); !strings.Contains(msg, "no merge") {
		t.Errorf("merge-cancel with none running: %q", msg)
	}
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if len(st.Chain) != 2 || st.Chain[0].Path != cp1 {
		t.Fatalf("chain after a cancelled merge %+v", st.Chain)
	}
	for i := range 8 {
		if got := readBack(t, f.Queues[0], uint64(i)<<11); !bytes.Equal(got, fill4K(byte('a'+i))) {
			t.Fatalf("after a cancelled merge, sector %d reads %q...", i<<11, got[:4])
		}
	}
	ld.d.beforeMergeCopy = nil
	code, out, stderr := runCLI(t, "ctl", ld.ctl, "merge", "--rate", "0", "--wait") // 0: unbounded
	if code != 0 || !strings.Contains(out, "merge:       done") {
		t.Fatalf("ctl merge --wait: %d %q %q", code, out, stderr)
	}
	for i := range 8 {
		if got := readBack(t, f.Queues[0], uint64(i)<<11); !bytes.Equal(got, fill4K(byte('a'+i))) {
			t.Fatalf("after the merge, sector %d reads %q...", i<<11, got[:4])
		}
	}
	if _, err := os.Stat(cp1); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the merged child still exists: %v", err)
	}
}
