package main

import (
	"compress/bzip2"
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
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

// TestCheckSpeaksQEMUImgExitCodes: 0 consistent (or repaired), 1 the check
// could not complete, 2 corrupted, 3 only leaks — qemu-img check's codes
// (qemu-img(1), "check"), in the human and the JSON output alike.
func TestCheckSpeaksQEMUImgExitCodes(t *testing.T) {
	type counts struct {
		checkErrors, corruptions, corruptionsFixed int
		leaks, leaksFixed                          int64
	}
	for _, tc := range []struct {
		name     string
		setup    func(t *testing.T, path string) // the image exists, freshly created, unless setup replaces it
		args     []string
		wantCode int
		wantOut  string // in the human output (stdout and stderr)
		want     counts
	}{
		{"clean image", nil, nil, 0, "No errors found", counts{}},
		{"clean image with --repair", nil, []string{"--repair"}, 0, "No errors found", counts{}},
		{"leaked space at the end of the file is a leak, not a corruption", growBy(3 << 20), nil, 3, "3145728 bytes of leaked space", counts{leaks: 3}},
		{"leaked space repaired", growBy(3 << 20), []string{"--repair"}, 0, "(repaired)", counts{leaksFixed: 3}},
		{"header 1 checksum broken", flipAt(header1Off + 64), nil, 2, "header 1", counts{corruptions: 1}},
		{"both headers broken: the check stops, corrupted", flipAt(header1Off+64, header2Off+64), nil, 2, "no valid header", counts{corruptions: 1}},
		{"region table broken", flipAt(region1Off + 100), nil, 2, "region table", counts{corruptions: 1}},
		{"BAT entry with an invalid state", flipAt(batOff), nil, 2, "BAT entry 0", counts{corruptions: 1}},
		{"BAT entry pointing past the end of the file", batEntryPastEOF, nil, 2, "past the end of the file", counts{corruptions: 1}},
		{"leaks are not repaired while a corruption remains", func(t *testing.T, p string) { flipAt(batOff)(t, p); growBy(3<<20)(t, p) }, []string{"--repair"}, 2, "image is corrupted", counts{corruptions: 1, leaks: 3}},
		{"a log left by a crash is a corruption until replayed", dirtySample, nil, 2, "try --repair", counts{corruptions: 1}},
		{"a log left by a crash replayed by --repair", dirtySample, []string{"--repair"}, 0, "(repaired)", counts{corruptionsFixed: 1}},
		{"not a VHDX file: the check cannot complete", replaceWith([]byte("just some text")), nil, 1, "not a VHDX file", counts{checkErrors: 1}},
		{"image in use by a writer: the check cannot complete", holdOpen, nil, 1, "in use", counts{}},
		{"missing file: the check cannot complete", remove, nil, 1, "no such file or directory", counts{}},
		{"usage error: 1, as qemu-img check, since 2 means corrupted", nil, []string{"--output", "xml"}, 1, `--output "xml"`, counts{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A repairing check changes the image: each run gets its own copy.
			path, pristine := checkSample(t, "c.vhdx", tc.setup)

			code, stdout, stderr := runCLI(t, append(append([]string{"check"}, tc.args...), path)...)
			if code != tc.wantCode {
				t.Errorf("status %d, want %d\nstdout: %s\nstderr: %s", code, tc.wantCode, stdout, stderr)
			}
			if !strings.Contains(stdout+stderr, tc.wantOut) {
				t.Errorf("output lacks %q:\n%s%s", tc.wantOut, stdout, stderr)
			}
			if tc.wantCode != 0 && strings.Count(stderr, "\n") != 1 {
				t.Errorf("stderr is not one line: %q", stderr)
			}
			if slices.Contains(tc.args, "--repair") && tc.wantCode == 0 {
				if out := mustRun(t, "check", path); !strings.Contains(out, "No errors found") {
					t.Errorf("after repair, check says:\n%s", out)
				}
			}

			restoreFile(t, path, pristine)
			if slices.Contains(tc.args, "--output") {
				return
			}
			code, stdout, stderr = runCLI(t, append(append([]string{"check", "--output", "json"}, tc.args...), path)...)
			if code != tc.wantCode {
				t.Errorf("--output json: status %d, want %d (stderr %q)", code, tc.wantCode, stderr)
			}
			if code == 1 && tc.want == (counts{}) {
				// Not opened at all: like qemu-img, no report, one line on stderr.
				if stdout != "" {
					t.Errorf("--output json printed a report for an image it could not open:\n%s", stdout)
				}
				return
			}
			var got map[string]any
			if err := json.Unmarshal([]byte(stdout), &got); err != nil {
				t.Fatalf("--output json: %v\n%s", err, stdout)
			}
			num := func(k string) int64 {
				v, ok := got[k].(float64)
				if !ok {
					t.Errorf("JSON lacks %q:\n%s", k, stdout)
				}
				return int64(v)
			}
			gotCounts := counts{int(num("check-errors")), int(num("corruptions")), int(num("corruptions-fixed")), num("leaks"), num("leaks-fixed")}
			if gotCounts != tc.want {
				t.Errorf("JSON counts %+v, want %+v\n%s", gotCounts, tc.want, stdout)
			}
			if got["filename"] != path || got["format"] != "vhdx" {
				t.Errorf("JSON filename/format = %v/%v", got["filename"], got["format"])
			}
			if probs, ok := got["problems"].([]any); !ok || len(probs) < tc.want.corruptions+tc.want.corruptionsFixed {
				t.Errorf("JSON problems %v, want at least %d", got["problems"], tc.want.corruptions+tc.want.corruptionsFixed)
			}
		})
	}
}

// Our exit codes and counts agree with qemu-img check's where both judge
// the same thing. (They differ by design on two: QEMU's VHDX check does not
// count leaked space at the end of the file, and without -r it cannot open
// an image with a log to replay, exit 1, where we report the log as the
// corruption it is, exit 2; both agree once it is repaired.)
func TestCheckAgreesWithQEMUImg(t *testing.T) {
	qemuImg := vhdxtest.NeedTool(t, "qemu-img")
	for _, tc := range []struct {
		name   string
		setup  func(t *testing.T, path string)
		repair bool
	}{
		{"clean", nil, false},
		{"BAT entry pointing past the end of the file", batEntryPastEOF, false},
		{"a log left by a crash, repaired", dirtySample, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, pristine := checkSample(t, "q.vhdx", tc.setup)
			args, qargs := []string{"check", "--output", "json"}, []string{"check", "-f", "vhdx", "--output", "json"}
			if tc.repair {
				args, qargs = append(args, "--repair"), append(qargs, "-r", "all")
			}
			ours, stdout, stderr := runCLI(t, append(args, path)...)
			restoreFile(t, path, pristine)
			cmd := exec.Command(qemuImg, append(qargs, path)...)
			out, err := cmd.Output()
			theirs := 0
			if ee, ok := err.(*exec.ExitError); ok {
				theirs = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if ours != theirs {
				t.Errorf("vhost-vhdx check exits %d (%s), qemu-img check %d:\n%s", ours, stderr, theirs, out)
			}
			var o, q map[string]any
			if err := json.Unmarshal([]byte(stdout), &o); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(out, &q); err != nil {
				t.Fatalf("qemu-img JSON: %v\n%s", err, out)
			}
			// qemu-img leaves out a count that is zero.
			for _, k := range []string{"check-errors", "corruptions", "corruptions-fixed"} {
				qv, _ := q[k].(float64)
				if o[k] != qv {
					t.Errorf("%q: ours %v, qemu-img's %v", k, o[k], qv)
				}
			}
		})
	}
}

// batEntryPastEOF makes BAT entry 0 a fully present block (state 6,
// MS-VHDX §2.5.1.1) at file offset 1000 MiB, far past the end of the file.
func batEntryPastEOF(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(binary.LittleEndian.AppendUint64(nil, 6|1000<<20), batOff); err != nil {
		t.Fatal(err)
	}
}

func dirtySample(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open("../../vhdx/testdata/samples/iotest-dirtylog-10G-4M.vhdx.bz2")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := io.ReadAll(bzip2.NewReader(f))
	if err != nil {
		t.Fatal(err)
	}
	replaceWith(b)(t, path)
}

func replaceWith(b []byte) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		t.Helper()
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func remove(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

// holdOpen opens the image read-write for the rest of the test, as a
// running server does (its lock is exclusive).
func holdOpen(t *testing.T, path string) {
	t.Helper()
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
}

// checkSample creates a fresh 32 MiB image named name, spoils it with setup
// (unless nil) and returns its path and a snapshot of its bytes.
func checkSample(t *testing.T, name string, setup func(t *testing.T, path string)) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	mustRun(t, "create", "--size", "32M", "--block-size", "1M", path)
	if setup != nil {
		setup(t, path)
	}
	return path, snapshotFile(t, path)
}

func snapshotFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func restoreFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if b == nil {
		return
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
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
