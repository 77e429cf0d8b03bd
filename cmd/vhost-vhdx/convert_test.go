package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// infoOut mirrors the JSON of `info --json` (vhdx.Info with the type as
// text).
type infoOut struct {
	VirtualSize        uint64 `json:"virtual_size"`
	Type               string `json:"type"`
	BlockSize          uint32 `json:"block_size"`
	LogicalSectorSize  uint32 `json:"logical_sector_size"`
	PhysicalSectorSize uint32 `json:"physical_sector_size"`
	AllocatedBytes     int64  `json:"allocated_bytes"`
	DiskID             string `json:"disk_id"`
	LogGUID            string `json:"log_guid"`
}

func infoJSON(t *testing.T, path string) infoOut {
	t.Helper()
	code, stdout, stderr := runCLI(t, "info", "--json", path)
	if code != 0 {
		t.Fatalf("info --json %s: status %d: %s", path, code, stderr)
	}
	var in infoOut
	if err := json.Unmarshal([]byte(stdout), &in); err != nil {
		t.Fatalf("info --json output does not parse: %v\n%s", err, stdout)
	}
	return in
}

func mapJSON(t *testing.T, path string) []mapExtent {
	t.Helper()
	code, stdout, stderr := runCLI(t, "map", "--json", path)
	if code != 0 {
		t.Fatalf("map --json %s: status %d: %s", path, code, stderr)
	}
	var exts []mapExtent
	if err := json.Unmarshal([]byte(stdout), &exts); err != nil {
		t.Fatalf("map --json output does not parse: %v\n%s", err, stdout)
	}
	return exts
}

// convertToRaw converts src (with any further convert flags) to the raw
// file dst and returns dst's bytes.
func convertToRaw(t *testing.T, src, dst string, flags ...string) []byte {
	t.Helper()
	mustRun(t, append(append([]string{"convert", "-O", "raw"}, flags...), src, dst)...)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	code, stdout, stderr := runCLI(t, args...)
	if code != 0 {
		t.Fatalf("%q: status %d: %s", args, code, stderr)
	}
	if stderr != "" {
		t.Errorf("%q wrote to stderr (not a terminal): %q", args, stderr)
	}
	return stdout
}

