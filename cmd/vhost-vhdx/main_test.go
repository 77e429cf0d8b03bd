package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCLI runs the command line in-process and returns the exit status and
// both streams.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunReportsEveryFailureAsOneLineWithItsExitStatus(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "exists.vhdx")
	if code, _, stderr := runCLI(t, "create", "--size", "16M", existing); code != 0 {
		t.Fatalf("create: %d %s", code, stderr)
	}
	notVHDX := filepath.Join(dir, "plain.txt")
	if err := os.WriteFile(notVHDX, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.vhdx")
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string // substring of the single stderr line
	}{
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"unknown flag", []string{"create", "--sise", "1G", missing}, 2, "flag provided but not defined: -sise"},
		{"create without --size", []string{"create", missing}, 2, "--size is required"},
		{"create without an image", []string{"create", "--size", "1G"}, 2, "missing argument"},
		{"create with two images", []string{"create", "--size", "1G", missing, existing}, 2, "unexpected argument"},
		{"create with size zero", []string{"create", "--size", "0", missing}, 2, "must be greater than zero"},
		{"create with an overflowing size", []string{"create", "--size", "16E", missing}, 2, "does not fit in 64 bits"},
		{"create with a bad type", []string{"create", "--size", "1G", "--type", "sparse", missing}, 2, `--type "sparse"`},
		{"create with a bad sector size", []string{"create", "--size", "1G", "--logical-sector", "1024", missing}, 2, "--logical-sector 1024"},
		{"create with a bad disk id", []string{"create", "--size", "1G", "--disk-id", "xyz", missing}, 2, "not a UUID"},
		{"create over an existing file", []string{"create", "--size", "1G", existing}, 1, "create " + existing + ": file exists"},
		{"create with a size not a multiple of the sector", []string{"create", "--size", "1000", missing}, 1, "invalid argument"},
		{"create with a block size out of range", []string{"create", "--size", "1G", "--block-size", "512K", missing}, 1, "block size"},
		{"info on a missing file", []string{"info", missing}, 1, "info " + missing + ": no such file or directory"},
		{"info on a file that is not VHDX", []string{"info", notVHDX}, 1, "not a VHDX file"},
		{"map on a missing file", []string{"map", missing}, 1, "no such file or directory"},
		{"check on a missing file", []string{"check", missing}, 1, "no such file or directory"},
		{"convert without -O", []string{"convert", existing, missing}, 2, "-O raw|vhdx is required"},
		{"convert to an unknown format", []string{"convert", "-O", "qcow2", existing, missing}, 2, `-O "qcow2"`},
		{"convert to raw with VHDX options", []string{"convert", "-O", "raw", "--block-size", "1M", existing, missing}, 2, "only apply to -O vhdx"},
		{"convert onto an existing file", []string{"convert", "-O", "vhdx", notVHDX, existing}, 1, "file exists"},
		{"help for an unknown command", []string{"help", "nope"}, 2, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit status %d, want %d (stderr %q)", code, tc.wantCode, stderr)
			}
			if strings.Count(stderr, "\n") != 1 || !strings.HasPrefix(stderr, "vhost-vhdx: ") {
				t.Errorf("stderr is not one 'vhost-vhdx: ' line: %q", stderr)
			}
			if !strings.Contains(stderr, tc.wantErr) {
				t.Errorf("stderr %q does not mention %q", stderr, tc.wantErr)
			}
		})
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("a failed command left %s behind", missing)
	}
}

func TestRunPrintsHelpAndVersionOnStdout(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"help"}, "Exit status: 0 success, 1 failure, 2 usage error."},
		{[]string{"--help"}, "Commands:"},
		{[]string{"help", "create"}, "--logical-sector 512|4096"},
		{[]string{"help", "check"}, "3  only leaked space"},
		{[]string{"help", "convert"}, "-O raw|vhdx"},
		{[]string{"help", "serve"}, "--socket-owner U[:G]"},
		{[]string{"help", "serve"}, "passes by socket activation (LISTEN_FDS=1"},
		// The vhost-user backend conventions run BINARY --print-capabilities.
		{[]string{"--print-capabilities"}, `{"type":"block","features":["read-only","blk-file"]}`},
		{[]string{"create", "-h"}, "Usage: vhost-vhdx create"},
		{[]string{"map", "--help"}, "Usage: vhost-vhdx map"},
		{[]string{"--version"}, "vhost-vhdx " + versionString()},
		{[]string{"version"}, "vhost-vhdx " + versionString()},
	} {
		code, stdout, stderr := runCLI(t, tc.args...)
		if code != 0 || stderr != "" || !strings.Contains(stdout, tc.want) {
			t.Errorf("%q: status %d, stderr %q, stdout lacks %q:\n%s", tc.args, code, stderr, tc.want, stdout)
		}
	}
}

func TestFlagsMayFollowTheImageArgument(t *testing.T) {
	path := filepath.Join(t.TempDir(), "late.vhdx")
	if code, _, stderr := runCLI(t, "create", path, "--size", "8M", "--logical-sector", "4096"); code != 0 {
		t.Fatalf("create: status %d: %s", code, stderr)
	}
	info := infoJSON(t, path)
	if info.VirtualSize != 8<<20 || info.LogicalSectorSize != 4096 {
		t.Errorf("info = %+v, want 8 MiB with 4096-byte sectors", info)
	}
	// After "--" a leading dash is a file name, not a flag.
	t.Chdir(t.TempDir())
	if code, _, stderr := runCLI(t, "create", "--size", "8M", "--", "-dash.vhdx"); code != 0 {
		t.Fatalf("create -- -dash.vhdx: status %d: %s", code, stderr)
	}
	if _, err := os.Stat("-dash.vhdx"); err != nil {
		t.Error(err)
	}
}

func TestNoArgumentsPrintsTheUsageAsAUsageError(t *testing.T) {
	code, stdout, stderr := runCLI(t)
	if code != exitUsage {
		t.Errorf("status %d, want %d", code, exitUsage)
	}
	if stdout != "" {
		t.Errorf("stdout %q, want nothing", stdout)
	}
	if stderr != mainUsage() {
		t.Errorf("stderr is not the usage:\n%s", stderr)
	}
}
