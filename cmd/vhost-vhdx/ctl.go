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
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

const ctlUsage = `Usage: vhost-vhdx ctl SOCKET COMMAND [ARGS] [--json]
       vhost-vhdx ctl SOCKET stats --watch [--interval D] [--count N]
       vhost-vhdx ctl SOCKET help

Run COMMAND on the daemon listening on SOCKET (serve --control-socket).
'help' lists the commands the daemon offers. ARGS are KEY=VALUE pairs
(VALUE is JSON if it parses as JSON, otherwise a string) or one JSON
object; resize also takes its size alone:

  vhost-vhdx ctl /run/vm1.ctl status
  vhost-vhdx ctl /run/vm1.ctl resize +1G
  vhost-vhdx ctl /run/vm1.ctl flush
  vhost-vhdx ctl /run/vm1.ctl checkpoint /var/lib/vm1/after-update.vhdx

Options:
  --json        print the daemon's reply as JSON
  --watch       (stats) print one line of rates per interval until interrupted
  --interval D  --watch interval (default 1s)
  --count N     --watch: stop after N lines (default: never)
  --timeout D   give up on a reply after D (default 60s; 0: never)
`

// positionalArg names the argument a command's first bare ARG fills.
var positionalArg = map[string]string{"resize": "size", "checkpoint": "path"}

func runCtl(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ctl")
	asJSON := fs.Bool("json", false, "")
	watch := fs.Bool("watch", false, "")
	interval := fs.Duration("interval", time.Second, "")
	count := fs.Int("count", 0, "")
	timeout := fs.Duration("timeout", 60*time.Second, "")
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
	fe := s.FrontEnd
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
	fmt.Fprintf(w, "flushes %d, blocks allocated %d, journal commits %d, uptime %v\n",
		s.Total.Flushes, s.Image.Allocations, s.Image.JournalCommits, time.Duration(s.UptimeNS).Round(time.Second))
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

// watchStats prints one line of rates per interval: requests and bytes
// per second by type since the previous sample, errors, and the p99 of
// all requests so far.
func watchStats(ctx context.Context, cl *control.Client, w io.Writer, every time.Duration, count int, asJSON bool) error {
	var prev StatsReply
	get := func() (StatsReply, error) {
		var s StatsReply
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		err := cl.Call(cctx, "stats", nil, &s)
		return s, err
	}
	prev, err := get()
	if err != nil {
		return fmt.Errorf("ctl stats: %w", err)
	}
	if !asJSON {
		fmt.Fprintf(w, "%-8s %9s %9s %10s %10s %8s %7s %10s %10s\n", "time", "read/s", "write/s", "rMiB/s", "wMiB/s", "flush/s", "errors", "read p99", "write p99")
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
		secs := float64(cur.UptimeNS-prev.UptimeNS) / 1e9
		if secs <= 0 {
			secs = every.Seconds()
		}
		rate := func(op string, f func(blk.OpSnapshot) uint64) float64 {
			return float64(f(cur.Total.Ops[op])-f(prev.Total.Ops[op])) / secs
		}
		ops := func(o blk.OpSnapshot) uint64 { return o.Ops }
		byt := func(o blk.OpSnapshot) uint64 { return o.Bytes }
		var errs uint64
		for _, o := range cur.Total.Ops {
			errs += o.Errors
		}
		if asJSON {
			b, _ := json.Marshal(map[string]any{
				"time": time.Now().UTC().Format(time.RFC3339), "read_ops_per_s": rate("read", ops), "write_ops_per_s": rate("write", ops),
				"read_bytes_per_s": rate("read", byt), "write_bytes_per_s": rate("write", byt), "flush_per_s": rate("flush", ops),
				"errors": errs, "read_p99_ns": cur.Total.Ops["read"].P99, "write_p99_ns": cur.Total.Ops["write"].P99,
			})
			fmt.Fprintln(w, string(b))
		} else {
			fmt.Fprintf(w, "%-8s %9.0f %9.0f %10.2f %10.2f %8.0f %7d %10s %10s\n", time.Now().Format("15:04:05"),
				rate("read", ops), rate("write", ops), rate("read", byt)/(1<<20), rate("write", byt)/(1<<20), rate("flush", ops),
				errs, dur(cur.Total.Ops["read"].P99), dur(cur.Total.Ops["write"].P99))
		}
		prev = cur
	}
	return nil
}
