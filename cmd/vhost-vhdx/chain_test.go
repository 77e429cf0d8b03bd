package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// chainWrite is one write into one layer of a test chain.
type chainWrite struct {
	layer int
	off   int64
	n     int
}

// fill returns n bytes that differ per layer and offset, never all zero.
func fill(layer int, off int64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(int64(layer*71) + (off+int64(i))/512*13 + int64(i%251) + 1)
	}
	return b
}

// testChain creates base.vhdx of size bytes and depth children over it
// (child1.avhdx ...) in dir, applying the writes of each layer before the
// next is created. It returns the paths, base first, and what the top
// must read.
func testChain(t *testing.T, dir string, size int64, lss uint32, depth int, writes []chainWrite) ([]string, []byte) {
	t.Helper()
	paths := []string{filepath.Join(dir, "base.vhdx")}
	mustRun(t, "create", "--size", fmt.Sprint(size), "--block-size", "1M", "--logical-sector", fmt.Sprint(lss), paths[0])
	want := make([]byte, size)
	for layer := 0; layer <= depth; layer++ {
		if layer > 0 {
			p := filepath.Join(dir, fmt.Sprintf("child%d.avhdx", layer))
			mustRun(t, "create", "--parent", paths[layer-1], p)
			paths = append(paths, p)
		}
		im, err := vhdx.Open(paths[layer], vhdx.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range writes {
			if w.layer != layer {
				continue
			}
			d := fill(layer, w.off, w.n)
			if _, err := im.WriteAt(d, w.off); err != nil {
				t.Fatalf("layer %d: write %#x: %v", layer, w.off, err)
			}
			copy(want[w.off:], d)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return paths, want
}

// parentsOf lists the parents of the top of paths, nearest first.
func parentsOf(paths []string) []string {
	var ps []string
	for i := len(paths) - 2; i >= 0; i-- {
		ps = append(ps, paths[i])
	}
	return ps
}

// standardChainWrites: single sectors, runs across block boundaries, whole
// blocks and the last sector, spread over three layers so each upper
// layer hides part of the lower ones.
func standardChainWrites(size int64, lss int64) []chainWrite {
	const mib = 1 << 20
	return []chainWrite{
		{0, 0, 3 * mib}, {0, size - 2*lss, int(2 * lss)},
		{1, lss, int(lss)}, {1, mib - lss, int(2 * lss)}, {1, 5 * mib, mib},
		{2, 2 * lss, int(lss)}, {2, mib, int(lss)}, {2, 5*mib + 4*lss, int(lss)}, {2, size - lss, int(lss)},
		{3, 0, int(lss)}, {3, 7*mib - lss, int(3 * lss)},
	}
}

// TestConvertFlattensAChain: converting a child copies what the whole chain
// reads, to raw and to a standalone VHDX, byte-equal to what libvhdi and
// 7-Zip read from the chain.
func TestConvertFlattensAChain(t *testing.T) {
	for _, lss := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("lss%d", lss), func(t *testing.T) {
			dir := t.TempDir()
			size := int64(12<<20) + 2*lss
			paths, want := testChain(t, dir, size, uint32(lss), 3, standardChainWrites(size, lss))
			top := paths[len(paths)-1]
			sameBytes(t, "libvhdi reading the chain", vhdxtest.ReadWithLibvhdi(t, top, parentsOf(paths)...), want)
			sameBytes(t, "7-Zip reading the chain", vhdxtest.ReadWith7zip(t, top), want)

			raw := filepath.Join(dir, "flat.raw")
			got := convertToRaw(t, top, raw)
			sameBytes(t, "convert -O raw of the top", got, want)

			flat := filepath.Join(dir, "flat.vhdx")
			mustRun(t, "convert", "-O", "vhdx", top, flat)
			if in := infoJSON(t, flat); in.Type != "dynamic" || in.LogicalSectorSize != uint32(lss) {
				t.Errorf("converted image is %s with %d-byte sectors, want a standalone dynamic image with %d", in.Type, in.LogicalSectorSize, lss)
			}
			sameBytes(t, "7-Zip reading convert -O vhdx of the top", vhdxtest.ReadWith7zip(t, flat), want)
		})
	}
}

// TestInfoBackingChainShowsEveryLayer: info --backing-chain lists the image
// and every layer below it, each linked to the next by parent_linkage =
// the parent's DataWriteGuid; without the flag only the image.
func TestInfoBackingChainShowsEveryLayer(t *testing.T) {
	dir := t.TempDir()
	size := int64(8 << 20)
	paths, _ := testChain(t, dir, size, 512, 2, []chainWrite{{0, 0, 4096}, {1, 4096, 512}})
	top := paths[2]
	code, stdout, stderr := runCLI(t, "info", "--backing-chain", "--json", top)
	if code != 0 {
		t.Fatalf("info --backing-chain --json: status %d: %s", code, stderr)
	}
	var layers []struct {
		Type          string `json:"type"`
		VirtualSize   int64  `json:"virtual_size"`
		DataWriteGUID string `json:"data_write_guid"`
		ParentPath    string `json:"parent_path"`
		ParentLinkage string `json:"parent_linkage"`
	}
	if err := json.Unmarshal([]byte(stdout), &layers); err != nil {
		t.Fatalf("output does not parse: %v\n%s", err, stdout)
	}
	if len(layers) != 3 {
		t.Fatalf("%d layers, want 3:\n%s", len(layers), stdout)
	}
	for i, l := range layers {
		wantType := "differencing"
		if i == 2 {
			wantType = "dynamic"
		}
		if l.Type != wantType || l.VirtualSize != size {
			t.Errorf("layer %d: type %s size %d, want %s %d", i, l.Type, l.VirtualSize, wantType, size)
		}
		if i < 2 && (l.ParentPath != paths[1-i] || l.ParentLinkage != layers[i+1].DataWriteGUID) {
			t.Errorf("layer %d: parent %q linkage %s, want %q and the parent's DataWriteGuid %s",
				i, l.ParentPath, l.ParentLinkage, paths[1-i], layers[i+1].DataWriteGUID)
		}
	}
	if one := infoJSON(t, top); one.Type != "differencing" {
		t.Errorf("info --json without --backing-chain: %+v", one)
	}
	human := mustRun(t, "info", "--backing-chain", top)
	for _, want := range []string{"image:  " + top, "parent:  " + paths[1], "layer:  2", "image:  " + paths[0]} {
		if !strings.Contains(strings.Join(strings.Fields(human), "  "), strings.Join(strings.Fields(want), "  ")) {
			t.Errorf("info --backing-chain lacks %q:\n%s", want, human)
		}
	}
}

// TestMapNamesTheLayerOfEveryExtent: each data extent of map names a layer
// and its file, and the bytes at file_offset in that file are exactly what
// the chain reads there; zero extents read as zeros.
func TestMapNamesTheLayerOfEveryExtent(t *testing.T) {
	dir := t.TempDir()
	const lss = 512
	size := int64(12<<20) + 2*lss
	paths, want := testChain(t, dir, size, lss, 3, standardChainWrites(size, lss))
	files := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files[p] = b
	}
	layerOf := map[string]int{paths[3]: 0, paths[2]: 1, paths[1]: 2, paths[0]: 3}
	seen := map[int]bool{}
	next := int64(0)
	for _, e := range mapJSON(t, paths[3]) {
		if e.Offset != next || e.Length <= 0 {
			t.Fatalf("extent %+v does not follow the previous one (at %#x)", e, next)
		}
		next += e.Length
		got := make([]byte, e.Length)
		if e.Data {
			if l, ok := layerOf[e.File]; !ok || l != e.Layer {
				t.Fatalf("extent %+v: file %q is not layer %d of the chain", e, e.File, e.Layer)
			}
			copy(got, files[e.File][e.FileOffset:])
			seen[e.Layer] = true
		} else if e.Layer != -1 || e.File != "" {
			t.Fatalf("zero extent %+v names a layer or file", e)
		}
		if !bytes.Equal(got, want[e.Offset:e.Offset+e.Length]) {
			t.Fatalf("extent %+v: the bytes it points at differ from what the chain reads", e)
		}
	}
	if next != size || len(seen) != 4 {
		t.Fatalf("map covers %#x of %#x bytes, data from layers %v (want all four)", next, size, seen)
	}
	if table := mustRun(t, "map", paths[3]); !strings.Contains(table, paths[1]) || !strings.Contains(table, "Layer") {
		t.Errorf("map table lacks the layer and file columns:\n%s", table)
	}
}

