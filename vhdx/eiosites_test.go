package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// More workloads under injected EIO, beyond the guest's reads and writes of
// eio_test.go: opening an image whose log must be replayed, a differencing
// child, online growth and shrink, compaction, creation, a locator rewrite
// and the leak truncation of check --repair. Together with the guest
// workload they reach every function of the package that calls Storage
// (TestEveryStorageCallSiteIsReachedByAnEIOWorkload keeps that true).

// eioScenario is one workload. run returns the error of each step in
// order and the image it leaves open (nil if none), which the sweep probes
// and closes.
type eioScenario struct {
	name  string
	image func(t *testing.T) []byte
	run   func(t *testing.T, s *eioStorage) ([]error, *Image)
	// reopen opens what a power loss keeps, with the checks of `check`.
	reopen func(t *testing.T, img []byte) ([]Problem, error)
	// probeOff is where the recovery probe writes (inside the disk after run).
	probeOff int64
	// reopenAfter: run closed its image; the probe reopens it.
	reopenAfter bool
}

func reopenPlain(t *testing.T, img []byte) ([]Problem, error) {
	c := &checker{collect: true}
	im, err := openStorage(newMemStorage(img), OpenOptions{}, c)
	if err != nil {
		return c.problems, err
	}
	return c.problems, im.Close()
}

func plainImage(o CreateOptions) func(t *testing.T) []byte {
	return func(t *testing.T) []byte { return createMem(t, o).bytes() }
}

// withSteps runs steps on im, collecting their errors.
func withSteps(im *Image, steps ...func(*Image) error) []error {
	var errs []error
	for _, st := range steps {
		errs = append(errs, st(im))
	}
	return errs
}

func wr(seed int64, n int, off int64) func(*Image) error {
	return func(im *Image) error { _, err := im.WriteAt(pattern(seed, n), off); return err }
}

func flushStep(im *Image) error { return im.Flush() }

func openAnd(o OpenOptions, steps ...func(*Image) error) func(t *testing.T, s *eioStorage) ([]error, *Image) {
	return func(t *testing.T, s *eioStorage) ([]error, *Image) {
		im, err := OpenStorage(s, o)
		if err != nil {
			return []error{err}, nil
		}
		return withSteps(im, steps...), im
	}
}

