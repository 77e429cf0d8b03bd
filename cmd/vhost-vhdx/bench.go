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
       vhost-vhdx bench report [--svg FILE] [--rows-svg FILE] RESULTS.jsonl
       vhost-vhdx bench exec [--json] [--ok-exit LIST] -- COMMAND [ARGS]
       vhost-vhdx bench pwrite [--json] [--bs SIZE] [--runtime DUR] [--seed N] FILE

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
  --offset SIZE     start of the range (default 0)
  --range SIZE      use only SIZE bytes from --offset (default: to the end)
  --stride SIZE     align random offsets to SIZE (default --bs)
  --randommap       use each aligned offset once per pass, in random order
  --flush-every N   send a FLUSH after every N requests on each queue (it
                    does not wait for the requests before it to complete)
  --verify          tag every 512-byte sector with its LBA and a seed and
                    check every read; read modes write the range first
  --seed N          seed for offsets and tags (default: from the clock)
  --pid PID         the back-end's process, to report its CPU time per request
  --no-event-idx    do not negotiate VIRTIO_RING_F_EVENT_IDX
  --json            print the result as one JSON object
  --hostile         instead of a load, run the hostile front-end and guest
                    suite: each malformed message or request on a fresh
                    connection, then a normal connection that must work

A background stream runs at the same time on queues of its own (after the
--queues of the main one) and is reported apart; the run ends when either
stream is done. --bg-rw turns it on; its other options default to the main
stream's values except --bg-queues (1), --bg-offset (0), --bg-range (to the end),
--bg-stride (--bg-bs), --bg-flush-every (0) and --bg-ios (0: until the
main stream ends):
  --bg-rw MODE --bg-queues N --bg-iodepth N --bg-bs SIZE --bg-rwmix PCT
  --bg-offset SIZE --bg-range SIZE --bg-stride SIZE --bg-randommap
  --bg-flush-every N --bg-ios N

"bench report" reads JSON lines written by scripts/bench.sh and prints the
Markdown tables of docs/benchmarks/README.md; --svg writes the IOPS against
queue depth plot, --rows-svg the bars of ours against the other back-end
for issue 12's rows.

"bench exec" runs COMMAND and prints its wall time and maximum RSS (for the
open-time rows: vhost-vhdx info against qemu-img info); see
'vhost-vhdx bench exec --help'.

"bench pwrite" overwrites FILE with random 4K pwrite(2)s from one thread:
the ceiling of random overwrites of a cached file, whatever the back-end
(see 'vhost-vhdx bench pwrite --help').
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
	offset     sizeFlag
	flushEvery int
	bg         bgFlags
}

// bgFlags are the background stream's options (--bg-*).
type bgFlags struct {
	rw         string
	queues     int
	iodepth    int
	bs         sizeFlag
	rwmix      int
	offset     sizeFlag
	rangeSize  sizeFlag
	stride     sizeFlag
	randommap  bool
	flushEvery int
	ios        uint64
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
	fs.Var(&b.offset, "offset", "")
	fs.IntVar(&b.flushEvery, "flush-every", 0, "")
	fs.StringVar(&b.bg.rw, "bg-rw", "", "")
	fs.IntVar(&b.bg.queues, "bg-queues", 1, "")
	fs.IntVar(&b.bg.iodepth, "bg-iodepth", 0, "")
	fs.Var(&b.bg.bs, "bg-bs", "")
	fs.IntVar(&b.bg.rwmix, "bg-rwmix", -1, "")
	fs.Var(&b.bg.offset, "bg-offset", "")
	fs.Var(&b.bg.rangeSize, "bg-range", "")
	fs.Var(&b.bg.stride, "bg-stride", "")
	fs.BoolVar(&b.bg.randommap, "bg-randommap", false, "")
	fs.IntVar(&b.bg.flushEvery, "bg-flush-every", 0, "")
	fs.Uint64Var(&b.bg.ios, "bg-ios", 0, "")
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
		PID: b.pid, NoEventIdx: b.noEventIdx, FlushEvery: b.flushEvery,
	}
	if b.socket == "" {
		return c, out, usagef("bench", "--socket is required")
	}
	for _, s := range []struct {
		name string
		f    *sizeFlag
		max  uint64
	}{{"bs", &b.bs, loadgen.MaxBS}, {"range", &b.rangeSize, 1 << 62}, {"stride", &b.stride, 1 << 62}, {"offset", &b.offset, 1 << 62},
		{"bg-bs", &b.bg.bs, loadgen.MaxBS}, {"bg-range", &b.bg.rangeSize, 1 << 62}, {"bg-stride", &b.bg.stride, 1 << 62}, {"bg-offset", &b.bg.offset, 1 << 62}} {
		if s.f.set && s.f.v > s.max {
			return c, out, usagef("bench", "--%s %d is too large", s.name, s.f.v)
		}
	}
	if b.bs.set {
		c.BS = int(b.bs.v)
	}
	c.Range = int64(b.rangeSize.v)
	c.Stride = int64(b.stride.v)
	c.Offset = int64(b.offset.v)
	if b.bg.rw != "" {
		bg, err := b.bg.stream(c)
		if err != nil {
			return c, out, err
		}
		c.Background = bg
	}
	if c.Runtime == 0 && c.IOs == 0 {
		c.Runtime = 5 * time.Second
	}
	if c.Seed == 0 {
		c.Seed = uint64(time.Now().UnixNano())
	}
	return c, out, nil
}

