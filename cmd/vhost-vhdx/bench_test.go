package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
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
	reportHas(t, "text output", stdout, "64 requests (0 reads, 64 writes)", "IOPS", "p99.9", "back-end n/a (no --pid)")
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
	res, stdout, plot := reportOf(t, in.String(), "--svg")
	reportHas(t, "report", stdout,
		"| 4K randread QD32 IOPS ≥ 4× qsd | 12 | 3.30× | **not met** |",
		"| 4K randread QD1 p50 latency ≤ 0.6× qsd | 12 | 0.91× | **not met** |",
		"| 4K allocating randwrite QD32, fresh image, IOPS ≥ 8× qsd | 12 | – | not measured |",
		"| 4K randread QD32, allocated | qsd | 330000 | 100000 | 3.30× |",
		"| 1M read QD8 × 2 queues against dd of the file | dd | – | – | – | – | 1000.0 |",
		"| ours | 50000 | 330000 |",
	)
	if !strings.HasPrefix(plot, "<svg") || strings.Count(plot, "<polyline") != 2 || !strings.Contains(plot, "QD32: 330000 IOPS") {
		t.Errorf("plot:\n%s", plot)
	}
	if err := os.WriteFile(res, []byte("{\"backend\":\"ours\",\"workload\":\"x\"}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "bench", "report", res); code != exitFailure || !strings.Contains(stderr, "line 1") {
		t.Errorf("bad record: status %d, %q", code, stderr)
	}
}

// TestBenchReportShowsTheWorstStealOfEachRow: steal comes in bursts, so
// the report gives per row the most any one run lost, from either
// back-end; a row whose records carry no steal says nothing about it.
func TestBenchReportShowsTheWorstStealOfEachRow(t *testing.T) {
	withSteal := func(line string, pct float64) string {
		var rec benchRecord
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatal(err)
		}
		rec.StealPct = &pct
		b, _ := json.Marshal(rec)
		return string(b) + "\n"
	}
	var in strings.Builder
	for run, steal := range []float64{0.4, 21.6, 3} {
		in.WriteString(withSteal(benchLine("ours", wlRandWrite32, run, 32, 120000, 200, 8), steal))
		in.WriteString(withSteal(benchLine("qsd", wlRandWrite32, run, 32, 60000, 400, 23), steal/2))
	}
	in.WriteString(withSteal(benchLine("ours", wlRandRead32, 1, 32, 500000, 50, 2), 0))
	in.WriteString(withSteal(benchLine("qsd", wlRandRead32, 1, 32, 80000, 300, 14), 26.2))
	in.WriteString(benchLine("ours", wlRandRead1, 1, 1, 100000, 10, 10))
	in.WriteString(benchLine("qsd", wlRandRead1, 1, 1, 20000, 45, 33))
	_, stdout, _ := reportOf(t, in.String(), "--svg")
	reportHas(t, "report", stdout,
		"- 4K randwrite QD32, allocated: ours 0 %, qsd 0 %; steal up to 22 %\n",
		"- 4K randread QD32, allocated: ours 0 %, qsd 0 %; steal up to 26 %\n",
		"- 4K randread QD1, allocated: ours 0 %, qsd 0 %\n",
	)
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

