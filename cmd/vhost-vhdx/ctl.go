package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

const ctlUsage = `Usage: vhost-vhdx ctl SOCKET COMMAND [ARGS] [--json]
       vhost-vhdx ctl SOCKET stats --watch [--interval D] [--count N]
       vhost-vhdx ctl SOCKET merge [--rate BYTES/S] [--wait]
       vhost-vhdx ctl SOCKET help

Run COMMAND on the daemon listening on SOCKET (serve --control-socket).
'help' lists the commands the daemon offers. ARGS are KEY=VALUE pairs
(VALUE is JSON if it parses as JSON, otherwise a string) or one JSON
object; resize also takes its size alone:

  vhost-vhdx ctl /run/vm1.ctl status
  vhost-vhdx ctl /run/vm1.ctl resize +1G
  vhost-vhdx ctl /run/vm1.ctl flush
  vhost-vhdx ctl /run/vm1.ctl checkpoint /var/lib/vm1/after-update.vhdx
  vhost-vhdx ctl /run/vm1.ctl merge --rate 50M --wait

merge starts folding the top into its parent and returns; status shows
its progress, merge-cancel stops it. When it is done the parent is the
disk and the top's file is removed: restart the daemon with the parent's
path from then on.

Options:
  --json        print the daemon's reply as JSON
  --watch       (stats) print one line per interval until interrupted: ops/s,
                MiB/s, errors and read/write latency p50/p99, all of the
                requests in that interval (not since the daemon started)
  --interval D  --watch interval (default 1s)
  --count N     --watch: stop after N lines (default: never)
  --timeout D   give up on a reply after D (default 60s; 0: never)
  --rate N      (merge) copy at most N bytes/s (K/M/G suffixes; default unbounded)
  --wait        (merge) print progress until the merge ends; fail unless it is done
`

// positionalArg names the argument a command's first bare ARG fills.
var positionalArg = map[string]string{"resize": "size", "checkpoint": "path", "merge": "rate"}

func runCtl(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ctl")
	asJSON := fs.Bool("json", false, "")
	watch := fs.Bool("watch", false, "")
	interval := fs.Duration("interval", time.Second, "")
	count := fs.Int("count", 0, "")
	timeout := fs.Duration("timeout", 60*time.Second, "")
	rate := fs.String("rate", "", "")
	wait := fs.Bool("wait", false, "")
	pos, err := parseArgs(fs, args, ctlUsage, stdout, 2, 64)
	if err != nil {
		return err
	}
	sock, name := pos[0], pos[1]
	if name == "help" {
		name = "query-commands"
	}
	cmdArgs, err := ctlArguments(name, pos[2:])
	if err != nil {
		return err
	}
	if cmdArgs, err = mergeFlags(name, cmdArgs, *rate, *wait); err != nil { // ctl_merge.go
		return err
	}
	if *watch && name != "stats" {
		return usagef("ctl", "--watch works with stats only")
	}
	if *interval <= 0 {
		return usagef("ctl", "--interval must be positive")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cl, err := control.Dial(sock)
	if err != nil {
		return fmt.Errorf("ctl: %w", err)
	}
	defer cl.Close()
	if *watch {
		return watchStats(ctx, cl, stdout, *interval, *count, *asJSON)
	}
	cctx := ctx
	if *timeout > 0 {
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	raw, err := cl.CallRaw(cctx, name, cmdArgs)
	if err != nil {
		return fmt.Errorf("ctl %s: %w", name, err)
	}
	if *wait {
		return waitMerge(ctx, cl, stdout, raw, *asJSON)
	}
	if *asJSON {
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		b, _ := json.MarshalIndent(v, "", "  ")
		fmt.Fprintln(stdout, string(b))
		return nil
	}
	return printReply(stdout, name, raw)
}

// ctlArguments builds the arguments object from ARGS.
func ctlArguments(name string, args []string) (map[string]any, error) {
	if len(args) == 0 {
		return nil, nil
	}
	if len(args) == 1 && strings.HasPrefix(strings.TrimSpace(args[0]), "{") {
		var m map[string]any
		if err := json.Unmarshal([]byte(args[0]), &m); err != nil {
			return nil, usagef("ctl", "arguments %q: %v", args[0], err)
		}
		return m, nil
	}
	m := map[string]any{}
	for i, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			key, known := positionalArg[name]
			if i != 0 || !known {
				return nil, usagef("ctl", "argument %q is not KEY=VALUE", a)
			}
			if key == "path" {
				// The daemon resolves nothing against its own directory.
				abs, err := filepath.Abs(a)
				if err != nil {
					return nil, usagef("ctl", "%v", err)
				}
				a = abs
			}
			m[key] = a
			continue
		}
		var jv any
		if err := json.Unmarshal([]byte(v), &jv); err == nil {
			m[k] = jv
		} else {
			m[k] = v
		}
	}
	return m, nil
}