// dirtyLogImage is an image whose last allocation's entry is durable in the
// log but not applied: opening it read-write replays the log.
func dirtyLogImage(t *testing.T) []byte {
	created := createMem(t, CreateOptions{Size: eioImageSize, BlockSize: mib}).bytes()
	for extra := 1; ; extra++ {
		s := newFaultStorage(created)
		im, err := OpenStorage(s, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(pattern(1, 4096), 0); err != nil {
			t.Fatal(err)
		}
		s.crashAt = s.opCount() + extra
		_, werr := im.WriteAt(pattern(2, 4096), 2*mib)
		img := s.crashImage(crashDrop)
		im.Close()
		if werr == nil {
			t.Fatal("no crash point leaves an unapplied entry")
		}
		if imageHasActiveLog(t, img) {
			return img
		}
	}
}

func eioScenarios() []eioScenario {
	o := CreateOptions{Size: eioImageSize, BlockSize: mib}
	return []eioScenario{
		{
			name: "replay a dirty log at open", image: dirtyLogImage, reopen: reopenPlain, probeOff: 11 * mib,
			run: openAnd(OpenOptions{}, func(im *Image) error {
				_, err := im.ReadAt(make([]byte, 4096), 2*mib)
				return err
			}),
		},
		{
			name: "shrink to a partial block, grow (the BAT moves)", image: plainImage(o), reopen: reopenPlain, probeOff: 11 * mib,
			run: func(t *testing.T, s *eioStorage) ([]error, *Image) {
				// Each resize leaves the in-memory state at the old size:
				// reopen, as Resize's callers do. A failed step ends the run.
				var errs []error
				var im *Image
				// The grow comes last: the moved BAT has 132 K entries, and
				// every later open walks them.
				for _, phase := range [][]func(*Image) error{
					{wr(1, 4096, 14*mib), wr(2, 4096, 15*mib), flushStep,
						func(im *Image) error { return im.Discard(15*mib, mib) }, flushStep,
						func(im *Image) error { return im.resize(14*mib+512*kib, true) }},
					{func(im *Image) error { return im.resize(129<<30, false) }},
					{},
				} {
					var err error
					if im, err = OpenStorage(s, OpenOptions{}); err != nil {
						return append(errs, err), nil
					}
					errs = append(errs, withSteps(im, phase...)...)
					if len(phase) == 0 || errs[len(errs)-1] != nil {
						return errs, im
					}
					errs = append(errs, im.Close())
				}
				return errs, im
			},
		},
		{
			name: "compact after discards", image: plainImage(o), reopen: reopenPlain, probeOff: 11 * mib,
			run: openAnd(OpenOptions{},
				wr(1, 4096, 0), wr(2, 4096, 2*mib), wr(3, 4096, 4*mib), flushStep,
				func(im *Image) error { return im.Discard(0, 3*mib) }, flushStep,
				func(im *Image) error { return im.compact(&CompactReport{}, nil) },
				func(im *Image) error { return im.truncateLeak(im.fileEnd) },
				func(im *Image) error { return im.ReadVec([][]byte{make([]byte, 4096)}, 0) },
				wr(4, 4096, 13*mib), flushStep,
				func(im *Image) error { return im.Discard(13*mib, mib) }, flushStep,
				func(im *Image) error { return im.Close() }), // cuts the free tail off
			reopenAfter: true,
		},
		{
			name: "create fixed and dynamic", image: func(*testing.T) []byte { return nil }, reopen: reopenPlain, probeOff: 11 * mib,
			run: func(t *testing.T, s *eioStorage) ([]error, *Image) {
				err := CreateStorage(s, CreateOptions{Size: eioImageSize, BlockSize: mib, Type: Fixed, Preallocation: PreallocFull})
				if err != nil {
					return []error{err}, nil
				}
				im, err := OpenStorage(s, OpenOptions{})
				if err != nil {
					return []error{err}, nil
				}
				return withSteps(im, wr(1, 4096, 0), flushStep,
					func(im *Image) error { return im.WriteZeroes(0, mib, false) }, flushStep), im
			},
		},
		func() eioScenario {
			var mc memChain
			return eioScenario{
				name: "differencing child: bitmap writes, whole blocks, locator rewrite", probeOff: 11 * mib,
				image: func(t *testing.T) []byte {
					mc = newMemChain(t, o, []imageWrite{{0, pattern(7, 2*mib)}})
					return mc.child
				},
				reopen: func(t *testing.T, img []byte) ([]Problem, error) {
					c := &checker{collect: true}
					im, err := openStorage(newMemStorage(img), OpenOptions{}, c)
					if err != nil {
						return c.problems, err
					}
					return c.problems, im.Close()
				},
				run: func(t *testing.T, s *eioStorage) ([]error, *Image) {
					im, err := mc.openChild(t, s, false)
					if err != nil {
						return []error{err}, nil
					}
					errs := withSteps(im, wr(1, 512, 512), wr(2, 4096, 8192), flushStep,
						wr(3, mib, 3*mib), wr(4, 4096, 3*mib+4096),
						func(im *Image) error { _, err := im.ReadAt(make([]byte, 8192), 0); return err },
						func(im *Image) error { return im.Discard(512, 512) }, flushStep,
						func(im *Image) error {
							return im.SetParentLinkage(im.l.locator.linkage, im.l.locator.linkage)
						},
						wr(5, 512, mib+512), wr(6, mib, mib), // a partial block made whole
						func(im *Image) error { return im.Close() })
					// Reopened: bitmap pages are read from the file.
					if im, err = mc.openChild(t, s, false); err != nil {
						return append(errs, err), nil
					}
					return append(errs, withSteps(im,
						func(im *Image) error { _, err := im.ReadAt(make([]byte, 16384), 0); return err },
						func(im *Image) error { _, err := im.ReadAt(make([]byte, 8192), 3*mib); return err },
						func(im *Image) error { return im.ReadVec([][]byte{make([]byte, 4096), make([]byte, 4096)}, 3*mib) })...), im
				},
			}
		}(),
		func() eioScenario {
			// The parent's file fails; the child is in memory. Reads
			// through the chain and the child's reads of its bitmaps.
			var mc memChain
			return eioScenario{
				name: "differencing chain: reads through a failing parent", probeOff: 11 * mib,
				image: func(t *testing.T) []byte {
					mc = newMemChain(t, o, []imageWrite{{0, pattern(7, 2*mib)}})
					return mc.base
				},
				reopen: func(t *testing.T, img []byte) ([]Problem, error) { return nil, nil }, // the parent is never written
				run: func(t *testing.T, s *eioStorage) ([]error, *Image) {
					p, err := OpenStorage(s, OpenOptions{ReadOnly: true})
					if err != nil {
						return []error{err}, nil
					}
					child := newMemStorage(bytes.Clone(mc.child))
					im, err := openStorageWithParent(child, OpenOptions{}, p)
					if err != nil {
						p.Close()
						return []error{err}, nil
					}
					errs := withSteps(im, wr(1, 512, 512), flushStep,
						func(im *Image) error { return im.Close() })
					p, err = OpenStorage(s, OpenOptions{ReadOnly: true})
					if err != nil {
						return append(errs, err), nil
					}
					if im, err = openStorageWithParent(child, OpenOptions{}, p); err != nil {
						p.Close()
						return append(errs, err), nil
					}
					return append(errs, withSteps(im,
						func(im *Image) error { _, err := im.ReadAt(make([]byte, 8192), 0); return err }, // bitmap page, parent
						func(im *Image) error { return im.ReadVec([][]byte{make([]byte, 4096), make([]byte, 4096)}, mib) },
						wr(2, 1024, mib+512))...), im
				},
			}
		}(),
	}
}

// sweepEIO runs sc once without a fault, then once per Storage call it made
// with that call failing, checking the rules of the package doc. It
// returns the call sites the clean run reached.
func sweepEIO(t *testing.T, sc eioScenario) map[string]bool {
	img := sc.image(t)
	start := img
	runOnce := func(kind ioKind, n int) (s *eioStorage, errs []error, probe []error, st HostIOErrors) {
		s = newEIOStorage(img)
		s.failKind, s.failN = kind, n
		errs, im := sc.run(t, s)
		if sc.reopenAfter {
			var err error
			if im, err = OpenStorage(s, OpenOptions{}); err != nil {
				errs, im = append(errs, err), nil
			}
		}
		if im != nil {
			// The fault may hit the first probe; the second is after it.
			_, err := im.WriteAt(pattern(98, 4096), sc.probeOff)
			errs = append(errs, err, im.Flush())
			s.mu.Lock()
			s.before = s.calls
			s.mu.Unlock()
			_, werr := im.WriteAt(pattern(99, 4096), sc.probeOff+mib)
			probe = []error{werr, im.Flush()}
			st = im.HostIOErrors()
			errs = append(errs, im.Close())
		}
		if im == nil {
			s.before = s.calls
		}
		return s, errs, probe, st
	}
	clean, errs, probe, _ := runOnce(kindRead, 0)
	for i, err := range append(errs, probe...) {
		if err != nil {
			t.Fatalf("%s without a fault: step %d: %v", sc.name, i, err)
		}
	}
	for kind := ioKind(0); kind < nKinds; kind++ {
		for _, n := range clean.faultPoints(kind, clean.before[kind]) { // no fault in the last probe
			s, errs, probe, st := runOnce(kind, n)
			if !s.hit {
				continue
			}
			where := fmt.Sprintf("%s, %s#%d (in %s)", sc.name, kind, n, siteOf(clean, kind, n))
			saw := false
			for i, err := range append(errs, probe...) {
				if err != nil && !errors.Is(err, unix.EIO) {
					t.Errorf("%s: step %d failed with %v, which does not wrap EIO", where, i, err)
				}
				saw = saw || err != nil
			}
			if !saw {
				t.Errorf("%s: the injected EIO was swallowed", where)
			}
			if probe != nil && (probe[0] != nil || probe[1] != nil) &&
				!(st.PayloadLost && kind == kindSync && strings.Contains(fmt.Sprint(probe[1]), "reopened")) {
				t.Errorf("%s: after the fault cleared, write = %v, flush = %v (state %+v)", where, probe[0], probe[1], st)
			}
			if img := s.crashImage(crashDrop); len(img) > 0 || len(start) > 0 {
				problems, err := sc.reopen(t, img)
				if err != nil && !(len(img) == 0 || errors.Is(err, ErrNotVHDX) && kind != kindRead) {
					t.Errorf("%s: what a power loss keeps does not open: %v", where, err)
				}
				for _, p := range problems {
					if !p.Leak {
						t.Errorf("%s: what a power loss keeps is not check-clean: %s", where, p.What)
					}
				}
			}
		}
	}
	return clean.sites
}

// TestEveryStorageCallSiteIsReachedByAnEIOWorkload sweeps an injected EIO
// over every Storage call of each scenario (and the guest workload), then
// checks that every function of the package that calls Storage (found by
// reading the source) was reached with a fault, or is listed in
// notInjected with the reason.
func TestEveryStorageCallSiteIsReachedByAnEIOWorkload(t *testing.T) {
	parallelSweep(t)
	seen := map[string]bool{}
	for _, sc := range eioScenarios() {
		t.Run(strings.ReplaceAll(sc.name, " ", "_"), func(t *testing.T) {
			for site := range sweepEIO(t, sc) {
				seen[site[strings.Index(site, " ")+1:]] = true
			}
		})
	}
	base := newFaultStorage(nil)
	if err := CreateStorage(base, CreateOptions{Size: eioImageSize, BlockSize: mib}); err != nil {
		t.Fatal(err)
	}
	for site := range runEIOWorkload(t, base.current(), kindRead, 0).s.sites {
		seen[site[strings.Index(site, " ")+1:]] = true
	}
	t.Run("journal_with_bridge_entries", func(t *testing.T) {
		for site := range sweepJournalEIO(t) {
			seen[site[strings.Index(site, " ")+1:]] = true
		}
	})

	// Functions that call Storage where no in-memory workload can inject:
	// they take a path or an *os.File, or are the adapters themselves.
	notInjected := map[string]string{
		"Check":                  "opens a path (its checks run in openStorage, swept by every scenario)",
		"Compact":                "opens a path; (*Image).compact is swept",
		"(*Image).hostAllocated": "fstat of the *os.File (st_blocks), not Storage",
		"(*Image).Info":          "reports; a failed Size shows as file size -1 and changes nothing",
		"(*committer).copyLayer": "opens paths; its I/O goes through (*Image).ReadAt/WriteAt, swept by the guest workload",
		"(*Image).giveBack":      "runs only right after another call failed (a sweep injects one fault per run); its own Truncate failing leaves the range in the free set, zeroed before reuse (nospace_test.go covers the give-back)",
	}
	var missing, stale []string
	for fn := range storageCallers(t) {
		_, excused := notInjected[fn]
		switch {
		case seen[fn] && excused:
			stale = append(stale, fn)
		case !seen[fn] && !excused:
			missing = append(missing, fn)
		}
	}
	sort.Strings(missing)
	sort.Strings(stale)
	if len(missing) > 0 {
		t.Errorf("functions calling Storage that no EIO workload reaches (add a workload step, or a reason to notInjected): %v", missing)
	}
	if len(stale) > 0 {
		t.Errorf("notInjected lists functions a workload does reach (remove them): %v", stale)
	}
}

// storageHelpers pass a Storage call through for their callers: the call
// site is the caller (callerInVHDX skips them too).
var storageHelpers = map[string]bool{
	"readFull": true, "punch": true, "zeroKeep": true, "writeZeroChunks": true, "fileSizeOf": true,
	"(*Image).writePayload": true, "(*Image).writeFreshPayload": true, "(*Image).readPayload": true,
	"(*logReader).readSector": true, "(*logApplier).writeSector": true, "(*logApplier).zeroRange": true,
	"(*logApplier).extend": true, "(*journal).writeEntry": true,
}

// storageCallers reads the package's non-test source and returns every
// function that calls a Storage method (or a helper above), directly.
// Receivers count as Storage when named s, z or base, or a field .s,
// .Storage or .base: the package's one naming convention for them.
func storageCallers(t *testing.T) map[string]bool {
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	methods := map[string]bool{"ReadAt": true, "WriteAt": true, "Sync": true, "Truncate": true, "Size": true,
		"zeroRange": true, "zeroKeep": true, "allocate": true}
	storageRecv := func(x ast.Expr) bool {
		switch r := x.(type) {
		case *ast.Ident:
			return r.Name == "s" || r.Name == "z" || r.Name == "base"
		case *ast.SelectorExpr:
			return r.Sel.Name == "s" || r.Sel.Name == "Storage" || r.Sel.Name == "base"
		}
		return false
	}
	out := map[string]bool{}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		src, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, name, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || fd.Body == nil {
				continue
			}
			fn := fd.Name.Name
			if fd.Recv != nil && len(fd.Recv.List) == 1 {
				recv := fd.Recv.List[0].Type
				star := ""
				if s, ok := recv.(*ast.StarExpr); ok {
					recv, star = s.X, "*"
				}
				if id, ok := recv.(*ast.Ident); ok {
					switch id.Name {
					case "osStorage", "syncLatch":
						continue // the adapters themselves
					}
					fn = "(" + star + id.Name + ")." + fn
				}
			}
			calls := false
			ast.Inspect(fd.Body, func(n ast.Node) bool {
				c, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				switch f := c.Fun.(type) {
				case *ast.SelectorExpr:
					if methods[f.Sel.Name] && storageRecv(f.X) {
						calls = true
					}
					if storageHelpers["(*"+recvTypeGuess(f.X)+")."+f.Sel.Name] {
						calls = true
					}
				case *ast.Ident:
					if storageHelpers[f.Name] {
						calls = true
					}
				}
				return true
			})
			if calls && !storageHelpers[fn] {
				out[fn] = true
			}
		}
	}
	return out
}