// TestBenchReportComparesTheIssue12Rows: the background stream of a
// result, the chain against the flat image and the commands' wall time
// and RSS each get their row, ratio, target and bars.
func TestBenchReportComparesTheIssue12Rows(t *testing.T) {
	var in strings.Builder
	line := func(rec benchRecord) {
		b, err := json.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		in.Write(append(b, '\n'))
	}
	for run := 1; run <= 3; run++ {
		for _, be := range []struct {
			name          string
			reads, allocs float64
			info, infoRSS float64
		}{{"ours", 200000, 9000, 0.05, 300 << 10}, {"qsd", 40000, 1000, 0.20, 150 << 10}} {
			r := loadgen.Result{IOPS: be.reads, BackendCPUPerIO: -1, Latency: loadgen.Latency{P99: 1e6 / be.reads},
				Background: &loadgen.Result{IOPS: be.allocs, BackendCPUPerIO: -1}}
			line(benchRecord{Backend: be.name, Workload: wlReadWhileFill, Run: run, Result: &r})
			f := loadgen.Result{IOPS: be.allocs, BackendCPUPerIO: -1, Flushes: 10,
				FlushLatency: &loadgen.Latency{P50: 100 * float64(run), P99: 1e6 / be.allocs}}
			line(benchRecord{Backend: be.name, Workload: wlAllocFlush, Run: run, Result: &f})
			backend := be.name
			if backend == "qsd" {
				backend = "qemu-img"
			}
			line(benchRecord{Backend: backend, Workload: wlOpenInfo, Run: run,
				Exec: &execResult{Seconds: be.info * float64(run), MaxRSSKiB: int64(be.infoRSS)}})
		}
		for be, iops := range map[string]float64{"ours-chain": 150000, "ours-flat": 300000, "qsd": 50000} {
			line(benchRecord{Backend: be, Workload: wlChainRead, Run: run, Result: &loadgen.Result{IOPS: iops, BackendCPUPerIO: -1}})
		}
	}
	_, stdout, plot := reportOf(t, in.String(), "--rows-svg")
	reportHas(t, "report", stdout,
		"| 4K randread QD32 (allocated) while queue 2 allocates | qsd | 200000 | 40000 | 5.00× |",
		// Only the row that flushed has FLUSH latencies.
		"| 4K randwrite QD32 + FLUSH every 32, fresh image | qsd | 200.0 | 200.0 | 111.1 | 1000.0 |\n\n",
		"| … queue 2: 4K randwrite QD32 into fresh blocks, same time | qsd | 9000 | 1000 | 9.00× |",
		"| cached 4K randread QD32 while another queue allocates, IOPS ≥ 4× qsd | 12 | 5.00× | **met** |",
		"| 4K randread QD32, 4-layer chain (ours) vs flat image (qsd) | ours-chain vs qsd | 150000 | 50000 | 3.00× |",
		"| 4K randread QD32, 4-layer chain vs flat image, both ours | ours-chain vs ours-flat | 150000 | 300000 | 0.50× |",
		// Medians of 0.05/0.10/0.15 s and 0.20/0.40/0.60 s.
		"| qemu-img | 0.100 | 0.400 | 0.25× | 300.0 | 150.0 | 2.00× | 3+3 |",
		"| info of a 16 TiB / 1 MiB-block image ≤ 0.5× qemu-img info's time | 12 | 0.25× | **met** |",
	)
	if n := strings.Count(stdout, "| 4K randread QD32 (allocated) while queue 2 allocates | qsd |"); n != 1 {
		t.Errorf("the read row appears %d times in the tables, want once (it has no flushes)", n)
	}
	reportHas(t, "rows plot", plot, "<svg", "ours: 200000 IOPS", "qsd: 40000 IOPS", "5.00×", "ours-chain: 150000 IOPS",
		"qemu-img: 0.400 s", "0.25×", "time: lower is better", "not measured")
}

// reportOf writes records (JSON lines) to a results file and runs
// `bench report svgFlag PLOT FILE`, failing unless it succeeds; it returns
// the results file, the report and the plot's text.
func reportOf(t *testing.T, records, svgFlag string) (res, stdout, plot string) {
	t.Helper()
	dir := t.TempDir()
	res = filepath.Join(dir, "r.jsonl")
	if err := os.WriteFile(res, []byte(records), 0o644); err != nil {
		t.Fatal(err)
	}
	svg := filepath.Join(dir, "plot.svg")
	code, stdout, stderr := runCLI(t, "bench", "report", svgFlag, svg, res)
	if code != 0 {
		t.Fatalf("report: %d %s", code, stderr)
	}
	b, err := os.ReadFile(svg)
	if err != nil {
		t.Fatal(err)
	}
	return res, stdout, string(b)
}

// reportHas fails t for every one of wants that the text named what lacks.
func reportHas(t *testing.T, what, text string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(text, want) {
			t.Errorf("%s lacks %q:\n%s", what, want, text)
		}
	}
}

