package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Offsets fixed by MS-VHDX §2.2: the two headers at 64 KiB and 128 KiB,
// the two region tables at 192 KiB and 256 KiB. vhdx.Create puts the log at
// 1 MiB, then a 1 MiB metadata region, then the BAT (3 MiB with the default
// 1 MiB log).
const (
	header1Off = 64 << 10
	header2Off = 128 << 10
	region1Off = 192 << 10
	batOff     = 3 << 20
)

func TestCheckExitStatusTellsCleanFromDamaged(t *testing.T) {
	for _, tc := range []struct {
		name     string
		damage   func(t *testing.T, path string)
		repair   bool
		wantCode int
		wantOut  string
	}{
		{"clean image", nil, false, 0, "No errors found"},
		{"clean image with --repair", nil, true, 0, "No errors found"},
		{"header 1 checksum broken", flipAt(header1Off + 64), false, 3, "header 1"},
		{"both headers broken", flipAt(header1Off+64, header2Off+64), false, 3, "no valid header"},
		{"region table broken", flipAt(region1Off + 100), false, 3, "region table"},
		{"BAT entry with an invalid state", flipAt(batOff), false, 3, "BAT entry 0"},
		{"leaked space at the end of the file is reported but is not damage", growBy(3 << 20), false, 0, "leaked"},
		{"leaked space repaired", growBy(3 << 20), true, 0, "(repaired)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.vhdx")
			mustRun(t, "create", "--size", "32M", "--block-size", "1M", path)
			if tc.damage != nil {
				tc.damage(t, path)
			}
			args := []string{"check", path}
			if tc.repair {
				args = []string{"check", "--repair", path}
			}
			code, stdout, stderr := runCLI(t, args...)
			if code != tc.wantCode {
				t.Errorf("status %d, want %d\nstdout: %s\nstderr: %s", code, tc.wantCode, stdout, stderr)
			}
			if !strings.Contains(stdout, tc.wantOut) {
				t.Errorf("stdout lacks %q:\n%s", tc.wantOut, stdout)
			}
			if tc.wantCode != 0 && strings.Count(stderr, "\n") != 1 {
				t.Errorf("stderr is not one line: %q", stderr)
			}
			if tc.repair && tc.wantCode == 0 {
				if out := mustRun(t, "check", path); !strings.Contains(out, "No errors found") {
					t.Errorf("after repair, check says:\n%s", out)
				}
			}
		})
	}
}

func flipAt(offs ...int64) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, off := range offs {
			b := make([]byte, 1)
			if _, err := f.ReadAt(b, off); err != nil {
				t.Fatal(err)
			}
			b[0] ^= 0xff
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func growBy(n int64) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, st.Size()+n); err != nil {
			t.Fatal(err)
		}
	}
}
