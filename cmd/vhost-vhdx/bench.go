package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/loadgen"
)

const benchUsage = `Usage: vhost-vhdx bench --socket PATH [OPTIONS]
       vhost-vhdx bench report [--svg FILE] [--md FILE] RESULTS.jsonl

Drive a vhost-user-blk back-end (vhost-vhdx serve, qemu-storage-daemon, ...)
with no guest: the bench is the front-end, with memfd guest memory, split
rings and eventfds, and keeps --iodepth requests in flight on each queue.
It prints IOPS, bandwidth, latency percentiles and CPU time per request.

Options:
  --socket PATH     the back-end's vhost-user socket
  --queues N        request queues, one thread each (default 1)
  --iodepth N       requests in flight per queue (default 1, at most 256)
  --bs SIZE         bytes per request (default 4K)
  --rw MODE         randread, randwrite, read, write or randrw (default randread)
  --rwmix PCT       randrw: percentage of reads (default 50)
  --runtime DUR     how long to run, e.g. 10s (default 5s unless --ios)
  --ios N           stop after N requests in total
  --range SIZE      use only the first SIZE bytes of the disk (default all)
  --stride SIZE     align random offsets to SIZE (default --bs)
  --randommap       use each aligned offset once per pass, in random order
  --verify          tag every 512-byte sector with its LBA and a seed and
                    check every read; read modes write the range first
  --seed N          seed for offsets and tags (default: from the clock)
  --pid PID         the back-end's process, to report its CPU time per request
  --no-event-idx    do not negotiate VIRTIO_RING_F_EVENT_IDX
  --json            print the result as one JSON object
  --hostile         instead of a load, run the hostile front-end and guest
                    suite: each malformed message or request on a fresh
                    connection, then a normal connection that must work

"bench report" reads JSON lines written by scripts/bench.sh and prints the
Markdown tables of docs/benchmarks/README.md; --svg writes the IOPS against
queue depth plot.
`

type benchFlags struct {
	socket     string
	queues     int
	iodepth    int
	bs         sizeFlag
	rw         string
	rwmix      int
	runtime    time.Duration
	ios        uint64
	rangeSize  sizeFlag
	stride     sizeFlag
	randommap  bool
	verify     bool
	seed       uint64
	pid        int
	noEventIdx bool
	json       bool
	hostile    bool
}

// benchOutput says what runBench does besides loading: the output format,
// or the hostile suite instead of a load.
type benchOutput struct {
	json    bool
	hostile bool
}

func parseBenchFlags(args []string, stdout io.Writer) (loadgen.Config, benchOutput, error) {
	var b benchFlags
	fs := newFlagSet("bench")
	fs.StringVar(&b.socket, "socket", "", "")
	fs.StringVar(&b.socket, "socket-path", "", "")
	fs.IntVar(&b.queues, "queues", 1, "")
	fs.IntVar(&b.iodepth, "iodepth", 1, "")
	fs.Var(&b.bs, "bs", "")
	fs.StringVar(&b.rw, "rw", "randread", "")
	fs.IntVar(&b.rwmix, "rwmix", 50, "")
	fs.DurationVar(&b.runtime, "runtime", 0, "")
	fs.Uint64Var(&b.ios, "ios", 0, "")
	fs.Var(&b.rangeSize, "range", "")
	fs.Var(&b.stride, "stride", "")
	fs.BoolVar(&b.randommap, "randommap", false, "")
	fs.BoolVar(&b.verify, "verify", false, "")
	fs.Uint64Var(&b.seed, "seed", 0, "")
	fs.IntVar(&b.pid, "pid", 0, "")
	fs.BoolVar(&b.noEventIdx, "no-event-idx", false, "")
	fs.BoolVar(&b.json, "json", false, "")
	fs.BoolVar(&b.hostile, "hostile", false, "")
	if _, err := parseArgs(fs, args, benchUsage, stdout, 0, 0); err != nil {
		return loadgen.Config{}, benchOutput{}, err
	}
	out := benchOutput{json: b.json, hostile: b.hostile}
	mode, err := loadgen.ParseMode(b.rw)
	if err != nil {
		return loadgen.Config{}, out, usagef("bench", "--rw %q: want randread, randwrite, read, write or randrw", b.rw)
	}
	c := loadgen.Config{
		Socket: b.socket, Queues: b.queues, IODepth: b.iodepth, BS: 4096, Mode: mode, RWMix: b.rwmix,
		Runtime: b.runtime, IOs: b.ios, RandomMap: b.randommap, Verify: b.verify, Seed: b.seed,
		PID: b.pid, NoEventIdx: b.noEventIdx,
	}
	if b.socket == "" {
		return c, out, usagef("bench", "--socket is required")
	}
	for _, s := range []struct {
		name string
		f    *sizeFlag
		max  uint64
	}{{"bs", &b.bs, loadgen.MaxBS}, {"range", &b.rangeSize, 1 << 62}, {"stride", &b.stride, 1 << 62}} {
		if s.f.set && s.f.v > s.max {
			return c, out, usagef("bench", "--%s %d is too large", s.name, s.f.v)
		}
	}
	if b.bs.set {
		c.BS = int(b.bs.v)
	}
	c.Range = int64(b.rangeSize.v)
	c.Stride = int64(b.stride.v)
	if c.Runtime == 0 && c.IOs == 0 {
		c.Runtime = 5 * time.Second
	}
	if c.Seed == 0 {
		c.Seed = uint64(time.Now().UnixNano())
	}
	return c, out, nil
}