// recvTypeGuess maps the package's receiver variable names to their types,
// for calls of helper methods (im.writePayload, j.writeEntry, ...).
func recvTypeGuess(x ast.Expr) string {
	name := ""
	switch r := x.(type) {
	case *ast.Ident:
		name = r.Name
	case *ast.SelectorExpr:
		name = r.Sel.Name
	}
	switch name {
	case "im", "parent", "child":
		return "Image"
	case "j", "journal":
		return "journal"
	case "ap":
		return "logApplier"
	case "r":
		return "logReader"
	}
	return ""
}

// sweepJournalEIO fails each Storage call of a journal workload that wraps
// the log ring (bridge entries included), one run at a time. Every failed
// commit's error wraps EIO, a commit after the fault succeeds, and the file
// (replayed) holds exactly the updates of the commits that succeeded: a
// failed one is undone, now and after a power loss.
func sweepJournalEIO(t *testing.T) map[string]bool {
	// Data updates only: a failed commit with zero descriptors may take the
	// journal offline (rule 6), TestJournalGoesOfflineAfterAFailedZeroing.
	var work [][]logUpdate
	for _, c := range journalWorkload() {
		var d []logUpdate
		for _, u := range c {
			if u.data != nil {
				d = append(d, u)
			}
		}
		work = append(work, d)
	}
	base := newLogFixture().current()
	probe := []logUpdate{{offset: tMeta + 0xF000, data: sectorOf(0x77)}}
	run := func(kind ioKind, n int) (*eioStorage, []bool, error) {
		s := newEIOStorage(base)
		s.failKind, s.failN = kind, n
		j := newJournal(s, tLR)
		ok := make([]bool, len(work))
		for i, c := range work {
			err := j.commit(c, 1<<20, tFileSize)
			if err != nil && !errors.Is(err, unix.EIO) {
				t.Errorf("%s#%d: commit %d: %v does not wrap EIO", kind, n, i, err)
			}
			ok[i] = err == nil
		}
		s.mu.Lock()
		s.before = s.calls
		s.mu.Unlock()
		return s, ok, j.commit(probe, 1<<20, tFileSize)
	}
	clean, _, err := run(kindRead, 0)
	if err != nil {
		t.Fatal(err)
	}
	for kind := ioKind(0); kind < nKinds; kind++ {
		for _, n := range clean.faultPoints(kind, clean.before[kind]) {
			s, ok, err := run(kind, n)
			if !s.hit {
				continue
			}
			if err != nil {
				t.Errorf("%s#%d: a commit after the fault failed: %v", kind, n, err)
				continue
			}
			want := bytes.Clone(base)
			for i, c := range work {
				if ok[i] {
					for _, u := range c {
						applyFaultOp(want, faultOp{off: int64(u.offset), data: u.data})
					}
				}
			}
			applyFaultOp(want, faultOp{off: int64(probe[0].offset), data: probe[0].data})
			for _, mode := range []crashMode{crashDrop, crashKeep} {
				rs := newMemStorage(s.crashImage(mode))
				if _, err := replayLog(rs, tLR); err != nil {
					t.Errorf("%s#%d (%s): replay: %v", kind, n, mode, err)
					continue
				}
				if !equalOutsideLog(rs.data, want) {
					t.Errorf("%s#%d (%s): the file is not the result of the commits that succeeded", kind, n, mode)
				}
			}
		}
	}
	return clean.sites
}
