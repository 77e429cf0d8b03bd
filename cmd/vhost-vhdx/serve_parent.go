package main

// serve --stop-with-parent: stop cleanly when the parent process is dying
// of a signal it keeps to itself, or is gone. It exists for `make run`.
//
// GNU make (4.3, commands.c fatal_error_signal) handles SIGINT, SIGHUP,
// SIGQUIT and SIGTERM sent to its own process like this: it resets the
// signal to its default action, passes SIGTERM (only SIGTERM) on to its
// recipe's process, waits for the recipe to exit, then kills itself with
// the signal. A SIGINT sent to make alone (`kill -INT <make's pid>`, a
// supervisor signalling only its child) therefore never reaches the daemon
// and make waits for it forever. Ctrl-C in a terminal is not affected: the
// terminal sends SIGINT to the whole foreground process group, daemon
// included.
//
// The daemon cannot be told, but it can see it: while make waits in its
// handler, /proc/<make>/status shows the signal no longer caught (SigCgt,
// reset to the default action) and blocked (SigBlk, the handler running).
// The watcher notes which of those four signals the parent catches when
// serve starts, reads the parent's SigCgt a few times a second, and stops
// the daemon as SIGINT would when one of them is no longer caught; also
// when the parent is gone (the daemon was re-parented: make was killed
// with SIGKILL). Only the parent's mask is read, once per tick, from a
// file of a few hundred bytes. A parent that never caught those signals
// (a shell running serve in the foreground) is only watched for exiting.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"
)

// parentWatchEvery is how often the parent is looked at: a stop request
// is noticed within this time.
const parentWatchEvery = 100 * time.Millisecond

// fatalSignals are the signals GNU make's fatal_error_signal resets to the
// default action before it waits for its recipe.
var fatalSignals = []syscall.Signal{syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGTERM}

// errNoSigCgt: a /proc status file without a SigCgt line.
var errNoSigCgt = errors.New("no SigCgt line")

// parentView is what the watcher reads: the parent's pid and the set of
// signals it catches (a SigCgt mask: bit n-1 for signal n).
type parentView func() (ppid int, caught uint64, err error)

// procParent reads the real parent from /proc.
func procParent() (int, uint64, error) {
	ppid := os.Getppid()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", ppid))
	if err != nil {
		return ppid, 0, err
	}
	caught, err := parseSigCgt(b)
	return ppid, caught, err
}

// parseSigCgt returns the SigCgt mask of a /proc/PID/status file.
func parseSigCgt(status []byte) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		v, ok := bytes.CutPrefix(sc.Bytes(), []byte("SigCgt:"))
		if !ok {
			continue
		}
		m, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 16, 64)
		if err != nil {
			return 0, fmt.Errorf("SigCgt %q: %w", bytes.TrimSpace(v), err)
		}
		return m, nil
	}
	return 0, errNoSigCgt
}

func sigBit(s syscall.Signal) uint64 { return 1 << (uint(s) - 1) }

// watchParent returns when ctx ends, or calls stop with the reason and
// returns when the parent it saw first is gone or has stopped catching
// one of fatalSignals it caught then. If the parent cannot be read at
// the start it only watches for the parent exiting.
func watchParent(ctx context.Context, view parentView, every time.Duration, stop func(reason string)) {
	ppid, first, err := view()
	var watched uint64
	if err == nil {
		for _, s := range fatalSignals {
			watched |= first & sigBit(s)
		}
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now, caught, err := view()
		if now != ppid {
			stop(fmt.Sprintf("parent process %d exited", ppid))
			return
		}
		if err != nil || watched&^caught == 0 {
			continue // a passing read error: the next tick tries again
		}
		for _, s := range fatalSignals {
			if watched&^caught&sigBit(s) != 0 {
				stop(fmt.Sprintf("parent process %d is stopping on %v (it no longer catches it)", ppid, s))
				return
			}
		}
	}
}
