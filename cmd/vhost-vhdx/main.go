// Command vhost-vhdx serves a VHDX disk image to QEMU guests over
// vhost-user-blk and offers tools to create, inspect, check and convert
// images.
//
// serve --control-socket adds live operations (control.go, checkpoint.go;
// the protocol is package control): status, stats, flush, checkpoint and
// resize run while the guest does I/O. The served disk is a blk.DiskRef so
// checkpoint can replace it under vhostuser.Monitor.Quiesce.
//
// main only dispatches: each subcommand lives in its own file with its own
// FlagSet and returns an error; run turns that error into one line on stderr
// and an exit status.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

const prog = "vhost-vhdx"

// Exit statuses, listed in the help text.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// command is one subcommand. run gets the arguments after the subcommand
// name; stdout carries results, stderr progress.
type command struct {
	name    string
	summary string
	usage   string // synopsis and flag help, printed by "help NAME"
	run     func(args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"serve", "serve an image over vhost-user-blk", serveUsage, runServe},
		{"create", "create a new image", createUsage, runCreate},
		{"info", "show an image's geometry, GUIDs and allocation", infoUsage, runInfo},
		{"check", "check an image for damage, optionally repair it", checkUsage, runCheck},
		{"map", "list an image's data and zero extents", mapUsage, runMap},
		{"convert", "convert between raw and VHDX", convertUsage, runConvert},
		{"commit", "merge a differencing image into its parent", commitUsage, runCommit},
		{"rebase", "point a differencing image at another parent", rebaseUsage, runRebase},
		{"ctl", "operate on a running daemon through its control socket", ctlUsage, runCtl},
		{"resize", "change an image's virtual size (offline)", resizeUsage, runResize},
		{"compact", "give unused space back to the host (offline)", compactUsage, runCompact},
		{"bench", "drive a vhost-user-blk back-end with load and measure it", benchUsage, runBench},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run dispatches args and returns the exit status. Every failure is exactly
// one line on stderr.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		// No command: the usage is the most useful answer (on stderr, as
		// a usage error).
		fmt.Fprint(stderr, mainUsage())
		return exitUsage
	}
	switch args[0] {
	case "--version", "-version", "version":
		fmt.Fprintf(stdout, "%s %s\n", prog, versionString())
		return exitOK
	case "help", "--help", "-help", "-h":
		return runHelp(args[1:], stdout, stderr)
	}
	if strings.HasPrefix(args[0], "-") {
		// Options without a command are serve's: the vhost-user "Backend
		// program conventions" run the binary named in the backend JSON
		// as BINARY --print-capabilities, or --socket-path/--fd ...
		return exitCode(runServe(args, stdout, stderr), stdout, stderr)
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return exitCode(c.run(args[1:], stdout, stderr), stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "%s: unknown command %q (see '%s help')\n", prog, args[0], prog)
	return exitUsage
}

func runHelp(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stdout, mainUsage())
		return exitOK
	}
	for _, c := range commands() {
		if c.name == args[0] {
			if c.usage == "" {
				// serve owns its flags; its FlagSet prints them.
				return exitCode(c.run([]string{"-h"}, stdout, stderr), stdout, stderr)
			}
			fmt.Fprint(stdout, c.usage)
			return exitOK
		}
	}
	fmt.Fprintf(stderr, "%s: help: unknown command %q\n", prog, args[0])
	return exitUsage
}

func mainUsage() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: %s COMMAND [OPTIONS] ARGS\n\nCommands:\n", prog)
	for _, c := range commands() {
		fmt.Fprintf(&b, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(&b, `  help     show help for a command: %[1]s help COMMAND

Options:
  --version  print the version and exit

Options without a command are serve's (vhost-user backend program
conventions): %[1]s --print-capabilities, %[1]s --socket-path PATH IMAGE.

Exit status: 0 success, 1 failure, 2 usage error. check has qemu-img check's:
0 consistent, 1 could not check (or usage error), 2 corrupted, 3 only leaks.
Sizes take binary suffixes: 512, 64K, 32M, 10G, 2T, 1.5G.
`, prog)
	return b.String()
}

// usageError is a command-line mistake: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(cmd, format string, args ...any) error {
	return &usageError{fmt.Sprintf("%s: %s (see '%s help %s')", cmd, fmt.Sprintf(format, args...), prog, cmd)}
}

// exitStatusError carries a specific exit status with its message.
type exitStatusError struct {
	code int
	err  error
}

func (e *exitStatusError) Error() string { return e.err.Error() }
func (e *exitStatusError) Unwrap() error { return e.err }

// errHelpShown: the command printed its help on request; exit 0.
var errHelpShown = errors.New("help shown")

func exitCode(err error, _, stderr io.Writer) int {
	if err == nil || errors.Is(err, errHelpShown) || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	// One line: multi-line wrapped errors are joined.
	msg := strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
	fmt.Fprintf(stderr, "%s: %s\n", prog, msg)
	// An explicit status wins: check's usage errors exit 1, as qemu-img
	// check's do, because its 2 means "corrupted".
	var se *exitStatusError
	if errors.As(err, &se) {
		return se.code
	}
	var ue *usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitFailure
}

// newFlagSet returns a FlagSet that reports errors instead of printing them,
// so the caller can keep to one line on stderr.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseArgs parses flags that may appear before, between or after the
// positional arguments ("create disk.vhdx --size 10G" works as well as
// "create --size 10G disk.vhdx"); "--" ends flag parsing. It checks the
// positional count and prints usage for -h.
func parseArgs(fs *flag.FlagSet, args []string, usage string, stdout io.Writer, minPos, maxPos int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprint(stdout, usage)
				return nil, errHelpShown
			}
			return nil, usagef(fs.Name(), "%v", err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		// flag stops at the first non-flag; a preceding "--" means the
		// rest is positional.
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	switch {
	case len(pos) < minPos:
		return nil, usagef(fs.Name(), "missing argument")
	case len(pos) > maxPos:
		return nil, usagef(fs.Name(), "unexpected argument %q", pos[maxPos])
	}
	return pos, nil
}
