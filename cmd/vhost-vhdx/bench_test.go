package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/loadgen"
)

// serveImage serves a fresh VHDX in-process, as `vhost-vhdx serve` would,
// and returns the socket path.
func serveImage(t *testing.T, size uint64, queues int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bench") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "d.vhdx")
	mustRun(t, "create", "--size", fmt.Sprint(size), "--block-size", "1M", img)
	im, err := vhdx.Open(img, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: im, Blk: blk.Options{NumQueues: uint16(queues)}, NumQueues: queues})
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		im.Close()
		os.RemoveAll(dir)
	})
	return sock
}

func TestBenchVerifiesAVHDXThroughTheServerAndPrintsJSON(t *testing.T) {
	sock := serveImage(t, 8<<20, 2)
	code, stdout, stderr := runCLI(t, "bench", "--socket", sock, "--queues", "2", "--iodepth", "4",
		"--rw", "randrw", "--rwmix", "60", "--bs", "8K", "--ios", "500", "--verify", "--seed", "5",
		"--pid", fmt.Sprint(os.Getpid()), "--json")
	if code != 0 {
		t.Fatalf("bench: status %d: %s", code, stderr)
	}
	var r loadgen.Result
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("bench --json output %q: %v", stdout, err)
	}
	if r.IOs != 500 || r.Reads == 0 || r.Writes == 0 || !r.Verified || r.Capacity != 8<<20 || r.BS != 8192 {
		t.Errorf("result %+v", r)
	}
	if r.Latency.P50 <= 0 || r.Latency.Max < r.Latency.P99 || r.BackendCPUPerIO < 0 {
		t.Errorf("latency %+v, backend CPU %v", r.Latency, r.BackendCPUPerIO)
	}
	// The text form names the numbers a reader looks for.
	code, stdout, stderr = runCLI(t, "bench", "--socket", sock, "--rw", "write", "--bs", "64K", "--ios", "64")
	if code != 0 {
		t.Fatalf("bench: status %d: %s", code, stderr)
	}
	for _, want := range []string{"64 requests (0 reads, 64 writes)", "IOPS", "p99.9", "back-end n/a (no --pid)"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("text output lacks %q:\n%s", want, stdout)
		}
	}
}

func TestBenchRefusesBadFlagsAsUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bench"}, "--socket is required"},
		{[]string{"bench", "--socket", "s", "--rw", "sideways"}, `--rw "sideways"`},
		{[]string{"bench", "--socket", "s", "--bs", "100T"}, "--bs"},
		{[]string{"bench", "--socket", "s", "extra"}, "unexpected argument"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != exitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: status %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
	// A bad iodepth is found by the generator: a plain failure.
	code, _, stderr := runCLI(t, "bench", "--socket", "s", "--iodepth", "0")
	if code != exitFailure || !strings.Contains(stderr, "--iodepth 0") {
		t.Errorf("--iodepth 0: status %d, stderr %q", code, stderr)
	}
}

func benchLine(be, wl string, run, qd int, iops, p50, cpu float64) string {
	r := loadgen.Result{IODepth: qd, IOPS: iops, MiBps: iops / 256, BackendCPUPerIO: cpu, Latency: loadgen.Latency{P50: p50}}
	b, _ := json.Marshal(benchRecord{Backend: be, Workload: wl, Run: run, Result: &r})
	return string(b) + "\n"
}

func TestBenchReportTakesMediansAndMarksTargets(t *testing.T) {
	var in strings.Builder
	// Three runs each; the outlier run must not move the median.
	for run, f := range []float64{1, 1.1, 5} {
		in.WriteString(benchLine("ours", wlRandRead32, run, 32, 300000*f, 50, 2))
		in.WriteString(benchLine("qsd", wlRandRead32, run, 32, 100000, 150, 10))
		in.WriteString(benchLine("ours", wlRandRead1, run, 1, 50000, 20, 2))
		in.WriteString(benchLine("qsd", wlRandRead1, run, 1, 40000, 22, 10))
	}
	in.WriteString(benchLine("ours", wlSweep, 1, 1, 50000, 20, 2))
	in.WriteString(benchLine("ours", wlSweep, 1, 32, 330000, 20, 2))
	in.WriteString(benchLine("qsd", wlSweep, 1, 1, 40000, 20, 2))
	in.WriteString(`{"backend":"dd","workload":"read-1m-qd8-2q","run":1,"mib_per_s":1000}` + "\n")
	dir := t.TempDir()
	res := filepath.Join(dir, "r.jsonl")
	if err := os.WriteFile(res, []byte(in.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	svg := filepath.Join(dir, "p.svg")
	code, stdout, stderr := runCLI(t, "bench", "report", "--svg", svg, res)
	if code != 0 {
		t.Fatalf("report: %d %s", code, stderr)
	}
	for _, want := range []string{
		"| 4K randread QD32 IOPS ≥ 1.5× qsd | 3.30× | **met** |",
		"| 4K randread QD1 p50 latency ≤ 0.8× qsd | 0.91× | **not met** |",
		"| 4K allocating writes QD32 IOPS ≥ 1.2× qsd | – | not measured |",
		"| 4K randread QD32, allocated | 330000 | 100000 | 3.30× |",
		"| ours | 50000 | 330000 |",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, stdout)
		}
	}
	b, err := os.ReadFile(svg)
	if err != nil {
		t.Fatal(err)
	}
	if s := string(b); !strings.HasPrefix(s, "<svg") || strings.Count(s, "<polyline") != 2 || !strings.Contains(s, "QD32: 330000 IOPS") {
		t.Errorf("plot:\n%s", s)
	}
	if err := os.WriteFile(res, []byte("{\"backend\":\"ours\"}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "bench", "report", res); code != exitFailure || !strings.Contains(stderr, "line 1") {
		t.Errorf("bad record: status %d, %q", code, stderr)
	}
}

// TestBenchHostileRunsEveryCaseAndTheServerSurvives: `bench --hostile`
// against a served VHDX passes every case (each ends in an error status or a
// clean disconnect, and a normal connection works afterwards).
func TestBenchHostileRunsEveryCaseAndTheServerSurvives(t *testing.T) {
	sock := serveImage(t, 8<<20, 1)
	code, stdout, stderr := runCLI(t, "bench", "--hostile", "--socket", sock)
	if code != 0 {
		t.Fatalf("bench --hostile: status %d\nstdout:\n%s\nstderr: %s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "cases passed") || strings.Contains(stdout, "FAIL") {
		t.Fatalf("bench --hostile output:\n%s", stdout)
	}
	// The server still serves a normal load afterwards.
	if code, _, stderr := runCLI(t, "bench", "--socket", sock, "--ios", "64", "--verify", "--rw", "randrw"); code != 0 {
		t.Fatalf("bench after the hostile suite: status %d: %s", code, stderr)
	}
}