func runBench(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "report" {
		return runBenchReport(args[1:], stdout)
	}
	c, out, err := parseBenchFlags(args, stdout)
	if err != nil {
		return err
	}
	asJSON := out.json
	if out.hostile {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		return runBenchHostile(ctx, c.Socket, stdout)
	}
	if isTerminal(stderr) {
		c.Progress = func(p loadgen.Progress) {
			s := p.Elapsed.Seconds()
			fmt.Fprintf(stderr, "\r%5.0fs  %10.0f IOPS  %9.1f MiB/s\x1b[K", s, float64(p.IOs)/s, float64(p.Bytes)/(1<<20)/s)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := loadgen.Run(ctx, c)
	if c.Progress != nil {
		fmt.Fprint(stderr, "\r\x1b[K")
	}
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		return enc.Encode(res)
	}
	printBench(stdout, res)
	return nil
}

func printBench(w io.Writer, r *loadgen.Result) {
	mix := ""
	if r.RW == "randrw" {
		mix = fmt.Sprintf(" (%d%% reads)", r.RWMix)
	}
	fmt.Fprintf(w, "%s%s bs=%s queues=%d iodepth=%d range=%s event_idx=%v verify=%v\n",
		r.RW, mix, formatShort(uint64(r.BS)), r.Queues, r.IODepth, formatShort(uint64(r.Range)), r.EventIdx, r.Verified)
	fmt.Fprintf(w, "  %d requests (%d reads, %d writes) in %.2fs\n", r.IOs, r.Reads, r.Writes, r.Seconds)
	fmt.Fprintf(w, "  IOPS %.0f   bandwidth %.1f MiB/s\n", r.IOPS, r.MiBps)
	l := r.Latency
	fmt.Fprintf(w, "  latency µs: mean %.1f  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", l.Mean, l.P50, l.P90, l.P99, l.P999, l.Max)
	be := "n/a (no --pid)"
	if r.BackendCPUPerIO >= 0 {
		be = fmt.Sprintf("%.2f µs", r.BackendCPUPerIO)
	}
	fmt.Fprintf(w, "  CPU per request: back-end %s, bench %.2f µs\n", be, r.OwnCPUPerIO)
	fmt.Fprintf(w, "  notifications per request: %.3f kicks, %.3f interrupts waited for\n", r.KicksPerIO, r.WaitsPerIO)
}

// formatShort prints a byte count as 4K, 1M, 1G when exact.
func formatShort(n uint64) string {
	for _, u := range []struct {
		s     string
		shift uint
	}{{"G", 30}, {"M", 20}, {"K", 10}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.s)
		}
	}
	return fmt.Sprint(n)
}
