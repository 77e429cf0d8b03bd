package main

// ctl's side of merge: --rate and --wait, and printing a merge's progress.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// mergeFlags adds --rate to merge's arguments and refuses --rate and
// --wait with other commands.
func mergeFlags(name string, args map[string]any, rate string, wait bool) (map[string]any, error) {
	if name != "merge" {
		if rate != "" || wait {
			return nil, usagef("ctl", "--rate and --wait work with merge only")
		}
		return args, nil
	}
	if rate != "" {
		if args == nil {
			args = map[string]any{}
		}
		args["rate"] = rate
	}
	return args, nil
}

func printMergeReply(w io.Writer, raw json.RawMessage) error {
	var r MergeReply
	if err := json.Unmarshal(raw, &r); err != nil {
		return err
	}
	rate := "unbounded"
	if r.Rate > 0 {
		rate = formatBytes(r.Rate) + "/s"
	}
	fmt.Fprintf(w, "merging %s into %s: %s to copy, rate %s; `status` shows progress\n", r.Top, r.Parent, formatBytes(r.Total), rate)
	return nil
}

func printMergeStatus(w io.Writer, m *MergeStatus) {
	if m == nil {
		return
	}
	fmt.Fprintf(w, "merge:       %s, %s of %s copied", m.State, formatBytes(m.Done), formatBytes(m.Total))
	if m.Recopied > 0 {
		fmt.Fprintf(w, " (+%s written meanwhile)", formatBytes(m.Recopied))
	}
	if m.Running && m.Rate > 0 {
		fmt.Fprintf(w, ", rate %s/s", formatBytes(m.Rate))
	}
	if m.PausedNS > 0 {
		fmt.Fprintf(w, ", final pass paused I/O %v", time.Duration(m.PausedNS).Round(time.Microsecond))
	}
	if m.Error != "" {
		fmt.Fprintf(w, ": %s", m.Error)
	}
	fmt.Fprintf(w, "\n  %s -> %s\n", m.Top, m.Parent)
}

// waitMerge prints the merge's progress every second until it ends; it
// fails unless the merge is done.
func waitMerge(ctx context.Context, cl *control.Client, w io.Writer, started json.RawMessage, asJSON bool) error {
	if !asJSON {
		if err := printMergeReply(w, started); err != nil {
			return err
		}
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var s StatusReply
		if err := cl.Call(ctx, "status", nil, &s); err != nil {
			return fmt.Errorf("ctl merge --wait: %w", err)
		}
		m := s.Merge
		if m == nil {
			return errors.New("ctl merge --wait: the daemon reports no merge")
		}
		if !m.Running {
			if asJSON {
				b, _ := json.MarshalIndent(m, "", "  ")
				fmt.Fprintln(w, string(b))
			} else {
				printMergeStatus(w, m)
			}
			if m.State != "done" {
				return fmt.Errorf("ctl merge: the merge ended %s", m.State)
			}
			return nil
		}
		if !asJSON {
			fmt.Fprintf(w, "%s: %s of %s\n", m.State, formatBytes(m.Done), formatBytes(m.Total))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}
