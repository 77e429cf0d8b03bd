package vhdx

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// modelDisk is a LiveMerge with the bytes the guest expects to read: every
// write through it updates the model once it succeeded.
type modelDisk struct {
	t    testing.TB
	m    *LiveMerge
	mu   sync.Mutex
	want []byte
}

func (d *modelDisk) write(off int64, data []byte) {
	d.t.Helper()
	if _, err := d.m.WriteAt(data, off); err != nil {
		d.t.Errorf("write at %#x: %v", off, err)
		return
	}
	d.mu.Lock()
	copy(d.want[off:], data)
	d.mu.Unlock()
}

func (d *modelDisk) zero(off, n int64) {
	d.t.Helper()
	if err := d.m.WriteZeroes(off, n, true); err != nil {
		d.t.Errorf("write zeroes at %#x: %v", off, err)
		return
	}
	d.mu.Lock()
	clear(d.want[off : off+n])
	d.mu.Unlock()
}

// liveMergeChain is base <- child1 with data in both (whole blocks,
// partially present blocks, zeros the child defines over base data), the
// child open read-write with its chain; it returns the paths and the image.
func liveMergeChain(t testing.TB, o CreateOptions) ([]string, *Image) {
	t.Helper()
	paths := makeChain(t, o, 1, func(layer int, p string) {
		for _, w := range chainLayerWrites(o.Size, o.BlockSize, 512, layer) {
			writeImage(t, p, w.off, w.data)
		}
		writeImage(t, p, int64(o.BlockSize)*3, pattern(77, int(o.BlockSize))) // a whole base block
	})
	for _, w := range chainLayerWrites(o.Size, o.BlockSize, 512, 1) {
		writeImage(t, paths[1], w.off, w.data)
	}
	writeImage(t, paths[1], int64(o.BlockSize)*5, pattern(78, int(o.BlockSize)))
	im, err := Open(paths[1], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Zeros the child defines over base data (block 3 goes to ZERO).
	if err := im.WriteZeroes(int64(o.BlockSize)*3, int64(o.BlockSize), true); err != nil {
		t.Fatal(err)
	}
	return paths, im
}

// TestLiveMergeDuringConcurrentWritersReadsBackEveryWrite: a merge with
// writers running the whole time, and writes driven into each race of the
// copy: into a block right after it was copied, into a block between its
// read from the child and its write to the parent, into a sector a
// partially present block did not hold, into a block the child did not
// hold at all, and a write that arrives while Finish runs its final pass.
// Afterwards the child file is gone and the parent alone reads every
// write, through us, after a reopen, libvhdi and 7-Zip, and checks clean.
func TestLiveMergeDuringConcurrentWritersReadsBackEveryWrite(t *testing.T) {
	o := CreateOptions{Size: 16 * mib, BlockSize: mib}
	paths, top := liveMergeChain(t, o)
	bs := int64(o.BlockSize)
	d := &modelDisk{t: t, want: readAll(t, top)}
	m := startLiveMerge(t, top)
	d.m = m
	if p := m.Progress(); p.State != MergeCopying || p.Total == 0 || p.DirtyBlocks == 0 {
		t.Fatalf("progress at start %+v", p)
	}

	var once [4]sync.Once
	m.afterBlock = func(b uint64) {
		switch b {
		case 5: // whole block the child holds, already copied
			once[0].Do(func() { d.write(5*bs+4096, pattern(101, 8192)) })
		case 0: // partially present: a sector it did not hold
			once[1].Do(func() { d.write(bs/2+512*40, pattern(102, 512)) })
		}
	}
	m.afterRead = func(b uint64) {
		if b == 3 { // the zeros were read, not yet written to the parent
			once[2].Do(func() { d.write(3*bs+512, pattern(103, 1024)) })
		}
	}

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			for i := 0; ctx.Err() == nil && i < 400; i++ {
				off := rng.Int63n(int64(o.Size)/4096-2) * 4096
				// Writers own disjoint sectors: the model needs no order
				// between writers of the same sector.
				off = off - off%(3*4096) + int64(w)*4096
				if rng.Intn(8) == 0 {
					d.zero(off, 4096)
				} else {
					d.write(off, pattern(int64(w)<<32|int64(i), 4096))
				}
			}
		}()
	}
	if err := m.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	stop()
	wg.Wait()
	d.write(9*bs, pattern(104, 4096)) // a block the child never held, after Run

	// A write that arrives during the final pass waits for it and goes
	// to the parent.
	started, landed := make(chan struct{}), make(chan struct{})
	m.inFinish = func() {
		go func() {
			close(started)
			d.write(7*bs+512, pattern(105, 512))
			close(landed)
		}()
		<-started
		select {
		case <-landed:
			t.Error("a write completed during the final pass")
		default:
		}
	}
	parent, err := m.Finish()
	if err != nil {
		t.Fatal(err)
	}
	<-landed
	if p := m.Progress(); p.State != MergeDone || p.Done != p.Total {
		t.Errorf("progress at the end %+v", p)
	}
	if _, err := os.Stat(paths[1]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the child still exists after the merge: %v", err)
	}
	if got := readAll(t, m.Current()); !bytes.Equal(got, d.want) {
		t.Fatalf("the merged disk differs at %#x", vhdxtest.FirstDiff(got, d.want))
	}
	if m.Current() != parent {
		t.Fatal("I/O does not go to the parent after Finish")
	}
	if err := parent.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readChainOf(t, paths[0]); !bytes.Equal(got, d.want) {
		t.Fatalf("the reopened parent differs at %#x", vhdxtest.FirstDiff(got, d.want))
	}
	mustCheckClean(t, paths[0])
	if got := vhdxtest.ReadWithLibvhdi(t, paths[0]); !bytes.Equal(got, d.want) {
		t.Fatalf("libvhdi reads the merged file differently at %#x", vhdxtest.FirstDiff(got, d.want))
	}
	if got := vhdxtest.ReadWith7zip(t, paths[0]); !bytes.Equal(got, d.want) {
		t.Fatalf("7-Zip reads the merged file differently at %#x", vhdxtest.FirstDiff(got, d.want))
	}
	// qemu-img agrees with a raw copy of what the guest wrote.
	qemuImg := vhdxtest.NeedTool(t, "qemu-img")
	raw := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(raw, d.want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qemuImg, "compare", "-f", "vhdx", "-F", "raw", paths[0], raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}

