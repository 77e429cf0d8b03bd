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

const benchPwriteUsage = `Usage: vhost-vhdx bench pwrite [--json] [--bs SIZE] [--runtime DUR] [--seed N] FILE

Overwrite FILE, from one thread, with --bs-sized pwrite(2)s at random
aligned offsets for --runtime (default 3s), and print the writes per
second. FILE must exist; its size stays, its content is destroyed.

This is the ceiling of random overwrites of a cached file: what any back-end
serving an image copied the same way could do at best (make bench runs it
beside the allocated 4K randwrite row; docs/benchmarks/profile.md).
`

func runBenchPwrite(args []string, stdout io.Writer) error {
	fs := newFlagSet("bench pwrite")
	asJSON := fs.Bool("json", false, "")
	var bs sizeFlag
	fs.Var(&bs, "bs", "")
	runtime := fs.Duration("runtime", 3*time.Second, "")
	seed := fs.Uint64("seed", 0, "")
	pos, err := parseArgs(fs, args, benchPwriteUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	c := loadgen.PwriteConfig{File: pos[0], BS: 4096, Runtime: *runtime, Seed: *seed}
	if bs.set {
		if bs.v > loadgen.MaxBS {
			return usagef("bench pwrite", "--bs %d: at most %d", bs.v, loadgen.MaxBS)
		}
		c.BS = int(bs.v)
	}
	if c.Seed == 0 {
		c.Seed = uint64(time.Now().UnixNano())
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := loadgen.Pwrite(ctx, c)
	if err != nil {
		return fmt.Errorf("bench pwrite: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "pwrite %d B at random offsets of %s: %.0f writes/s, %.2f µs CPU each (p50 %.1f µs, p99 %.1f µs)\n",
		res.BS, c.File, res.IOPS, res.BackendCPUPerIO, res.Latency.P50, res.Latency.P99)
	return nil
}
