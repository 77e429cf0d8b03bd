package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// readChainOf opens path (read-only, replaying pending logs in memory, as
// after a crash) and returns its whole virtual disk.
func readChainOf(t *testing.T, path string) []byte {
	t.Helper()
	im, err := Open(path, OpenOptions{ReadOnly: true, ReplayLogInMemory: true})
	if err != nil {
		t.Fatalf("open %s: %v", filepath.Base(path), err)
	}
	defer im.Close()
	return readAll(t, im)
}

// mustCheckClean: Check finds nothing wrong with the image at path.
func mustCheckClean(t *testing.T, path string) {
	t.Helper()
	rep, err := Check(path, false)
	if err != nil || rep.Damaged() {
		t.Fatalf("check %s: %v %+v", filepath.Base(path), err, rep)
	}
}

// commitChain builds base <- child1 [<- child2] with data in every layer at
// awkward places (single sectors, runs across block boundaries, whole
// blocks, sectors written over sectors of the layer below) and returns the
// paths, base first.
func commitChain(t *testing.T, o CreateOptions, depth int) []string {
	t.Helper()
	return makeChain(t, o, depth, func(layer int, p string) {
		for _, w := range chainLayerWrites(o.Size, o.BlockSize, max(o.LogicalSectorSize, 512), layer) {
			writeImage(t, p, w.off, w.data)
		}
	})
}

// TestCommitMakesTheParentReadWhatTheChainRead: after Commit the parent
// alone reads exactly what the chain read, for libvhdi and 7-Zip too; the
// child still opens, linked to the updated parent, and reads the same; both
// files check clean. Committing the middle layer of a deeper chain keeps
// the layers above it valid.
func TestCommitMakesTheParentReadWhatTheChainRead(t *testing.T) {
	parallelSweep(t)
	tests := []struct {
		name   string
		opts   CreateOptions
		depth  int
		commit int // index of the layer committed into the one below
	}{
		{"Depth1", CreateOptions{Size: 24*mib + 1024, BlockSize: mib}, 1, 1},
		{"Depth1Sector4096", CreateOptions{Size: 24*mib + 8192, BlockSize: mib, LogicalSectorSize: 4096}, 1, 1},
		{"Depth2Top", CreateOptions{Size: 24*mib + 1024, BlockSize: mib}, 2, 2},
		{"Depth2Middle", CreateOptions{Size: 24*mib + 1024, BlockSize: mib}, 2, 1},
		{"Depth1Blocks32M", CreateOptions{Size: 70*mib - 1024, BlockSize: 32 * mib}, 1, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			paths := commitChain(t, tc.opts, tc.depth)
			top, child, parent := paths[tc.depth], paths[tc.commit], paths[tc.commit-1]
			want := readChainOf(t, top)
			wantChild := readChainOf(t, child)
			var calls, lastDone, lastTotal int64
			if err := Commit(child, func(done, total int64) { calls++; lastDone, lastTotal = done, total }); err != nil {
				t.Fatal(err)
			}
			if calls == 0 || lastDone != lastTotal || lastTotal == 0 {
				t.Errorf("progress: %d calls, last %d of %d", calls, lastDone, lastTotal)
			}
			if got := readChainOf(t, parent); !bytes.Equal(got, wantChild) {
				t.Fatalf("the parent alone differs from the chain before commit at %#x", vhdxtest.FirstDiff(got, wantChild))
			}
			if got := readChainOf(t, top); !bytes.Equal(got, want) {
				t.Fatalf("the top of the chain reads differently after commit at %#x", vhdxtest.FirstDiff(got, want))
			}
			for _, p := range paths {
				mustCheckClean(t, p)
			}
			im, err := Open(child, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			in, pin := im.Info(), im.Parent().Info()
			im.Close()
			if in.ParentLinkage != pin.DataWriteGUID {
				t.Errorf("child's parent_linkage %v, parent's DataWriteGuid %v", in.ParentLinkage, pin.DataWriteGUID)
			}
			// The oracles agree: the parent alone, and the top through
			// the chain.
			var below []string // the parent's own parents, nearest first
			for i := tc.commit - 2; i >= 0; i-- {
				below = append(below, paths[i])
			}
			if got := vhdxtest.ReadWithLibvhdi(t, parent, below...); !bytes.Equal(got, wantChild) {
				t.Fatalf("libvhdi reads the committed parent differently at %#x", vhdxtest.FirstDiff(got, wantChild))
			}
			if got := vhdxtest.ReadWith7zip(t, top); !bytes.Equal(got, want) {
				t.Fatalf("7-Zip reads the chain after commit differently at %#x", vhdxtest.FirstDiff(got, want))
			}
		})
	}
}

