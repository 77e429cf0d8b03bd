package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/loadgen"
)

// TestBenchPwriteOverwritesWholeAlignedBlocksAndKeepsTheFileSize: the
// ceiling loop writes only whole --bs blocks at --bs-aligned offsets inside
// the file, never grows or truncates it, and reports what it did.
func TestBenchPwriteOverwritesWholeAlignedBlocksAndKeepsTheFileSize(t *testing.T) {
	const size, bs = 1 << 20, 4096
	file := filepath.Join(t.TempDir(), "ceiling.raw")
	if err := os.WriteFile(file, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runCLI(t, "bench", "pwrite", "--json", "--runtime", "50ms", "--seed", "7", file)
	if code != 0 {
		t.Fatalf("bench pwrite: status %d: %s", code, stderr)
	}
	var r loadgen.Result
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("output %q: %v", stdout, err)
	}
	if r.RW != "randwrite" || r.BS != bs || r.IOs == 0 || r.Writes != r.IOs || r.Bytes != r.IOs*bs ||
		r.IOPS <= 0 || r.Seconds <= 0 || r.BackendCPUPerIO < 0 || r.Latency.Count != r.IOs || r.Capacity != size {
		t.Errorf("result %+v", r)
	}
	got, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != size {
		t.Fatalf("file is %d bytes after the run, want %d", len(got), size)
	}
	// Every write carries the same buffer: each block is either untouched
	// (zeros) or that buffer, whole.
	var pattern []byte
	written := 0
	for off := 0; off < size; off += bs {
		blk := got[off : off+bs]
		if bytes.Equal(blk, make([]byte, bs)) {
			continue
		}
		written++
		if pattern == nil {
			pattern = blk
		} else if !bytes.Equal(blk, pattern) {
			t.Fatalf("block at %d is not the written buffer: a write was torn or misaligned", off)
		}
	}
	if written == 0 {
		t.Error("no block of the file changed")
	}
}

func TestBenchPwriteRefusesWhatItCannotOverwrite(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	if err := os.WriteFile(small, make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"missing file", []string{missing}, exitFailure, "no such file"},
		{"a directory", []string{dir}, exitFailure, ""},
		{"smaller than one block", []string{small}, exitFailure, "holds no 4096-byte block"},
		{"block size not a multiple of 512", []string{"--bs", "1000", small}, exitFailure, "multiple of 512"},
		{"no file", nil, exitUsage, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, append([]string{"bench", "pwrite", "--runtime", "10ms"}, tc.args...)...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Errorf("status %d, stderr %q; want status %d mentioning %q", code, stderr, tc.code, tc.want)
			}
		})
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("bench pwrite created %s: %v", missing, err)
	}
}

// TestBenchReportShowsTheRandwriteCeilingAndKeepsItOutOfTheCPUTarget: the
// bare pwrite loop's records give the allocated randwrite row its ceiling
// (the loop against qsd: the highest ratio any back-end could reach) and
// ours against it; the loop is no back-end, so its CPU time never becomes
// the worst row of the CPU target.
func TestBenchReportShowsTheRandwriteCeilingAndKeepsItOutOfTheCPUTarget(t *testing.T) {
	var in strings.Builder
	for run := 1; run <= 3; run++ {
		in.WriteString(benchLine("ours", wlRandWrite32, run, 32, 140000, 200, 7))
		in.WriteString(benchLine("qsd", wlRandWrite32, run, 32, 70000, 400, 20))
		in.WriteString(benchLine("pwrite", wlRandWrite32, run, 1, 175000, 5, 100))
	}
	_, stdout, _ := reportOf(t, in.String(), "--rows-svg")
	reportHas(t, "report", stdout,
		"| 4K randwrite QD32, allocated | qsd | 140000 | 70000 | 2.00× |",
		"(the most a back-end can do) | pwrite vs qsd | 175000 | 70000 | 2.50× |",
		"| … ours against that ceiling | pwrite | 140000 | 175000 | 0.80× |",
		"| back-end CPU per I/O ≤ 0.7× qsd (worst 4K workload: randwrite-4k-qd32) | 4 | 0.35× | **met** |",
	)
}
