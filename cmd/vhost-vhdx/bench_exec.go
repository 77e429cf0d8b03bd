package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

const benchExecUsage = `Usage: vhost-vhdx bench exec [--json] -- COMMAND [ARGS]

Run COMMAND (its standard output is discarded) and print its wall time and
maximum resident set size. A command that fails is an error, with its
standard error shown.
`

// execResult is what `bench exec` measured of one command.
type execResult struct {
	Command   string  `json:"command"`
	Seconds   float64 `json:"seconds"`
	MaxRSSKiB int64   `json:"max_rss_kib"` // getrusage of the child: ru_maxrss
}

func runBenchExec(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench exec")
	asJSON := fs.Bool("json", false, "")
	pos, err := parseArgs(fs, args, benchExecUsage, stdout, 1, 1<<16)
	if err != nil {
		return err
	}
	res, err := measureCommand(pos[0], pos[1:])
	if err != nil {
		return fmt.Errorf("bench exec: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "%s: %.3fs wall, max RSS %.1f MiB\n", res.Command, res.Seconds, float64(res.MaxRSSKiB)/1024)
	return nil
}

// errCommandFailed is a measured command that did not exit with status 0.
var errCommandFailed = errors.New("command failed")

// measureCommand runs name with args and returns the wall time from start
// to exit and the child's peak RSS, which the kernel keeps per process and
// wait4 returns (what /usr/bin/time -v prints as "Maximum resident set
// size").
func measureCommand(name string, args []string) (*execResult, error) {
	cmd := exec.Command(name, args...)
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start)
	line := strings.Join(append([]string{name}, args...), " ")
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v: %s", errCommandFailed, line, err, strings.TrimSpace(errOut.String()))
	}
	res := &execResult{Command: line, Seconds: wall.Seconds()}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		res.MaxRSSKiB = ru.Maxrss // kilobytes on Linux (getrusage(2))
	}
	return res, nil
}
