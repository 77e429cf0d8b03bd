package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/loadgen"
)

// benchRecord is one line of the results file scripts/bench.sh writes: a
// bench --json result (or, for the dd baseline, a bandwidth) labelled
// with the back-end, the workload and the run number.
type benchRecord struct {
	Backend  string          `json:"backend"` // ours, qsd or dd
	Workload string          `json:"workload"`
	Run      int             `json:"run"`
	Result   *loadgen.Result `json:"result,omitempty"`
	MiBps    float64         `json:"mib_per_s,omitempty"` // dd only
}

// Workload names scripts/bench.sh uses; the report knows their targets.
const (
	wlRandRead1   = "randread-4k-qd1"
	wlRandRead32  = "randread-4k-qd32"
	wlRandWrite32 = "randwrite-4k-qd32"
	wlAllocWrite  = "randwrite-4k-qd32-fresh"
	wlSeqRead     = "read-1m-qd8-2q"
	wlSeqWrite    = "write-1m-qd8-2q"
	wlSweep       = "randread-4k-sweep" // one per --iodepth, for the plot
)

var workloadTitles = map[string]string{
	wlRandRead1:   "4K randread QD1, allocated",
	wlRandRead32:  "4K randread QD32, allocated",
	wlRandWrite32: "4K randwrite QD32, allocated",
	wlAllocWrite:  "4K randwrite QD32, fresh image (each write allocates)",
	wlSeqRead:     "1M read QD8 × 2 queues",
	wlSeqWrite:    "1M write QD8 × 2 queues, allocated",
}

var workloadOrder = []string{wlRandRead1, wlRandRead32, wlRandWrite32, wlAllocWrite, wlSeqRead, wlSeqWrite}

const benchReportUsage = `Usage: vhost-vhdx bench report [--svg FILE] RESULTS.jsonl`

func runBenchReport(args []string, stdout io.Writer) error {
	fs := newFlagSet("bench report")
	svg := fs.String("svg", "", "")
	pos, err := parseArgs(fs, args, benchReportUsage+"\n", stdout, 1, 1)
	if err != nil {
		return err
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return fmt.Errorf("bench report: %w", err)
	}
	defer f.Close()
	recs, err := readBenchRecords(f)
	if err != nil {
		return fmt.Errorf("bench report: %s: %w", pos[0], err)
	}
	s := summarizeRecords(recs)
	writeBenchTables(stdout, s)
	writeMergeTable(stdout, s) // bench_merge.go
	if *svg != "" {
		out, err := os.Create(*svg)
		if err != nil {
			return fmt.Errorf("bench report: %w", err)
		}
		writeSweepSVG(out, s)
		if err := out.Close(); err != nil {
			return fmt.Errorf("bench report: %w", err)
		}
	}
	return nil
}

func readBenchRecords(r io.Reader) ([]benchRecord, error) {
	var recs []benchRecord
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		t := strings.TrimSpace(sc.Text())
		if t == "" {
			continue
		}
		var rec benchRecord
		if err := json.Unmarshal([]byte(t), &rec); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if rec.Backend == "" || rec.Workload == "" || (rec.Result == nil && rec.Backend != "dd") {
			return nil, fmt.Errorf("line %d: needs backend, workload and result", line)
		}
		recs = append(recs, rec)
	}
	return recs, sc.Err()
}

// stats are the medians over the runs of one back-end and workload.
type stats struct {
	runs             int
	iops, mibps      float64
	p50, p99         float64
	beCPU            float64 // µs per I/O, -1 unknown
	iopsMin, iopsMax float64
	iopsSpreadPct    float64
}