// TestLiveMergeRunsAgainAfterCancelAndAbandonKeepsTheChain: a cancelled
// Run leaves the merge resumable; an abandoned merge serves the chain as it
// was (the child over the partly updated parent), which reads the same
// after close and reopen, and a new merge of it completes.
func TestLiveMergeRunsAgainAfterCancelAndAbandonKeepsTheChain(t *testing.T) {
	o := CreateOptions{Size: 8 * mib, BlockSize: mib}
	paths, top := liveMergeChain(t, o)
	want := readAll(t, top)
	m := startLiveMerge(t, top)
	ctx, cancel := context.WithCancel(context.Background())
	m.afterBlock = func(uint64) { cancel() }
	if err := m.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run with a cancelled context: %v", err)
	}
	if p := m.Progress(); p.Done == 0 || p.Done >= p.Total {
		t.Fatalf("a cancelled run after one block: %+v", p)
	}
	if _, err := m.Finish(); !errors.Is(err, ErrMergeState) {
		t.Fatalf("Finish before Run ended: %v", err)
	}
	im := m.Abandon()
	if im != top || m.Progress().State != MergeAbandoned {
		t.Fatalf("Abandon returned %p (top %p), state %s", im, top, m.Progress().State)
	}
	if got := readAll(t, im); !bytes.Equal(got, want) {
		t.Fatalf("the abandoned chain differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	top, err := Open(paths[1], OpenOptions{})
	if err != nil {
		t.Fatalf("reopen after an abandoned merge: %v", err)
	}
	if got := readAll(t, top); !bytes.Equal(got, want) {
		t.Fatalf("the reopened chain differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	p := runLiveMerge(t, top)
	p.Close()
	if got := readChainOf(t, paths[0]); !bytes.Equal(got, want) {
		t.Fatalf("the merged parent differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	mustCheckClean(t, paths[0])
}

// TestLiveMergeRefusesWhatItCannotMerge: a base image has no parent; a
// parent another process holds (here another open, as a sibling's chain
// would) is not reopened, and the chain still reads through it.
func TestLiveMergeRefusesWhatItCannotMerge(t *testing.T) {
	o := CreateOptions{Size: 8 * mib, BlockSize: mib}
	paths, top := liveMergeChain(t, o)
	defer top.Close()
	want := readAll(t, top)
	base, err := Open(paths[0], OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := StartLiveMerge(base, LiveMergeOptions{}); !errors.Is(err, ErrReadOnly) {
		t.Errorf("merge of a read-only image: %v", err)
	}
	if _, err := StartLiveMerge(top, LiveMergeOptions{}); !errors.Is(err, ErrInUse) {
		t.Errorf("merge into a parent another open holds: %v, want ErrInUse", err)
	}
	base.Close()
	if got := readAll(t, top); !bytes.Equal(got, want) {
		t.Fatalf("after a refused merge the chain differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	if _, err := StartLiveMerge(top, LiveMergeOptions{Rate: -1}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("negative rate: %v", err)
	}
	rw, err := Open(paths[0], OpenOptions{})
	if err == nil {
		rw.Close()
		t.Fatal("the parent is not locked by the chain after a refused merge")
	}
	single := createFile(t, o)
	im, err := Open(single, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := StartLiveMerge(im, LiveMergeOptions{}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("merge of a base image: %v", err)
	}
}

// TestRestartAfterInterruptedLiveMergeServesTheSameChain: the files as a
// SIGKILL leaves them mid-merge (the parent open read-write, its log not
// cleared, part of the child copied) open read-write as the chain again,
// the parent's log replayed first, reading the same, with the linkage
// settled so libvhdi follows it too; a new merge of them completes.
func TestRestartAfterInterruptedLiveMergeServesTheSameChain(t *testing.T) {
	o := CreateOptions{Size: 8 * mib, BlockSize: mib}
	paths, top := liveMergeChain(t, o)
	want := readAll(t, top)
	m := startLiveMerge(t, top)
	var killed []string
	m.afterBlock = func(b uint64) {
		if b >= 5 && killed == nil { // block 5 is new in the parent: a BAT update in its log
			killed = copyFiles(t, paths)
		}
	}
	if err := m.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.Abandon().Close()
	if !imageHasActiveLog(t, mustRead(t, killed[0])) {
		t.Fatal("the parent copied mid-merge has no log to replay: the test does not test the recovery")
	}
	im, err := Open(killed[1], OpenOptions{})
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	if got := readAll(t, im); !bytes.Equal(got, want) {
		t.Fatalf("the restarted chain differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	// The parent had been written: the open settled the linkage on its
	// DataWriteGuid, so readers that know only parent_linkage follow it.
	if pl := im.l.locator; pl.linkage2 != uuid.Nil || pl.linkage != im.Parent().Info().DataWriteGUID {
		t.Fatalf("linkage after the restart: %v, %v (parent %v)", pl.linkage, pl.linkage2, im.Parent().Info().DataWriteGUID)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if got := vhdxtest.ReadWithLibvhdi(t, killed[1], killed[0]); !bytes.Equal(got, want) {
		t.Fatalf("libvhdi reads the restarted chain differently at %#x", vhdxtest.FirstDiff(got, want))
	}
	if im, err = Open(killed[1], OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	p := runLiveMerge(t, im)
	p.Close()
	if got := readChainOf(t, killed[0]); !bytes.Equal(got, want) {
		t.Fatalf("merged after restart: differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	mustCheckClean(t, killed[0])
}

// startLiveMerge starts a live merge of top into its parent, with the
// default options.
func startLiveMerge(t testing.TB, top *Image) *LiveMerge {
	t.Helper()
	m, err := StartLiveMerge(top, LiveMergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// runLiveMerge merges top into its parent live, with the default options,
// and returns the parent, now the top of the chain.
func runLiveMerge(t testing.TB, top *Image) *Image {
	t.Helper()
	m := startLiveMerge(t, top)
	if err := m.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	p, err := m.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func mustRead(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLiveMergeIntoAMiddleLayerKeepsTheLayersBelow: in base <- child1 <-
// child2, merging child2 live makes child1 (still over the base) read what
// the three layers read, after a reopen and for libvhdi too; the base is
// not written.
func TestLiveMergeIntoAMiddleLayerKeepsTheLayersBelow(t *testing.T) {
	o := CreateOptions{Size: 12*mib + 1024, BlockSize: mib}
	paths := commitChain(t, o, 2)
	baseBefore := mustRead(t, paths[0])
	top, err := Open(paths[2], OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := readAll(t, top)
	p := runLiveMerge(t, top)
	if p.Path() != paths[1] || p.Depth() != 1 {
		t.Fatalf("the new top is %s at depth %d, want %s at depth 1", p.Path(), p.Depth(), paths[1])
	}
	if got := readAll(t, p); !bytes.Equal(got, want) {
		t.Fatalf("the middle layer differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readChainOf(t, paths[1]); !bytes.Equal(got, want) {
		t.Fatalf("the reopened middle layer differs at %#x", vhdxtest.FirstDiff(got, want))
	}
	if !bytes.Equal(mustRead(t, paths[0]), baseBefore) {
		t.Error("the base was written")
	}
	for _, p := range paths[:2] {
		mustCheckClean(t, p)
	}
	if got := vhdxtest.ReadWithLibvhdi(t, paths[1], paths[0]); !bytes.Equal(got, want) {
		t.Fatalf("libvhdi reads the merged middle layer differently at %#x", vhdxtest.FirstDiff(got, want))
	}
}