func TestBenchExecMeasuresACommandAndRefusesAFailedOne(t *testing.T) {
	code, stdout, stderr := runCLI(t, "bench", "exec", "--json", "--", "sh", "-c", "echo hidden; exit 0")
	if code != 0 {
		t.Fatalf("bench exec: %d %s", code, stderr)
	}
	var r execResult
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("output %q: %v", stdout, err)
	}
	if r.Command != "sh -c echo hidden; exit 0" || r.Seconds <= 0 || r.MaxRSSKiB <= 0 {
		t.Errorf("result %+v", r)
	}
	code, _, stderr = runCLI(t, "bench", "exec", "--", "sh", "-c", "echo broken >&2; exit 3")
	if code != exitFailure || !strings.Contains(stderr, "exit status 3") || !strings.Contains(stderr, "broken") {
		t.Errorf("failing command: status %d, stderr %q", code, stderr)
	}
	// A check that found only leaks (status 3) may be accepted, and then
	// its status is recorded.
	code, stdout, stderr = runCLI(t, "bench", "exec", "--json", "--ok-exit", "0,3", "--", "sh", "-c", "exit 3")
	if err := json.Unmarshal([]byte(stdout), &r); code != 0 || err != nil || r.Exit != 3 {
		t.Errorf("--ok-exit 0,3 and status 3: %d %q %q %v", code, stdout, stderr, err)
	}
	code, _, stderr = runCLI(t, "bench", "exec", "--ok-exit", "3", "--", "true")
	if code != exitFailure || !strings.Contains(stderr, "exit status 0") {
		t.Errorf("--ok-exit 3 and status 0: %d %q", code, stderr)
	}
	if code, _, _ := runCLI(t, "bench", "exec", "--ok-exit", "x", "--", "true"); code != exitUsage {
		t.Errorf("--ok-exit x: status %d, want a usage error", code)
	}
}

func TestBenchBackgroundFlagsDefaultToTheMainStream(t *testing.T) {
	c, _, err := parseBenchFlags([]string{"--socket", "s", "--iodepth", "32", "--bs", "8K", "--flush-every", "16",
		"--offset", "1M", "--bg-rw", "randwrite", "--bg-offset", "256M", "--bg-stride", "1M", "--bg-randommap"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want := loadgen.Stream{Queues: 1, IODepth: 32, BS: 8192, Mode: loadgen.RandWrite, RWMix: 50, Offset: 256 << 20,
		Stride: 1 << 20, RandomMap: true}
	if c.FlushEvery != 16 || c.Offset != 1<<20 || c.Background == nil || *c.Background != want {
		t.Errorf("flush-every %d, offset %d, background %+v; want %+v", c.FlushEvery, c.Offset, c.Background, want)
	}
	c, _, err = parseBenchFlags([]string{"--socket", "s"}, io.Discard)
	if err != nil || c.Background != nil {
		t.Errorf("no --bg-rw: background %+v, %v", c.Background, err)
	}
	if _, _, err := parseBenchFlags([]string{"--socket", "s", "--bg-rw", "up"}, io.Discard); err == nil || !strings.Contains(err.Error(), "--bg-rw") {
		t.Errorf("bad --bg-rw: %v", err)
	}
}

// FuzzBenchReportNeverPanics: the results file is read back from disk, so
// any content must give an error or a report and plots, never a panic.
func FuzzBenchReportNeverPanics(f *testing.F) {
	f.Add(benchLine("ours", wlRandRead32, 1, 32, 300000, 50, 2) + benchLine("qsd", wlRandRead32, 1, 32, 100000, 150, 10))
	f.Add(`{"backend":"ours","workload":"info-16t","run":1,"exec":{"command":"x","seconds":0.5,"max_rss_kib":1000,"exit":0}}` + "\n" +
		`{"backend":"qemu-img","workload":"info-16t","run":1,"exec":{"seconds":-1,"max_rss_kib":-5}}` + "\n")
	f.Add(`{"backend":"ours","workload":"randread-4k-qd32-while-allocating","run":1,"result":{"iops":1e308,"background":{"iops":-0,"flush_latency":{"p50_us":1}}}}` + "\n")
	f.Add(`{"backend":"dd","workload":"read-1m-qd8-2q","run":1,"mib_per_s":1000}` + "\n")
	f.Add(benchLine("ours", wlSweep, 1, 1, 5e307, 1, 1) + benchLine("qsd", wlSweep, 1, 0, 4.9e-324, 1, 1) + benchLine("qsd", wlSweep, 1, -3, 1e5, 1, 1))
	f.Fuzz(func(t *testing.T, in string) {
		recs, err := readBenchRecords(strings.NewReader(in))
		if err != nil {
			return
		}
		s := summarizeRecords(recs)
		var out strings.Builder
		writeBenchTables(&out, s)
		writeSweepSVG(&out, s)
		writeRowsSVG(&out, s)
		if !strings.Contains(out.String(), "| Target | issue |") {
			t.Fatalf("report without its target table:\n%s", out.String())
		}
	})
}
