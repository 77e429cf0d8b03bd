package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// fakeStatsDaemon serves a control socket whose stats command returns the
// given replies in turn (the last one again when they run out), and
// records whether each call asked for the histograms.
func fakeStatsDaemon(t *testing.T, replies []StatsReply) (sock string, asked func() []bool) {
	t.Helper()
	sock = filepath.Join(shortDir(t), "ctl.sock")
	ln, err := control.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var buckets []bool
	n := 0
	cmd := control.Command{Name: "stats", Run: func(_ context.Context, c *control.Call) (any, error) {
		var a struct {
			Buckets bool `json:"buckets"`
		}
		if err := c.Decode(&a); err != nil {
			return nil, err
		}
		mu.Lock()
		defer mu.Unlock()
		buckets = append(buckets, a.Buckets)
		r := replies[min(n, len(replies)-1)]
		n++
		return r, nil
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		control.Serve(ctx, ln, control.Options{Commands: []control.Command{cmd}})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return sock, func() []bool {
		mu.Lock()
		defer mu.Unlock()
		return append([]bool(nil), buckets...)
	}
}

// reads is a stats reply with n reads in total, lat[i] of them in the
// bucket of latency ns i, taken at uptime s seconds.
func reads(s int64, lat map[uint64]uint64) StatsReply {
	var o blk.OpSnapshot
	var hist [blk.NumBuckets]uint64
	for ns, k := range lat {
		o.Ops += k
		o.Bytes += 4096 * k
		hist[bucketIndex(ns)] += k
	}
	for b, v := range hist {
		if v != 0 {
			o.Buckets = append(o.Buckets, blk.Bucket{uint64(b), v})
		}
	}
	return StatsReply{UptimeNS: s * 1e9, Total: blk.QueueSnapshot{Queue: -1, Ops: map[string]blk.OpSnapshot{"read": o}}}
}

// bucketIndex is the histogram bucket of ns.
func bucketIndex(ns uint64) int {
	for b := 0; b < blk.NumBuckets; b++ {
		if _, hi := blk.BucketBounds(b); ns <= hi {
			return b
		}
	}
	return blk.NumBuckets - 1
}

func TestStatsWatchPrintsPercentilesOfEachIntervalNotSinceStart(t *testing.T) {
	const fast, slow = 1000, 10_000_000 // 1 µs, 10 ms
	sock, asked := fakeStatsDaemon(t, []StatsReply{
		reads(10, map[uint64]uint64{fast: 1000}),
		reads(11, map[uint64]uint64{fast: 2000}),            // +1000 fast reads in 1 s
		reads(13, map[uint64]uint64{fast: 2000, slow: 100}), // +100 slow reads in 2 s
	})
	code, out, stderr := runCLI(t, "ctl", sock, "stats", "--watch", "--interval", "10ms", "--count", "2", "--json")
	if code != 0 {
		t.Fatalf("ctl stats --watch: %d %s", code, stderr)
	}
	var lines []watchLine
	for _, s := range strings.Split(strings.TrimSpace(out), "\n") {
		var l watchLine
		if err := json.Unmarshal([]byte(s), &l); err != nil {
			t.Fatalf("line %q: %v", s, err)
		}
		lines = append(lines, l)
	}
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2:\n%s", len(lines), out)
	}
	_, fastHi := blk.BucketBounds(bucketIndex(fast))
	_, slowHi := blk.BucketBounds(bucketIndex(slow))
	if l := lines[0]; l.ReadOps != 1000 || l.ReadBytes != 1000*4096 || l.ReadP50 != fastHi || l.ReadP99 != fastHi {
		t.Errorf("first interval: %+v, want 1000 reads/s at p50 = p99 = %d", l, fastHi)
	}
	// Since the start, p50 is still the fast reads'; in the interval only
	// the slow ones ran.
	if l := lines[1]; l.ReadOps != 50 || l.ReadP50 != slowHi || l.ReadP99 != slowHi || l.WriteP99 != 0 {
		t.Errorf("second interval: %+v, want 50 reads/s at p50 = p99 = %d, no writes", l, slowHi)
	}
	for i, b := range asked() {
		if !b {
			t.Errorf("stats call %d did not ask for the histograms", i)
		}
	}

	// The text form shows the same interval.
	sock, _ = fakeStatsDaemon(t, []StatsReply{reads(11, map[uint64]uint64{fast: 2000}), reads(13, map[uint64]uint64{fast: 2000, slow: 100})})
	code, out, _ = runCLI(t, "ctl", sock, "stats", "--watch", "--interval", "10ms", "--count", "1")
	if fields := strings.Fields(strings.Split(strings.TrimSpace(out), "\n")[1]); code != 0 || len(fields) != 11 || fields[8] != dur(slowHi) {
		t.Errorf("text line %q, want read p99 %s", out, dur(slowHi))
	}
}

func TestImageCountersCountSinceStartAcrossCheckpointAndResize(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	f := ld.frontEnd(t, 1)
	ctx := context.Background()
	data := bytes.Repeat([]byte{0x5a}, 4096)
	write := func(mib uint64) {
		t.Helper()
		r, err := f.Queues[0].Write(ctx, mib<<20/512, data)
		mustOK(t, r, err)
	}
	var s StatsReply
	write(0)
	write(1)
	write(2)
	ld.call(t, "stats", nil, &s)
	if s.Image.Allocations != 3 || s.ImageTop != s.Image {
		t.Fatalf("before: image %+v top %+v, want 3 allocations in both", s.Image, s.ImageTop)
	}
	base := s.Image
	// Resize reopens the top; a differencing top cannot be resized yet,
	// so resize comes first.
	ld.call(t, "resize", map[string]any{"size": "+64M"}, nil)
	write(70)
	ld.call(t, "stats", nil, &s)
	if s.ImageTop.Allocations != 1 || s.Image.Allocations != 4 || s.Image.JournalCommits != base.JournalCommits+s.ImageTop.JournalCommits {
		t.Errorf("after resize: image %+v top %+v, want 4 allocations since start, 1 in the reopened top", s.Image, s.ImageTop)
	}
	base = s.Image
	ld.call(t, "checkpoint", map[string]any{"path": filepath.Join(filepath.Dir(ld.imgPath), "child.vhdx")}, nil)
	write(3)
	write(4)
	ld.call(t, "stats", nil, &s)
	if s.ImageTop.Allocations != 2 || s.Image.Allocations != 6 || s.Image.JournalCommits != base.JournalCommits+s.ImageTop.JournalCommits {
		t.Errorf("after checkpoint: image %+v top %+v, want 6 allocations since start, 2 in the new top", s.Image, s.ImageTop)
	}
	if s.Total.Ops["write"].Ops != 6 {
		t.Errorf("%d writes counted, want 6", s.Total.Ops["write"].Ops)
	}
}

// status keeps its front_end fields (the active front-end) and adds one
// frontends entry per socket; ctl status lists the sockets when there are
// several.
func TestStatusListsEachSocketsFrontEndAndKeepsTheActiveOnesFields(t *testing.T) {
	st := StatusReply{Chain: []LayerStatus{{Path: "/x.vhdx", Type: "dynamic"}}, FrontEnd: vhostuser.DeviceStatus{
		Connected: true, Conn: 7, Connections: 7, FeatureNames: []string{"VERSION_1"}, ProtocolNames: []string{},
		Queues: []vhostuser.QueueStatus{{Index: 0, Started: true, Enabled: true}},
		Frontends: []vhostuser.FrontendStatus{
			{Socket: "/run/a.sock", Connected: true, Active: true, Conn: 7, Queues: []vhostuser.QueueStatus{{Index: 0, Started: true}}},
			{Socket: "/run/b.sock"},
		},
	}}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		FrontEnd map[string]any `json:"front_end"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"connected", "conn", "connections", "features", "feature_names", "queues", "frontends"} {
		if _, ok := raw.FrontEnd[k]; !ok {
			t.Errorf("front_end lacks %q: %s", k, b)
		}
	}
	var out bytes.Buffer
	if err := printReply(&out, "status", b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/run/a.sock: connection 7, active, 1 queues started", "/run/b.sock: not connected", "connected (connection 7"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("ctl status lacks %q:\n%s", want, out.String())
		}
	}
}

// The daemon on two sockets: status lists both sockets from the start and
// shows which one's front-end is connected and active.
func TestDaemonOnTwoSocketsReportsEachSocketsFrontEnd(t *testing.T) {
	bin := daemonBinary(t)
	dir := shortDir(t)
	img := newImage(t, dir)
	a, b, ctl := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock"), filepath.Join(dir, "ctl.sock")
	cmd := exec.Command(bin, "serve", "--socket-path", a, "--socket-path", b, "--control-socket", ctl, img)
	d := startDaemon(t, cmd)
	d.waitFor(t, "control socket listening")
	status := func() StatusReply {
		t.Helper()
		code, out, stderr := runCLI(t, "ctl", ctl, "status", "--json")
		var st StatusReply
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("ctl status --json: %d %q %q", code, out, stderr)
		}
		return st
	}
	// The control socket may be up before both Serve calls listed theirs.
	st := status()
	for len(st.FrontEnd.Frontends) < 2 {
		runtime.Gosched()
		st = status()
	}
	if fs := st.FrontEnd.Frontends; len(fs) != 2 || fs[0].Connected || fs[1].Connected || st.FrontEnd.Connected {
		t.Fatalf("before any front-end: %+v", st.FrontEnd)
	}
	f, err := frontend.Dial(b)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(frontend.Options{NumQueues: 1}); err != nil {
		t.Fatal(err)
	}
	st = status()
	for _, fe := range st.FrontEnd.Frontends {
		if want := fe.Socket == b; fe.Connected != want || fe.Active != want {
			t.Errorf("socket %s: connected %t active %t, want %t", fe.Socket, fe.Connected, fe.Active, want)
		}
	}
	if !st.FrontEnd.Connected || len(st.FrontEnd.Queues) != 1 || !st.FrontEnd.Queues[0].Started {
		t.Errorf("top-level front_end: %+v", st.FrontEnd)
	}
	code, out, _ := runCLI(t, "ctl", ctl, "status")
	if code != 0 || !strings.Contains(out, a+": not connected") || !strings.Contains(out, b+": connection") {
		t.Errorf("ctl status:\n%s", out)
	}
	f.Close()
	d.stop(t, cmd.Process.Pid)
	checkClean(t, img)
}
