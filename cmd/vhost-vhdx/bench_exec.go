package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const benchExecUsage = `Usage: vhost-vhdx bench exec [--json] [--ok-exit LIST] -- COMMAND [ARGS]

Run COMMAND (its standard output is discarded) and print its wall time and
maximum resident set size. A command that exits with a status not in LIST
(comma-separated, default 0) is an error, with its standard error shown:
--ok-exit 0,3 accepts a check that found only leaked space.
`

// execResult is what `bench exec` measured of one command.
type execResult struct {
	Command   string  `json:"command"`
	Seconds   float64 `json:"seconds"`
	MaxRSSKiB int64   `json:"max_rss_kib"` // getrusage of the child: ru_maxrss
	Exit      int     `json:"exit"`
}

func runBenchExec(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench exec")
	asJSON := fs.Bool("json", false, "")
	okList := fs.String("ok-exit", "0", "")
	pos, err := parseArgs(fs, args, benchExecUsage, stdout, 1, 1<<16)
	if err != nil {
		return err
	}
	var ok []int
	for _, f := range strings.Split(*okList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n > 255 {
			return usagef("bench exec", "--ok-exit %q: want exit statuses 0..255 separated by commas", *okList)
		}
		ok = append(ok, n)
	}
	res, err := measureCommand(pos[0], pos[1:], ok)
	if err != nil {
		return fmt.Errorf("bench exec: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "%s: %.3fs wall, max RSS %.1f MiB\n", res.Command, res.Seconds, float64(res.MaxRSSKiB)/1024)
	return nil
}

// errCommandFailed is a measured command that did not exit with a status
// it was allowed.
var (
	errCommandFailed = errors.New("command failed")
	errExitZero      = errors.New("exit status 0")
)

// measureCommand runs name with args and returns the wall time from start
// to exit and the child's peak RSS, which the kernel keeps per process and
// wait4 returns (what /usr/bin/time -v prints as "Maximum resident set
// size"). An exit status not in ok is an error.
func measureCommand(name string, args []string, ok []int) (*execResult, error) {
	cmd := exec.Command(name, args...)
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start)
	line := strings.Join(append([]string{name}, args...), " ")
	var exitErr *exec.ExitError
	if err != nil && (!errors.As(err, &exitErr) || !slices.Contains(ok, exitErr.ExitCode())) ||
		err == nil && !slices.Contains(ok, 0) {
		return nil, fmt.Errorf("%w: %s: %v: %s", errCommandFailed, line, cmp.Or(err, error(errExitZero)), strings.TrimSpace(errOut.String()))
	}
	res := &execResult{Command: line, Seconds: wall.Seconds(), Exit: cmd.ProcessState.ExitCode()}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		res.MaxRSSKiB = ru.Maxrss // kilobytes on Linux (getrusage(2))
	}
	return res, nil
}