// testRaw builds a raw disk of size bytes holding data in a few places,
// including runs of explicitly written zeros that convert must not
// allocate.
func testRaw(t *testing.T, path string, size int, writes map[int]int) []byte {
	t.Helper()
	b := make([]byte, size)
	for off, n := range writes {
		for i := range n {
			b[off+i] = byte(off/512 + i*13 + 1)
			if b[off+i] == 0 {
				b[off+i] = 1
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCreateInfoConvertMapCheckRoundTrip(t *testing.T) {
	qemuImg := vhdxtest.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "new.vhdx")
	raw := filepath.Join(dir, "disk.raw")
	conv := filepath.Join(dir, "conv.vhdx")
	back := filepath.Join(dir, "back.raw")
	const mib = 1 << 20

	mustRun(t, "create", "--size", "64M", "--block-size", "1M", "--disk-id", "6ba7b810-9dad-11d1-80b4-00c04fd430c8", img)
	info := infoJSON(t, img)
	want := infoOut{VirtualSize: 64 * mib, Type: "dynamic", BlockSize: mib, LogicalSectorSize: 512, PhysicalSectorSize: 4096,
		DiskID: "6ba7b810-9dad-11d1-80b4-00c04fd430c8", LogGUID: "00000000-0000-0000-0000-000000000000"}
	if info != want {
		t.Errorf("info of a new image:\n got %+v\nwant %+v", info, want)
	}
	if human := mustRun(t, "info", img); !strings.Contains(human, "virtual size:") || !strings.Contains(human, "64 MiB") {
		t.Errorf("human info lacks the size:\n%s", human)
	}

	// Data in blocks 0, 5 (crossing into 6) and the last sector; block 3
	// holds written zeros.
	size := 20*mib + 3*512
	data := testRaw(t, raw, size, map[int]int{0: 4096, 5*mib + 123*512: 2 * mib, size - 512: 512})
	mustRun(t, "convert", "-O", "vhdx", "--block-size", "1M", raw, conv)

	info = infoJSON(t, conv)
	if wantSize := uint64(size); info.VirtualSize != wantSize {
		t.Errorf("converted virtual size %d, want %d", info.VirtualSize, wantSize)
	}
	wantBlocks := []int64{0, 5, 6, 7, 20}
	if info.AllocatedBytes != int64(len(wantBlocks))*mib {
		t.Errorf("allocated %d bytes, want %d blocks", info.AllocatedBytes, len(wantBlocks))
	}
	var gotBlocks []int64
	for _, e := range mapJSON(t, conv) {
		if e.Data {
			if e.FileOffset == 0 {
				t.Errorf("data extent %+v has no file offset", e)
			}
			for off := e.Offset; off < e.Offset+e.Length; off += mib {
				gotBlocks = append(gotBlocks, off/mib)
			}
		}
	}
	if !slices.Equal(gotBlocks, wantBlocks) {
		t.Errorf("map shows data blocks %v, want %v", gotBlocks, wantBlocks)
	}
	if table := mustRun(t, "map", conv); !strings.Contains(table, "data") || !strings.Contains(table, "zero") {
		t.Errorf("map table lacks data/zero rows:\n%s", table)
	}

	got := convertToRaw(t, conv, back)
	if !bytes.Equal(got, data) {
		t.Errorf("raw -> vhdx -> raw differs (len %d vs %d)", len(got), len(data))
	}

	if out := mustRun(t, "check", conv); !strings.Contains(out, "No errors found") {
		t.Errorf("check on a clean image: %q", out)
	}

	for _, args := range [][]string{
		{"check", "-f", "vhdx", conv},
		{"compare", "-f", "raw", "-F", "vhdx", raw, conv},
		{"compare", "-f", "raw", "-F", "raw", raw, back},
	} {
		if out, err := exec.Command(qemuImg, args...).CombinedOutput(); err != nil {
			t.Errorf("qemu-img %q: %v\n%s", args, err, out)
		}
	}
}

func TestConvertRawPadsTheTailToTheLogicalSector(t *testing.T) {
	for _, tc := range []struct {
		name      string
		rawSize   int
		flags     []string
		wantSize  uint64
		wantBlock uint32
	}{
		{"1000 bytes become two 512-byte sectors", 1000, nil, 1024, 0},
		{"5000 bytes become two 4096-byte sectors", 5000, []string{"--logical-sector", "4096", "--physical-sector", "4096"}, 8192, 0},
		{"fixed image", 3 << 20, []string{"--type", "fixed", "--block-size", "1M"}, 3 << 20, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			raw, conv, back := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out.vhdx"), filepath.Join(dir, "back.raw")
			data := testRaw(t, raw, tc.rawSize, map[int]int{0: min(tc.rawSize, 4096), tc.rawSize - 7: 7})
			mustRun(t, append(append([]string{"convert", "-O", "vhdx"}, tc.flags...), raw, conv)...)
			info := infoJSON(t, conv)
			if info.VirtualSize != tc.wantSize {
				t.Errorf("virtual size %d, want %d", info.VirtualSize, tc.wantSize)
			}
			if tc.wantBlock != 0 && info.BlockSize != tc.wantBlock {
				t.Errorf("block size %d, want %d", info.BlockSize, tc.wantBlock)
			}
			got := convertToRaw(t, conv, back)
			wantBack := append(bytes.Clone(data), make([]byte, int(tc.wantSize)-len(data))...)
			if !bytes.Equal(got, wantBack) {
				t.Errorf("round trip differs: got %d bytes", len(got))
			}
		})
	}
}

func TestConvertVHDXToVHDXKeepsTheSourceSectorSizes(t *testing.T) {
	dir := t.TempDir()
	raw, a, b, back := filepath.Join(dir, "in.raw"), filepath.Join(dir, "a.vhdx"), filepath.Join(dir, "b.vhdx"), filepath.Join(dir, "back.raw")
	data := testRaw(t, raw, 4<<20, map[int]int{3 << 20: 8192})
	mustRun(t, "convert", "-O", "vhdx", "--logical-sector", "4096", "--physical-sector", "4096", raw, a)
	mustRun(t, "convert", "-O", "vhdx", a, b)
	info := infoJSON(t, b)
	if info.LogicalSectorSize != 4096 || info.PhysicalSectorSize != 4096 {
		t.Errorf("sector sizes %d/%d, want 4096/4096", info.LogicalSectorSize, info.PhysicalSectorSize)
	}
	if got := convertToRaw(t, b, back, "-f", "vhdx"); !bytes.Equal(got, data) {
		t.Error("vhdx -> vhdx -> raw differs from the source")
	}
}

func TestConvertLeavesNoDestinationBehindOnFailure(t *testing.T) {
	dir := t.TempDir()
	raw, dst := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out.vhdx")
	testRaw(t, raw, 4096, map[int]int{0: 10})
	// A block size vhdx refuses makes the create step fail.
	code, _, stderr := runCLI(t, "convert", "-O", "vhdx", "--block-size", "3M", raw, dst)
	if code != 1 || !strings.Contains(stderr, "block size") {
		t.Errorf("status %d, stderr %q", code, stderr)
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Errorf("destination left behind: %v", err)
	}
	// A raw source that does not exist.
	code, _, stderr = runCLI(t, "convert", "-O", "raw", filepath.Join(dir, "nope"), dst)
	if code != 1 || !strings.Contains(stderr, "no such file") {
		t.Errorf("status %d, stderr %q", code, stderr)
	}
}

func TestProgressOnlyDrawsOnATerminal(t *testing.T) {
	var buf bytes.Buffer
	p := newProgress(&buf, 100)
	p.update(50)
	p.finish(true)
	if buf.Len() != 0 {
		t.Errorf("progress wrote %q to a non-terminal", buf.String())
	}
	f, err := os.CreateTemp(t.TempDir(), "notatty")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) {
		t.Error("a regular file was taken for a terminal")
	}
}