// stream is the background stream the --bg-* flags describe; the ones not
// given take the main stream's values (c, already parsed).
func (g *bgFlags) stream(c loadgen.Config) (*loadgen.Stream, error) {
	mode, err := loadgen.ParseMode(g.rw)
	if err != nil {
		return nil, usagef("bench", "--bg-rw %q: want randread, randwrite, read, write or randrw", g.rw)
	}
	s := &loadgen.Stream{Queues: g.queues, IODepth: c.IODepth, BS: c.BS, Mode: mode, RWMix: c.RWMix,
		Offset: int64(g.offset.v), Range: int64(g.rangeSize.v), Stride: int64(g.stride.v), RandomMap: g.randommap,
		FlushEvery: g.flushEvery, IOs: g.ios}
	if g.iodepth != 0 {
		s.IODepth = g.iodepth
	}
	if g.bs.set {
		s.BS = int(g.bs.v)
	}
	if g.rwmix >= 0 {
		s.RWMix = g.rwmix
	}
	return s, nil
}

func runBench(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "report":
			return runBenchReport(args[1:], stdout)
		case "exec":
			return runBenchExec(args[1:], stdout, stderr)
		case "pwrite":
			return runBenchPwrite(args[1:], stdout)
		}
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
	printStream(w, "", r)
	if r.Background != nil {
		printStream(w, "background: ", r.Background)
	}
	be := "n/a (no --pid)"
	if r.BackendCPUPerIO >= 0 {
		be = fmt.Sprintf("%.2f µs", r.BackendCPUPerIO)
	}
	fmt.Fprintf(w, "  CPU per request: back-end %s, bench %.2f µs\n", be, r.OwnCPUPerIO)
	fmt.Fprintf(w, "  notifications per request: %.3f kicks, %.3f interrupts waited for\n", r.KicksPerIO, r.WaitsPerIO)
}

// printStream prints one stream's pattern, counts and latencies.
func printStream(w io.Writer, label string, r *loadgen.Result) {
	mix := ""
	if r.RW == "randrw" {
		mix = fmt.Sprintf(" (%d%% reads)", r.RWMix)
	}
	flush := ""
	if r.FlushEvery > 0 {
		flush = fmt.Sprintf(" flush-every=%d", r.FlushEvery)
	}
	fmt.Fprintf(w, "%s%s%s bs=%s queues=%d iodepth=%d offset=%s range=%s%s event_idx=%v verify=%v\n",
		label, r.RW, mix, formatShort(uint64(r.BS)), r.Queues, r.IODepth, formatShort(uint64(r.Offset)), formatShort(uint64(r.Range)),
		flush, r.EventIdx, r.Verified)
	fmt.Fprintf(w, "  %d requests (%d reads, %d writes) in %.2fs\n", r.IOs, r.Reads, r.Writes, r.Seconds)
	fmt.Fprintf(w, "  IOPS %.0f   bandwidth %.1f MiB/s\n", r.IOPS, r.MiBps)
	l := r.Latency
	fmt.Fprintf(w, "  latency µs: mean %.1f  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", l.Mean, l.P50, l.P90, l.P99, l.P999, l.Max)
	if f := r.FlushLatency; f != nil {
		fmt.Fprintf(w, "  %d flushes, latency µs: p50 %.1f  p99 %.1f  max %.1f\n", r.Flushes, f.P50, f.P99, f.Max)
	}
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
