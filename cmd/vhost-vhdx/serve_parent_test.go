package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParentWatchStopsWhenTheParentIsStoppingOrGone(t *testing.T) {
	const makeCaught = 0x1814207 // GNU make 4.3's SigCgt: INT HUP QUIT TERM CHLD ...
	type view struct {
		ppid   int
		caught uint64
		err    error
	}
	for _, tc := range []struct {
		name  string
		views []view // the first is the start; the last repeats
		want  string // in the stop reason; "" if it must not stop
	}{
		{"make handling SIGINT", []view{{10, makeCaught, nil}, {10, makeCaught, nil}, {10, makeCaught &^ sigBit(syscall.SIGINT), nil}}, "interrupt"},
		{"make handling SIGHUP", []view{{10, makeCaught, nil}, {10, makeCaught &^ sigBit(syscall.SIGHUP), nil}}, "hangup"},
		{"parent gone", []view{{10, makeCaught, nil}, {1, 0, nil}}, "exited"},
		{"parent gone, unreadable from the start", []view{{10, 0, os.ErrNotExist}, {1, 0, os.ErrNotExist}}, "exited"},
		{"other signals change", []view{{10, makeCaught, nil}, {10, makeCaught &^ sigBit(syscall.SIGCHLD) &^ sigBit(syscall.SIGUSR1), nil}}, ""},
		{"a passing read error", []view{{10, makeCaught, nil}, {10, 0, errors.New("EAGAIN")}}, ""},
		{"a shell that never caught them", []view{{10, sigBit(syscall.SIGCHLD), nil}, {10, 0, nil}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			calls := 0
			v := func() (int, uint64, error) {
				x := tc.views[min(calls, len(tc.views)-1)]
				calls++
				if calls > 50 {
					cancel() // plenty of ticks without a stop
				}
				return x.ppid, x.caught, x.err
			}
			var reason string
			watchParent(ctx, v, time.Microsecond, func(why string) { reason = why })
			switch {
			case tc.want == "" && reason != "":
				t.Errorf("stopped (%s), want no stop", reason)
			case tc.want != "" && !strings.Contains(reason, tc.want):
				t.Errorf("stop reason %q, want one naming %q", reason, tc.want)
			}
		})
	}
}

func TestParseSigCgtReadsTheMaskOrSaysWhy(t *testing.T) {
	m, err := parseSigCgt([]byte("Name:\tmake\nSigBlk:\t0000000000010002\nSigCgt:\t0000000001814205\n"))
	if err != nil || m != 0x1814205 {
		t.Errorf("parse = %#x, %v", m, err)
	}
	for _, bad := range []string{"Name:\tx\n", "SigCgt:\tzz\n", "SigCgt:\t1ffffffffffffffff\n"} {
		if _, err := parseSigCgt([]byte(bad)); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func FuzzParseSigCgt(f *testing.F) {
	f.Add([]byte("SigCgt:\t0000000001814205\n"))
	f.Add([]byte("SigCgt:"))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseSigCgt(b) // must not panic
	})
}

// TestMakeRunStopsCleanlyWhenMakeAloneGetsSIGINT: GNU make keeps a
// SIGINT sent to its own process and waits for its recipe; the daemon
// (serve --stop-with-parent) sees make stop catching it, stops cleanly,
// and make then dies of its SIGINT.
func TestMakeRunStopsCleanlyWhenMakeAloneGetsSIGINT(t *testing.T) {
	if signal.Ignored(syscall.SIGINT) {
		t.Skip("SIGINT is ignored in this process (started in the background), so make would ignore it too")
	}
	m := startMakeRun(t)
	d := m.d
	if err := m.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	err := <-d.exited
	if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGINT {
		t.Fatalf("make run after SIGINT: %v, want death by SIGINT\n%s", err, d.output())
	}
	for range d.lines {
	}
	out := d.output()
	if !strings.Contains(out, "stopping with the parent process") || !strings.Contains(out, "stopped; image flushed and closed") {
		t.Errorf("the daemon did not stop cleanly on make's SIGINT:\n%s", out)
	}
	m.checkLeftClean(t)
}