type benchSummary struct {
	by    map[string]map[string]*stats // workload → backend → stats
	sweep map[string]map[int]float64   // backend → iodepth → median IOPS
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func summarizeRecords(recs []benchRecord) benchSummary {
	type key struct{ wl, be string }
	type acc struct{ iops, mibps, p50, p99, cpu []float64 }
	groups := map[key]*acc{}
	sweep := map[string]map[int][]float64{}
	for _, r := range recs {
		if r.Workload == wlSweep && r.Result != nil {
			if sweep[r.Backend] == nil {
				sweep[r.Backend] = map[int][]float64{}
			}
			sweep[r.Backend][r.Result.IODepth] = append(sweep[r.Backend][r.Result.IODepth], r.Result.IOPS)
			continue
		}
		k := key{r.Workload, r.Backend}
		a := groups[k]
		if a == nil {
			a = &acc{}
			groups[k] = a
		}
		if r.Result == nil {
			a.mibps = append(a.mibps, r.MiBps)
			continue
		}
		a.iops = append(a.iops, r.Result.IOPS)
		a.mibps = append(a.mibps, r.Result.MiBps)
		a.p50 = append(a.p50, r.Result.Latency.P50)
		a.p99 = append(a.p99, r.Result.Latency.P99)
		if r.Result.BackendCPUPerIO >= 0 {
			a.cpu = append(a.cpu, r.Result.BackendCPUPerIO)
		}
	}
	s := benchSummary{by: map[string]map[string]*stats{}, sweep: map[string]map[int]float64{}}
	for k, a := range groups {
		st := &stats{runs: max(len(a.iops), len(a.mibps)), iops: median(a.iops), mibps: median(a.mibps),
			p50: median(a.p50), p99: median(a.p99), beCPU: -1}
		if len(a.cpu) > 0 {
			st.beCPU = median(a.cpu)
		}
		if len(a.iops) > 0 {
			st.iopsMin, st.iopsMax = slices.Min(a.iops), slices.Max(a.iops)
			if st.iops > 0 {
				st.iopsSpreadPct = 100 * (st.iopsMax - st.iopsMin) / st.iops
			}
		}
		if s.by[k.wl] == nil {
			s.by[k.wl] = map[string]*stats{}
		}
		s.by[k.wl][k.be] = st
	}
	for be, m := range sweep {
		s.sweep[be] = map[int]float64{}
		for qd, v := range m {
			s.sweep[be][qd] = median(v)
		}
	}
	return s
}

func ratio(a, b float64) float64 {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

func fmtNum(v float64, prec int) string {
	if math.IsNaN(v) || v < 0 {
		return "–"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", v)
}

// target is one of issue 4's speed targets.
type target struct {
	what     string
	measured float64 // ours/qsd (or ours/dd)
	want     float64
	atMost   bool // the ratio must be ≤ want rather than ≥
}

func (t target) met() string {
	switch {
	case math.IsNaN(t.measured):
		return "not measured"
	case t.atMost && t.measured <= t.want, !t.atMost && t.measured >= t.want:
		return "**met**"
	}
	return "**not met**"
}

func (s benchSummary) get(wl, be string) *stats {
	if st := s.by[wl][be]; st != nil {
		return st
	}
	return &stats{iops: math.NaN(), mibps: math.NaN(), p50: math.NaN(), p99: math.NaN(), beCPU: -1}
}

func (s benchSummary) targets() []target {
	cpu := math.NaN()
	cpuWl := ""
	// The CPU target must hold on every 4K workload: report the worst.
	for _, wl := range []string{wlRandRead1, wlRandRead32, wlRandWrite32, wlAllocWrite} {
		o, q := s.get(wl, "ours"), s.get(wl, "qsd")
		if o.beCPU < 0 || q.beCPU <= 0 {
			continue
		}
		if r := o.beCPU / q.beCPU; math.IsNaN(cpu) || r > cpu {
			cpu, cpuWl = r, wl
		}
	}
	return []target{
		{"4K randread QD32 IOPS ≥ 1.5× qsd", ratio(s.get(wlRandRead32, "ours").iops, s.get(wlRandRead32, "qsd").iops), 1.5, false},
		{"4K randwrite QD32 (allocated) IOPS ≥ 1.5× qsd", ratio(s.get(wlRandWrite32, "ours").iops, s.get(wlRandWrite32, "qsd").iops), 1.5, false},
		{"4K allocating writes QD32 IOPS ≥ 1.2× qsd", ratio(s.get(wlAllocWrite, "ours").iops, s.get(wlAllocWrite, "qsd").iops), 1.2, false},
		{"4K randread QD1 p50 latency ≤ 0.8× qsd", ratio(s.get(wlRandRead1, "ours").p50, s.get(wlRandRead1, "qsd").p50), 0.8, true},
		{fmt.Sprintf("back-end CPU per I/O ≤ 0.7× qsd (worst 4K workload: %s)", cpuWl), cpu, 0.7, true},
		{"1M sequential read ≥ 90 % of dd of the image file", ratio(s.get(wlSeqRead, "ours").mibps, s.get(wlSeqRead, "dd").mibps), 0.9, false},
	}
}

func writeBenchTables(w io.Writer, s benchSummary) {
	fmt.Fprintln(w, "| Workload | IOPS ours | IOPS qsd | ratio | MiB/s ours | MiB/s qsd | p50 µs ours | p50 µs qsd | p99 µs ours | p99 µs qsd | back-end CPU µs/IO ours | qsd | ratio | runs |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
	for _, wl := range workloadOrder {
		o, q := s.get(wl, "ours"), s.get(wl, "qsd")
		cpuRatio := math.NaN()
		if o.beCPU >= 0 && q.beCPU > 0 {
			cpuRatio = o.beCPU / q.beCPU
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d+%d |\n",
			workloadTitles[wl], fmtNum(o.iops, 0), fmtNum(q.iops, 0), fmtRatio(ratio(o.iops, q.iops)),
			fmtNum(o.mibps, 1), fmtNum(q.mibps, 1), fmtNum(o.p50, 1), fmtNum(q.p50, 1), fmtNum(o.p99, 1), fmtNum(q.p99, 1),
			fmtNum(o.beCPU, 2), fmtNum(q.beCPU, 2), fmtRatio(cpuRatio), o.runs, q.runs)
	}
	if dd := s.get(wlSeqRead, "dd"); !math.IsNaN(dd.mibps) {
		fmt.Fprintf(w, "| dd of the image file, 1M blocks (page cache) | | | | %s | | | | | | | | | %d |\n", fmtNum(dd.mibps, 1), dd.runs)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run-to-run spread of IOPS ((max−min)/median):")
	fmt.Fprintln(w)
	for _, wl := range workloadOrder {
		o, q := s.get(wl, "ours"), s.get(wl, "qsd")
		fmt.Fprintf(w, "- %s: ours %s %%, qsd %s %%\n", workloadTitles[wl], fmtNum(o.iopsSpreadPct, 0), fmtNum(q.iopsSpreadPct, 0))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| Target (issue 4) | measured | status |")
	fmt.Fprintln(w, "|---|--:|---|")
	for _, t := range s.targets() {
		fmt.Fprintf(w, "| %s | %s | %s |\n", t.what, fmtRatio(t.measured), t.met())
	}
	if len(s.sweep) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "4K randread, 1 queue, IOPS (median) by queue depth:")
		fmt.Fprintln(w)
		qds := sweepDepths(s)
		fmt.Fprint(w, "| back-end |")
		for _, qd := range qds {
			fmt.Fprintf(w, " QD%d |", qd)
		}
		fmt.Fprint(w, "\n|---|")
		for range qds {
			fmt.Fprint(w, "--:|")
		}
		fmt.Fprintln(w)
		for _, be := range []string{"ours", "qsd"} {
			fmt.Fprintf(w, "| %s |", be)
			for _, qd := range qds {
				v, ok := s.sweep[be][qd]
				if !ok {
					v = math.NaN()
				}
				fmt.Fprintf(w, " %s |", fmtNum(v, 0))
			}
			fmt.Fprintln(w)
		}
	}
}

func sweepDepths(s benchSummary) []int {
	var qds []int
	for _, m := range s.sweep {
		for qd := range m {
			if !slices.Contains(qds, qd) {
				qds = append(qds, qd)
			}
		}
	}
	slices.Sort(qds)
	return qds
}
