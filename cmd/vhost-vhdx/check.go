package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const checkUsage = `Usage: vhost-vhdx check [--repair] IMAGE

Check an image against MS-VHDX: headers, region table, metadata, BAT and
log. Every problem found is printed on its own line.

For a differencing image the whole chain is checked: that each parent is
found and linked (parent_linkage matching its DataWriteGuid, same virtual
and sector size, no loop), and each layer below as a standalone image. A
problem in a layer below IMAGE is prefixed with "layer N (FILE)", N being
its depth below IMAGE (1: the parent).

Options:
  --repair   open IMAGE read-write, replay a pending log and truncate leaked
             space at the end of the file (only when nothing else is wrong).
             Layers below IMAGE are only checked; repair them by name.

Leaked space (unused bytes at the end of the file, e.g. after a failed
allocation, or the tail qemu-img leaves) is reported but is not damage.

Exit status:
  0  no problems, only leaked space, or every problem was repaired
  1  the check could not run (file missing, in use, unsupported image)
  2  usage error
  3  the image is damaged: problems remain (in any layer of the chain)
`

// layerCheck is the check of one layer of a chain.
type layerCheck struct {
	depth int
	path  string
	rep   *vhdx.CheckReport
	err   error
}

func runCheck(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("check")
	repair := fs.Bool("repair", false, "")
	pos, err := parseArgs(fs, args, checkUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	path := pos[0]
	rep, err := vhdx.Check(path, *repair)
	if rep == nil {
		return fmt.Errorf("check %s: %s", path, cause(err, path))
	}
	layers := []layerCheck{{0, path, rep, err}}
	if err == nil {
		layers = append(layers, checkBelow(path)...)
	}
	for _, l := range layers {
		prefix := ""
		if l.depth > 0 {
			prefix = fmt.Sprintf("layer %d (%s): ", l.depth, l.path)
		}
		printProblems(stdout, prefix, l.rep)
	}
	for _, l := range layers {
		if l.err == nil {
			continue
		}
		// The check stopped at a structure the rest depends on. A broken
		// structure is damage; anything else (I/O, unsupported feature)
		// means we could not tell.
		code := exitFailure
		if errors.Is(l.err, vhdx.ErrCorrupt) || errors.Is(l.err, vhdx.ErrNotVHDX) || errors.Is(l.err, vhdx.ErrDirtyLog) {
			code = exitDamaged
		}
		return &exitStatusError{code, fmt.Errorf("check %s: %s%s", path, layerName(l), cause(l.err, l.path))}
	}
	var damaged []string
	n := 0
	for _, l := range layers {
		if !l.rep.Damaged() {
			continue
		}
		for _, p := range l.rep.Problems {
			if !p.Repaired && !p.Leak {
				n++
			}
		}
		name := l.path
		if l.depth > 0 {
			name = strings.TrimSuffix(layerName(l), ": ")
		}
		damaged = append(damaged, name)
	}
	if n > 0 {
		hint := ""
		if !*repair && len(damaged) == 1 && layers[0].rep.Damaged() {
			hint = "; try --repair"
		}
		where := ""
		if len(layers) > 1 {
			where = " in " + strings.Join(damaged, ", ")
		}
		return &exitStatusError{exitDamaged, fmt.Errorf("check %s: %d problem(s) remain%s%s", path, n, where, hint)}
	}
	leaks, problems := false, false
	for _, l := range layers {
		problems = problems || len(l.rep.Problems) > 0
		leaks = leaks || (l.rep.LeakedBytes > 0 && (!*repair || l.depth > 0))
	}
	chain := ""
	if len(layers) > 1 {
		chain = fmt.Sprintf(" in the %d layers of the chain", len(layers))
	}
	switch {
	case !problems:
		fmt.Fprintf(stdout, "No errors found%s\n", chain)
	case leaks:
		fmt.Fprintf(stdout, "No errors found%s; the leaked space is harmless\n", chain)
	default:
		fmt.Fprintln(stdout, "All problems were repaired")
	}
	return nil
}

// layerName is "layer N (FILE): " for a layer below the image checked, ""
// for the image itself.
func layerName(l layerCheck) string {
	if l.depth == 0 {
		return ""
	}
	return fmt.Sprintf("layer %d (%s): ", l.depth, l.path)
}

// checkBelow checks every layer under the differencing image at path, read
// only: the files its locators lead to, even when a link between them is
// broken (Check of the image itself reports the links).
func checkBelow(path string) []layerCheck {
	files, _ := vhdx.ChainFiles(path)
	if len(files) == 0 {
		return nil
	}
	var out []layerCheck
	for d, f := range files[1:] {
		rep, err := vhdx.Check(f, false)
		if rep == nil {
			rep = &vhdx.CheckReport{}
		}
		out = append(out, layerCheck{d + 1, f, rep, err})
	}
	return out
}

func printProblems(stdout io.Writer, prefix string, rep *vhdx.CheckReport) {
	for _, p := range rep.Problems {
		// vhdx usually names the offset in What already; say it once.
		where := ""
		if off := fmt.Sprintf("%#x", p.Offset); p.Offset >= 0 && !strings.Contains(p.What, off) {
			where = "offset " + off + ": "
		}
		state := ""
		switch {
		case p.Repaired:
			state = " (repaired)"
		case p.Leak:
			state = " (harmless; --repair truncates it)"
		}
		fmt.Fprintf(stdout, "%s%s%s%s\n", prefix, where, p.What, state)
	}
}