// TestCommitCLIMergesTheChildIntoItsParent: after commit the parent alone
// reads what the chain read (through us, libvhdi and 7-Zip) and checks
// clean; the child still reads the same.
func TestCommitCLIMergesTheChildIntoItsParent(t *testing.T) {
	for _, lss := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("lss%d", lss), func(t *testing.T) {
			dir := t.TempDir()
			size := int64(12<<20) + 2*lss
			paths, want := testChain(t, dir, size, uint32(lss), 1, standardChainWrites(size, lss))
			base, child := paths[0], paths[1]
			if out := mustRun(t, "commit", child); out != "" {
				t.Errorf("commit printed %q on stdout", out)
			}
			sameBytes(t, "libvhdi reading the committed base alone", vhdxtest.ReadWithLibvhdi(t, base), want)
			sameBytes(t, "7-Zip reading the committed base alone", vhdxtest.ReadWith7zip(t, base), want)
			raw := filepath.Join(dir, "base.raw")
			got := convertToRaw(t, base, raw)
			sameBytes(t, "convert of the committed base", got, want)
			sameBytes(t, "7-Zip reading the child after commit", vhdxtest.ReadWith7zip(t, child), want)
			if out := mustRun(t, "check", child); !strings.Contains(out, "No errors found in the 2 layers") {
				t.Errorf("check after commit: %q", out)
			}
			code, _, stderr := runCLI(t, "commit", base)
			if code != 1 || !strings.Contains(stderr, "not a differencing image") {
				t.Errorf("commit of a base image: status %d, %q", code, stderr)
			}
		})
	}
}

