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

Options:
  --repair   open read-write, replay a pending log and truncate leaked space
             at the end of the file (only when nothing else is wrong)

Leaked space (unused bytes at the end of the file, e.g. after a failed
allocation, or the tail qemu-img leaves) is reported but is not damage.

Exit status:
  0  no problems, only leaked space, or every problem was repaired
  1  the check could not run (file missing, in use, unsupported image)
  2  usage error
  3  the image is damaged: problems remain
`

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
		fmt.Fprintf(stdout, "%s%s%s\n", where, p.What, state)
	}
	if err != nil {
		// The check stopped at a structure the rest depends on. A broken
		// structure is damage; anything else (I/O, unsupported feature)
		// means we could not tell.
		code := exitFailure
		if errors.Is(err, vhdx.ErrCorrupt) || errors.Is(err, vhdx.ErrNotVHDX) || errors.Is(err, vhdx.ErrDirtyLog) {
			code = exitDamaged
		}
		return &exitStatusError{code, fmt.Errorf("check %s: %s", path, cause(err, path))}
	}
	if rep.Damaged() {
		n := 0
		for _, p := range rep.Problems {
			if !p.Repaired && !p.Leak {
				n++
			}
		}
		hint := ""
		if !*repair {
			hint = "; try --repair"
		}
		return &exitStatusError{exitDamaged, fmt.Errorf("check %s: %d problem(s) remain%s", path, n, hint)}
	}
	switch {
	case len(rep.Problems) == 0:
		fmt.Fprintln(stdout, "No errors found")
	case rep.LeakedBytes > 0 && !*repair:
		fmt.Fprintln(stdout, "No errors found; the leaked space is harmless")
	default:
		fmt.Fprintln(stdout, "All problems were repaired")
	}
	return nil
}
