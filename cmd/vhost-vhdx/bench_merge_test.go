package main

import (
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/loadgen"
)

// The merge table shows the medians of the idle and merging runs and the
// IOPS lost; results without merge rows print no table.
func TestBenchReportShowsTheIOPSAMergeCosts(t *testing.T) {
	rec := func(wl string, run int, iops float64) benchRecord {
		return benchRecord{Backend: "ours", Workload: wl, Run: run, Result: &loadgen.Result{IOPS: iops, BackendCPUPerIO: -1}}
	}
	recs := []benchRecord{
		rec(wlMergeIdle, 1, 1000), rec(wlMergeIdle, 2, 1200), rec(wlMergeIdle, 3, 800),
		rec(wlMergeRunning, 1, 700), rec(wlMergeRunning, 2, 750), rec(wlMergeRunning, 3, 600),
	}
	var b strings.Builder
	writeMergeTable(&b, summarizeRecords(recs))
	out := b.String()
	for _, want := range []string{"| no merge | 1000 |", "| merge running | 700 |", "IOPS with a merge running / without: 0.70×"} {
		if !strings.Contains(out, want) {
			t.Errorf("merge table lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	writeMergeTable(&b, summarizeRecords(recs[:3]))
	if b.Len() != 0 {
		t.Errorf("a table without merge-running rows:\n%s", b.String())
	}
}