// TestCommitWritesZerosWhereTheChildDefinesZeros: a child block in the ZERO
// state reads as zeros over a parent holding data; after Commit the parent
// reads zeros there too.
func TestCommitWritesZerosWhereTheChildDefinesZeros(t *testing.T) {
	paths := makeChain(t, CreateOptions{Size: 16 * mib, BlockSize: mib}, 1, func(layer int, p string) {
		if layer == 0 {
			writeImage(t, p, 0, pattern(1, 8*mib))
		} else {
			writeImage(t, p, 2*mib+512, pattern(2, 512))
		}
	})
	b, err := os.ReadFile(paths[1])
	if err != nil {
		t.Fatal(err)
	}
	le.PutUint64(batEntryAt(b, 5), makeBATEntry(stateZero, 0)) // block 5 (chunk ratio 4096: index 5)
	if err := os.WriteFile(paths[1], b, 0o644); err != nil {
		t.Fatal(err)
	}
	want := readChainOf(t, paths[1])
	if !allZero(want[5*mib : 6*mib]) {
		t.Fatal("a ZERO block of the child does not read as zeros")
	}
	if err := Commit(paths[1], nil); err != nil {
		t.Fatal(err)
	}
	if got := readChainOf(t, paths[0]); !bytes.Equal(got, want) {
		t.Fatalf("the parent differs from the chain before commit at %#x", vhdxtest.FirstDiff(got, want))
	}
}

// copyFiles copies the named files of src into a new temp dir, names kept,
// so the locators' relative paths resolve there.
func copyFiles(t *testing.T, paths []string) []string {
	t.Helper()
	dir := t.TempDir()
	var out []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		q := filepath.Join(dir, filepath.Base(p))
		if err := os.WriteFile(q, b, 0o644); err != nil {
			t.Fatal(err)
		}
		out = append(out, q)
	}
	return out
}

// TestCommitCrashAtEveryStepLeavesAChainThatReadsTheSame: the files as they
// are on disk at every step of Commit (after the child's linkage2, after
// each piece copied into the parent, after the parent's flush and close,
// after the relink) open as a valid chain (a pending log replayed) that
// reads what it read before; running Commit again on them completes the
// merge. The same for a Commit that fails at each step (an I/O error) and
// is run again.
func TestCommitCrashAtEveryStepLeavesAChainThatReadsTheSame(t *testing.T) {
	parallelSweep(t)
	for _, depth := range []int{1, 2} {
		t.Run(fmt.Sprintf("depth%d", depth), func(t *testing.T) {
			// Pieces of 4 MiB: a child holding ~10 MiB is copied in
			// several steps.
			o := CreateOptions{Size: 12*mib + 1024, BlockSize: mib}
			paths := makeChain(t, o, depth, func(layer int, p string) {
				for _, w := range chainLayerWrites(o.Size, o.BlockSize, 512, layer) {
					writeImage(t, p, w.off, w.data)
				}
				if layer == 1 {
					writeImage(t, p, 6*mib, pattern(9, 5*mib))
				}
			})
			top, child, parent := len(paths)-1, 1, 0
			want := readChainOf(t, paths[top])
			wantChild := readChainOf(t, paths[child])

			// A reference run on a copy, snapshotting the files at
			// every step.
			ref := copyFiles(t, paths)
			var snaps [][]string
			var steps []commitStep
			setCommitHook(t, ref[child], func(step commitStep) error {
				snaps = append(snaps, copyFiles(t, ref))
				steps = append(steps, step)
				return nil
			})
			if err := Commit(ref[child], nil); err != nil {
				t.Fatal(err)
			}
			copied := 0
			for _, s := range steps {
				if s == commitCopied {
					copied++
				}
			}
			if copied < 3 || steps[len(steps)-1] != commitRelinked {
				t.Fatalf("steps %v: want several pieces copied and a relink last", steps)
			}

			finish := func(t *testing.T, files []string, where string) {
				t.Helper()
				if got := readChainOf(t, files[top]); !bytes.Equal(got, want) {
					t.Fatalf("%s: the chain reads differently at %#x", where, vhdxtest.FirstDiff(got, want))
				}
				if err := Commit(files[child], nil); err != nil {
					t.Fatalf("%s: commit again: %v", where, err)
				}
				if got := readChainOf(t, files[parent]); !bytes.Equal(got, wantChild) {
					t.Fatalf("%s: after commit again, the parent alone differs at %#x", where, vhdxtest.FirstDiff(got, wantChild))
				}
				if got := readChainOf(t, files[top]); !bytes.Equal(got, want) {
					t.Fatalf("%s: after commit again, the chain differs at %#x", where, vhdxtest.FirstDiff(got, want))
				}
				for _, p := range files {
					mustCheckClean(t, p)
				}
			}
			for i, files := range snaps {
				finish(t, files, fmt.Sprintf("crash at step %d (%v)", i, steps[i]))
			}

			// Failing at each step instead (one depth is enough: the
			// failure paths do not depend on the layers above).
			if depth > 1 {
				return
			}
			errInjected := errors.New("injected failure")
			for k := range steps {
				files := copyFiles(t, paths)
				n := 0
				setCommitHook(t, files[child], func(commitStep) error {
					n++
					if n == k+1 {
						return errInjected
					}
					return nil
				})
				err := Commit(files[child], nil)
				commitHooks.Delete(files[child])
				if !errors.Is(err, errInjected) {
					t.Fatalf("failure at step %d (%v): Commit returned %v", k, steps[k], err)
				}
				finish(t, files, fmt.Sprintf("failure at step %d (%v)", k, steps[k]))
			}
		})
	}
}