func printReply(w io.Writer, name string, raw json.RawMessage) error {
	switch name {
	case "query-commands":
		var list []control.CommandInfo
		if err := json.Unmarshal(raw, &list); err != nil {
			return err
		}
		tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		for _, c := range list {
			n := c.Name
			if c.Name == "query-commands" {
				n = "help"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", n, c.Args, c.Help)
		}
		return tw.Flush()
	case "status":
		var s StatusReply
		if err := json.Unmarshal(raw, &s); err != nil {
			return err
		}
		printStatus(w, s)
		return nil
	case "stats":
		var s StatsReply
		if err := json.Unmarshal(raw, &s); err != nil {
			return err
		}
		printStats(w, s)
		return nil
	case "flush":
		var r struct {
			TookNS int64  `json:"took_ns"`
			Note   string `json:"note"`
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			return err
		}
		if r.Note != "" {
			fmt.Fprintln(w, r.Note)
			return nil
		}
		fmt.Fprintf(w, "flushed in %v\n", time.Duration(r.TookNS).Round(time.Microsecond))
		return nil
	case "checkpoint":
		var r CheckpointReply
		if err := json.Unmarshal(raw, &r); err != nil {
			return err
		}
		fmt.Fprintf(w, "writes now go to %s; %s is read-only (chain depth %d, I/O paused %v)\n",
			r.Top, r.Parent, r.Depth, time.Duration(r.PausedNS).Round(time.Microsecond))
		return nil
	case "merge":
		return printMergeReply(w, raw) // ctl_merge.go
	case "resize":
		var r ResizeReply
		if err := json.Unmarshal(raw, &r); err != nil {
			return err
		}
		fmt.Fprintf(w, "resized from %s to %s (I/O paused %v)", formatSize(r.OldSize), formatSize(r.NewSize), time.Duration(r.PausedNS).Round(time.Microsecond))
		if r.Notified {
			fmt.Fprint(w, "; the front-end re-read the capacity")
		}
		if r.Note != "" {
			fmt.Fprint(w, "; "+r.Note)
		}
		fmt.Fprintln(w)
		return nil
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	fmt.Fprintln(w, string(b))
	return nil
}

func printStatus(w io.Writer, s StatusReply) {
	fmt.Fprintf(w, "daemon:      pid %d, %s, up %v\n", s.PID, s.Version, time.Duration(s.UptimeNS).Round(time.Second))
	mode := "read-write"
	if s.ReadOnly {
		mode = "read-only"
	}
	fmt.Fprintf(w, "disk:        %s, %s, write cache %s\n", formatSize(s.VirtualSize), mode, s.WriteCache)
	fmt.Fprintf(w, "host space:  %s\n", formatNoSpace(s.ENOSPC, time.Now()))
	for i, l := range s.Chain {
		role := "top"
		if i > 0 {
			role = fmt.Sprintf("parent %d", i)
		}
		fmt.Fprintf(w, "  %-9s  %s (%s, %s allocated, file %s)\n", role, l.Path, l.Type, formatBytes(l.AllocatedBytes), formatBytes(l.FileSize))
	}
	printMergeStatus(w, s.Merge) // ctl_merge.go
	fe := s.FrontEnd
	defer printSockets(w, fe.Frontends)
	if !fe.Connected {
		fmt.Fprintf(w, "front-end:   not connected (%d connections served)\n", fe.Connections)
		return
	}
	fmt.Fprintf(w, "front-end:   connected (connection %d, for %v)\n", fe.Conn, time.Duration(fe.ConnectedFor).Round(time.Second))
	fmt.Fprintf(w, "  features:  %s\n", strings.Join(fe.FeatureNames, " "))
	fmt.Fprintf(w, "  protocol:  %s\n", strings.Join(fe.ProtocolNames, " "))
	var started, enabled, broken []string
	for _, q := range fe.Queues {
		if q.Started {
			started = append(started, fmt.Sprint(q.Index))
		}
		if q.Enabled {
			enabled = append(enabled, fmt.Sprint(q.Index))
		}
		if q.Broken {
			broken = append(broken, fmt.Sprint(q.Index))
		}
	}
	fmt.Fprintf(w, "  queues:    %d started [%s], %d enabled", len(started), strings.Join(started, " "), len(enabled))
	if len(broken) > 0 {
		fmt.Fprintf(w, ", broken [%s]", strings.Join(broken, " "))
	}
	fmt.Fprintln(w)
}

func formatBytes(n int64) string {
	if n < 0 {
		return "?"
	}
	if n == 0 {
		return "0 B"
	}
	return formatSize(uint64(n))
}

var opOrder = []string{"read", "write", "flush", "discard", "write-zeroes", "get-id", "other"}

func printStats(w io.Writer, s StatsReply) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "queue\top\tops\tbytes\terrors\tp50\tp90\tp99\tp99.9\tmax\t")
	rows := append([]blk.QueueSnapshot{}, s.Queues...)
	rows = append(rows, s.Total)
	for _, q := range rows {
		label := fmt.Sprint(q.Queue)
		if q.Queue < 0 {
			label = "total"
		}
		names := make([]string, 0, len(q.Ops))
		for n := range q.Ops {
			names = append(names, n)
		}
		sort.Slice(names, func(i, j int) bool { return opIndex(names[i]) < opIndex(names[j]) })
		for _, n := range names {
			o := q.Ops[n]
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t\n", label, n, o.Ops, o.Bytes, o.Errors,
				dur(o.P50), dur(o.P90), dur(o.P99), dur(o.P999), dur(o.Max))
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "flushes %d, blocks allocated %d, journal commits %d (the current top: %d, %d), uptime %v\n",
		s.Total.Flushes, s.Image.Allocations, s.Image.JournalCommits, s.ImageTop.Allocations, s.ImageTop.JournalCommits,
		time.Duration(s.UptimeNS).Round(time.Second))
}

