package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/hostile"
)

// hostileTimeout bounds a whole `bench --hostile` run, so a back-end that
// wedges on a case is reported instead of hanging the command.
const hostileTimeout = 2 * time.Minute

// runBenchHostile is `vhost-vhdx bench --hostile --socket PATH`: it runs the
// hostile front-end and guest suite (vhostuser/frontend/hostile) against
// the back-end at socket, each case on a fresh connection followed by a
// normal connection that must negotiate and flush, and prints one line per
// case. It returns an error if any case failed.
//
// The bench command's flag parsing (bench.go) calls it when --hostile is
// given; no load is generated then.
func runBenchHostile(ctx context.Context, socket string, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, hostileTimeout)
	defer cancel()
	total := len(hostile.Cases())
	ran := 0
	failed := hostile.Run(ctx, socket, func(name string, err error) {
		ran++
		if err != nil {
			fmt.Fprintf(stdout, "FAIL  %s: %v\n", name, err)
			return
		}
		fmt.Fprintf(stdout, "ok    %s\n", name)
	})
	fmt.Fprintf(stdout, "hostile: %d of %d cases passed", ran-failed, total)
	if ran < total {
		fmt.Fprintf(stdout, " (%d not run: the back-end stopped serving)", total-ran)
	}
	fmt.Fprintln(stdout)
	if failed > 0 || ran < total {
		return fmt.Errorf("bench --hostile: %d of %d cases failed", failed+total-ran, total)
	}
	return nil
}
