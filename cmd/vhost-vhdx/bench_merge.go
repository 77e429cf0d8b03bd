package main

// The live merge rows of `bench report`: 4K randrw QD8 on a served chain
// with no merge and while a merge runs (scripts/bench_merge.sh), vhost-vhdx
// only (qemu-storage-daemon has no live merge of a vhost-user export).

import (
	"fmt"
	"io"
)

const (
	wlMergeIdle    = "merge-idle"
	wlMergeRunning = "merge-running"
)

// writeMergeTable prints the merge table when the results have its rows.
func writeMergeTable(w io.Writer, s benchSummary) {
	idle, running := s.get(wlMergeIdle, "ours"), s.get(wlMergeRunning, "ours")
	if idle.runs == 0 || running.runs == 0 {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "What a running live merge costs the guest (4K randrw QD8 on a checkpoint over the base, vhost-vhdx; medians):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| | IOPS | p50 µs | p99 µs | back-end CPU µs/IO | runs |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|")
	for _, r := range []struct {
		name string
		st   *stats
	}{{"no merge", idle}, {"merge running", running}} {
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %d |\n", r.name, fmtNum(r.st.iops, 0), fmtNum(r.st.p50, 1), fmtNum(r.st.p99, 1), fmtNum(r.st.beCPU, 2), r.st.runs)
	}
	fmt.Fprintf(w, "\nIOPS with a merge running / without: %s.\n", fmtRatio(ratio(running.iops, idle.iops)))
}