func opIndex(name string) int {
	for i, n := range opOrder {
		if n == name {
			return i
		}
	}
	return len(opOrder)
}

func dur(ns uint64) string {
	if ns == 0 {
		return "-"
	}
	return time.Duration(ns).Round(time.Microsecond / 10).String()
}

// watchLine is one interval of ctl stats --watch: rates and latency
// percentiles of the requests between two stats replies, not since the
// daemon started.
type watchLine struct {
	Time          string  `json:"time"`
	ReadOps       float64 `json:"read_ops_per_s"`
	WriteOps      float64 `json:"write_ops_per_s"`
	ReadBytes     float64 `json:"read_bytes_per_s"`
	WriteBytes    float64 `json:"write_bytes_per_s"`
	Flushes       float64 `json:"flush_per_s"`
	Errors        uint64  `json:"errors"` // since the daemon started
	IntervalErrs  uint64  `json:"interval_errors"`
	ReadP50       uint64  `json:"read_p50_ns"` // 0: no read timed in the interval
	ReadP99       uint64  `json:"read_p99_ns"`
	WriteP50      uint64  `json:"write_p50_ns"`
	WriteP99      uint64  `json:"write_p99_ns"`
	ImageAllocs   uint64  `json:"allocations"` // in the interval
	JournalCommit uint64  `json:"journal_commits"`
}

