package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Lines written while the file is rotated and reopened land whole in the
// old or the new file: none is lost, torn or written to a closed file.
func TestLogLinesWrittenDuringReopenAreNeitherLostNorTorn(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "serve.log")
	lf, err := openLogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const writers, lines, rotations = 4, 300, 20
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range lines {
				if _, err := fmt.Fprintf(lf, "writer %d line %d\n", w, i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for r := range rotations {
		if err := os.Rename(path, fmt.Sprintf("%s.%d", path, r)); err != nil {
			t.Fatal(err)
		}
		if err := lf.Reopen(); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("write during reopen: %v", err)
	}
	if err := lf.Close(); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	files, _ := filepath.Glob(path + "*")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
			if l != "" {
				seen[l]++
			}
		}
	}
	for w := range writers {
		for i := range lines {
			if l := fmt.Sprintf("writer %d line %d", w, i); seen[l] != 1 {
				t.Errorf("%q appears %d times", l, seen[l])
			}
		}
	}
	if len(seen) != writers*lines {
		t.Errorf("%d distinct lines, want %d (torn lines?)", len(seen), writers*lines)
	}
}

// A failed reopen (the directory is gone) keeps the old file in use.
func TestFailedReopenKeepsWritingToTheOldFile(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "logs")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(sub, "serve.log")
	lf, err := openLogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	moved := filepath.Join(dir, "moved")
	if err := os.Rename(sub, moved); err != nil {
		t.Fatal(err)
	}
	if err := lf.Reopen(); err == nil {
		t.Fatal("Reopen succeeded in a directory that no longer exists")
	}
	if _, err := fmt.Fprintln(lf, "still logging"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(moved, "serve.log"))
	if err != nil || !strings.Contains(string(b), "still logging") {
		t.Errorf("after a failed reopen the old file has %q (%v)", b, err)
	}
}