// TestRebaseRepairsAChainWhoseParentMoved: moving the parent breaks the
// chain (info names the paths tried); rebase refuses without --unsafe and
// with it points the child at the new path, after which the chain reads as
// before: through us, libvhdi and, for a parent in the child's directory,
// 7-Zip (7-Zip on Linux resolves only a locator naming a file beside the
// child: it does not turn the "\" of "..\dir\name" into "/").
func TestRebaseRepairsAChainWhoseParentMoved(t *testing.T) {
	for _, sameDir := range []bool{true, false} {
		t.Run(fmt.Sprintf("sameDir=%v", sameDir), func(t *testing.T) {
			dir := t.TempDir()
			size := int64(8 << 20)
			paths, want := testChain(t, dir, size, 512, 1, []chainWrite{{0, 0, 1 << 20}, {1, 4096, 512}})
			moved := filepath.Join(dir, "renamed-base.vhdx")
			if !sameDir {
				moved = filepath.Join(t.TempDir(), "elsewhere", "base.vhdx")
				if err := os.MkdirAll(filepath.Dir(moved), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Rename(paths[0], moved); err != nil {
				t.Fatal(err)
			}
			child := paths[1]
			code, _, stderr := runCLI(t, "info", child)
			if code != 1 || !strings.Contains(stderr, paths[0]) || !strings.Contains(stderr, "not found") {
				t.Errorf("info of a child whose parent moved: status %d, %q", code, stderr)
			}
			code, _, stderr = runCLI(t, "rebase", "--parent", moved, child)
			if code != 2 || !strings.Contains(stderr, "--unsafe") {
				t.Errorf("rebase without --unsafe: status %d, %q", code, stderr)
			}
			code, _, stderr = runCLI(t, "rebase", "--unsafe", child)
			if code != 2 || !strings.Contains(stderr, "--parent") {
				t.Errorf("rebase without --parent: status %d, %q", code, stderr)
			}
			mustRun(t, "rebase", "--unsafe", "--parent", moved, child)
			if in := infoJSON(t, child); in.Type != "differencing" {
				t.Errorf("info after rebase: %+v", in)
			}
			raw := filepath.Join(dir, "flat.raw")
			sameBytes(t, "convert of the rebased chain", convertToRaw(t, child, raw), want)
			sameBytes(t, "libvhdi reading the rebased chain", vhdxtest.ReadWithLibvhdi(t, child, moved), want)
			if sameDir {
				sameBytes(t, "7-Zip reading the rebased chain", vhdxtest.ReadWith7zip(t, child), want)
			}
		})
	}
}

// TestCheckNamesTheLayerAtFault: a damaged layer below the image checked,
// and a parent written after its child was made, are reported with exit
// status 3 and the file at fault named.
func TestCheckNamesTheLayerAtFault(t *testing.T) {
	t.Run("damaged middle layer", func(t *testing.T) {
		dir := t.TempDir()
		paths, _ := testChain(t, dir, 8<<20, 512, 2, []chainWrite{{0, 0, 4096}, {1, 0, 512}})
		if out := mustRun(t, "check", paths[2]); !strings.Contains(out, "No errors found in the 3 layers") {
			t.Fatalf("check of a sound chain: %q", out)
		}
		// BAT entry 0 of the middle layer gets state 4, which no entry may
		// have (§2.5.1).
		f, err := os.OpenFile(paths[1], os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteAt([]byte{4, 0, 0, 0, 0, 0, 0, 0}, batOff)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		code, stdout, stderr := runCLI(t, "check", paths[2])
		if code != 2 {
			t.Errorf("status %d, want 2 (corrupted)", code)
		}
		if !strings.Contains(stdout, "layer 1 ("+paths[1]+"): BAT entry 0") || !strings.Contains(stderr, "layer 1 ("+paths[1]+")") {
			t.Errorf("the damaged layer is not named:\nstdout: %s\nstderr: %s", stdout, stderr)
		}
	})
	t.Run("parent written after the child was made", func(t *testing.T) {
		dir := t.TempDir()
		paths, _ := testChain(t, dir, 8<<20, 512, 1, []chainWrite{{0, 0, 4096}})
		im, err := vhdx.Open(paths[0], vhdx.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(make([]byte, 512), 0); err != nil {
			t.Fatal(err)
		}
		im.Close()
		code, stdout, _ := runCLI(t, "check", paths[1])
		if code != 2 || !strings.Contains(stdout, paths[0]) || !strings.Contains(stdout, "linkage") {
			t.Errorf("status %d, want 2 (corrupted) and the broken link named:\n%s", code, stdout)
		}
	})
}

// TestHelpSaysWhatCommitAndRebaseDo: the help of commit says what becomes of
// the child and of its siblings; rebase's says why --unsafe is required.
func TestHelpSaysWhatCommitAndRebaseDo(t *testing.T) {
	for _, tc := range []struct {
		cmd  string
		want []string
	}{
		{"commit", []string{"CHILD is not emptied", "re-linked to the updated", "Other\nchildren of the same parent no longer open", "crash safe", "run it again"}},
		{"rebase", []string{"--unsafe is required", "without reading or\nchanging any data", "moved"}},
		{"info", []string{"--backing-chain"}},
		{"map", []string{"names the layer"}},
		{"check", []string{"whole chain is checked", "layer N (FILE)"}},
	} {
		out := mustRun(t, "help", tc.cmd)
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("help %s lacks %q:\n%s", tc.cmd, w, out)
			}
		}
	}
}