// TestCommitRefusesWhatItCannotMerge: a base image has nothing to commit
// into; a parent in use elsewhere is not written, and the child is left as
// it was.
func TestCommitRefusesWhatItCannotMerge(t *testing.T) {
	paths := commitChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 1)
	if err := Commit(paths[0], nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("Commit of a base image: %v, want ErrInvalidArgument", err)
	}
	before, err := os.ReadFile(paths[1])
	if err != nil {
		t.Fatal(err)
	}
	busy, err := Open(paths[0], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	err = Commit(paths[1], nil)
	busy.Close()
	if !errors.Is(err, ErrInUse) {
		t.Errorf("Commit while the parent is open elsewhere: %v, want ErrInUse", err)
	}
	if after, _ := os.ReadFile(paths[1]); !bytes.Equal(before, after) {
		t.Error("a refused Commit modified the child")
	}
}

// TestCommitFindsTheParentLikeOpen: the locator paths are tried in order
// and the first file that links is the parent: after the child moved, its
// relative_path names a decoy (another image) that Commit skips, and the
// absolute path leads to the real parent, which gets the data; the decoy is
// untouched.
func TestCommitFindsTheParentLikeOpen(t *testing.T) {
	paths := commitChain(t, CreateOptions{Size: 8 * mib, BlockSize: mib}, 1)
	want := readChainOf(t, paths[1])
	dir2 := t.TempDir()
	child := filepath.Join(dir2, filepath.Base(paths[1]))
	if err := os.Rename(paths[1], child); err != nil {
		t.Fatal(err)
	}
	decoy := filepath.Join(dir2, filepath.Base(paths[0]))
	if err := Create(decoy, CreateOptions{Size: 8 * mib, BlockSize: mib}); err != nil {
		t.Fatal(err)
	}
	decoyBefore, err := os.ReadFile(decoy)
	if err != nil {
		t.Fatal(err)
	}
	if err := Commit(child, nil); err != nil {
		t.Fatal(err)
	}
	if got := readChainOf(t, paths[0]); !bytes.Equal(got, want) {
		t.Fatalf("the real parent differs from the chain before commit at %#x", vhdxtest.FirstDiff(got, want))
	}
	if after, _ := os.ReadFile(decoy); !bytes.Equal(after, decoyBefore) {
		t.Error("Commit wrote to the decoy its relative_path names")
	}
}

// setCommitHook has hook called at each step of a Commit of childPath, until
// the test ends (commitHooks).
func setCommitHook(t *testing.T, childPath string, hook func(commitStep) error) {
	t.Helper()
	commitHooks.Store(childPath, hook)
	t.Cleanup(func() { commitHooks.Delete(childPath) })
}