// interval computes the watch line from two stats replies taken with
// their histograms; every is the nominal interval, used if the uptimes
// give none.
func interval(cur, prev StatsReply, every time.Duration, now time.Time) watchLine {
	secs := float64(cur.UptimeNS-prev.UptimeNS) / 1e9
	if secs <= 0 {
		secs = every.Seconds()
	}
	iv := blk.Interval(cur.Total, prev.Total)
	r, w := iv.Ops["read"], iv.Ops["write"]
	l := watchLine{
		Time:    now.UTC().Format(time.RFC3339),
		ReadOps: float64(r.Ops) / secs, WriteOps: float64(w.Ops) / secs,
		ReadBytes: float64(r.Bytes) / secs, WriteBytes: float64(w.Bytes) / secs,
		Flushes: float64(iv.Ops["flush"].Ops) / secs,
		ReadP50: r.P50, ReadP99: r.P99, WriteP50: w.P50, WriteP99: w.P99,
		ImageAllocs:   cur.Image.Allocations - min(prev.Image.Allocations, cur.Image.Allocations),
		JournalCommit: cur.Image.JournalCommits - min(prev.Image.JournalCommits, cur.Image.JournalCommits),
	}
	for _, o := range cur.Total.Ops {
		l.Errors += o.Errors
	}
	for _, o := range iv.Ops {
		l.IntervalErrs += o.Errors
	}
	return l
}

// watchStats prints one line per interval: requests and bytes per second
// by type, errors, and read and write latency p50/p99, all of the
// requests since the previous line. It asks for the histograms (stats
// buckets=true) and subtracts (blk.Interval); a daemon that sends none
// gets "-" for the percentiles.
func watchStats(ctx context.Context, cl *control.Client, w io.Writer, every time.Duration, count int, asJSON bool) error {
	get := func() (StatsReply, error) {
		var s StatsReply
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		err := cl.Call(cctx, "stats", map[string]any{"buckets": true}, &s)
		return s, err
	}
	prev, err := get()
	if err != nil {
		return fmt.Errorf("ctl stats: %w", err)
	}
	if !asJSON {
		fmt.Fprintf(w, "%-8s %9s %9s %9s %9s %8s %6s %9s %9s %9s %9s\n", "time", "read/s", "write/s", "rMiB/s", "wMiB/s", "flush/s", "errors", "read p50", "read p99", "write p50", "write p99")
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for n := 0; count == 0 || n < count; n++ {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur, err := get()
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return fmt.Errorf("ctl stats: %w", err)
		}
		l := interval(cur, prev, every, time.Now())
		if asJSON {
			b, _ := json.Marshal(l)
			fmt.Fprintln(w, string(b))
		} else {
			fmt.Fprintf(w, "%-8s %9.0f %9.0f %9.2f %9.2f %8.0f %6d %9s %9s %9s %9s\n", time.Now().Format("15:04:05"),
				l.ReadOps, l.WriteOps, l.ReadBytes/(1<<20), l.WriteBytes/(1<<20), l.Flushes,
				l.IntervalErrs, dur(l.ReadP50), dur(l.ReadP99), dur(l.WriteP50), dur(l.WriteP99))
		}
		prev = cur
	}
	return nil
}

// printSockets lists each socket's front-end when the disk is served on
// several sockets (a migration on one host).
func printSockets(w io.Writer, fs []vhostuser.FrontendStatus) {
	if len(fs) < 2 {
		return
	}
	// One disk on several sockets: each socket's front-end.
	for _, f := range fs {
		switch {
		case !f.Connected:
			fmt.Fprintf(w, "  socket     %s: not connected\n", f.Socket)
		default:
			started := 0
			for _, q := range f.Queues {
				if q.Started {
					started++
				}
			}
			active := ""
			if f.Active {
				active = ", active"
			}
			fmt.Fprintf(w, "  socket     %s: connection %d%s, %d queues started\n", f.Socket, f.Conn, active, started)
		}
	}
}
