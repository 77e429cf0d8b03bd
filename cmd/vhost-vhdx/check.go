package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const checkUsage = `Usage: vhost-vhdx check [--repair] [--output human|json] IMAGE

Check an image against MS-VHDX: headers, region table, metadata, BAT and
log. Every problem found is printed on its own line.

For a differencing image the whole chain is checked: that each parent is
found and linked (parent_linkage matching its DataWriteGuid, same virtual
and sector size, no loop), and each layer below as a standalone image. A
problem in a layer below IMAGE is prefixed with "layer N (FILE)", N being
its depth below IMAGE (1: the parent); the counts and the exit status cover
every layer.

Options:
  --repair         open read-write, replay a pending log and truncate leaked
                   space at the end of the file (only when nothing else is
                   wrong). Layers below IMAGE are only checked; repair
                   them by name.
  --output FORMAT  human (default) or json: qemu-img check's fields
                   ("filename", "format", "check-errors", "corruptions",
                   "leaks", "corruptions-fixed", "leaks-fixed"; leaks count
                   leaked MiB, VHDX's allocation unit) and ours
                   ("leaked-bytes", "log-replayed", "problems", "error")

Leaked space is unused bytes at the end of the file (e.g. after a failed
allocation): nothing references it, so it wastes space but harms no data.
A log left by a crash counts as a corruption until it is replayed, as in
qemu-img.

Exit status (qemu-img check's; with --repair, the state after repairing):
  0  the image is consistent (or every problem was repaired)
  1  the check could not complete (file missing or in use, not a VHDX
     image, an unsupported feature, an I/O error) or a usage error
  2  the image is corrupted
  3  only leaked space: the image is not corrupted
`

// Exit statuses of check, those of qemu-img check.
const (
	exitCheckCorrupt = 2
	exitCheckLeaks   = 3
)

// checkJSON is check --output json: qemu-img check's ImageCheck field names
// where they apply, then ours.
type checkJSON struct {
	Filename         string         `json:"filename"`
	Format           string         `json:"format"`
	CheckErrors      int            `json:"check-errors"`
	Corruptions      int            `json:"corruptions"`
	Leaks            int64          `json:"leaks"` // leaked space in 1 MiB units (VHDX's allocation unit)
	CorruptionsFixed int            `json:"corruptions-fixed"`
	LeaksFixed       int64          `json:"leaks-fixed"`
	LeakedBytes      int64          `json:"leaked-bytes"`
	LogReplayed      bool           `json:"log-replayed"`
	Problems         []checkProblem `json:"problems"`
	Error            string         `json:"error,omitempty"` // why the check could not complete
}

type checkProblem struct {
	Offset   int64  `json:"offset"` // -1: no single structure
	What     string `json:"what"`
	Repaired bool   `json:"repaired"`
	Leak     bool   `json:"leak"`
}

// checkResult classifies a report the way qemu-img check does.
type checkResult struct {
	checkJSON
	code    int
	damaged []string // corrupted layers: the image's path or "layer N (FILE)"
}

func classifyCheck(path string, rep *vhdx.CheckReport, err error) checkResult {
	r := checkResult{checkJSON: checkJSON{Filename: path, Format: "vhdx", Problems: []checkProblem{}}}
	r.LogReplayed = rep.LogReplayed
	for _, p := range rep.Problems {
		r.Problems = append(r.Problems, checkProblem{p.Offset, p.What, p.Repaired, p.Leak})
		switch {
		case p.Leak && p.Repaired:
			r.LeaksFixed += mibUnits(rep.LeakedBytes)
		case p.Leak:
			r.Leaks += mibUnits(rep.LeakedBytes)
		case p.Repaired:
			r.CorruptionsFixed++
		default:
			r.Corruptions++
		}
	}
	if !leakRepaired(rep) {
		r.LeakedBytes = rep.LeakedBytes
	}
	if err != nil {
		r.Error = cause(err, path)
		// The check stopped at a structure the rest depends on. A broken
		// structure, a broken link of a chain (missing parent, linkage
		// mismatch, loop) or a log still to replay is a corruption, already
		// listed among the problems; anything else (I/O, an unsupported
		// feature, not VHDX at all) means we could not tell.
		if !errors.Is(err, vhdx.ErrCorrupt) && !errors.Is(err, vhdx.ErrDirtyLog) && !errors.Is(err, vhdx.ErrChain) {
			r.CheckErrors = 1
			if r.Corruptions > 0 {
				r.Corruptions-- // the error itself, appended by vhdx.Check
			}
		}
	}
	r.code = r.exitCode()
	return r
}

// exitCode is qemu-img check's status for the counts: could not check,
// corrupted, only leaks, consistent, in that order.
func (r *checkResult) exitCode() int {
	switch {
	case r.CheckErrors > 0:
		return exitFailure
	case r.Corruptions > 0:
		return exitCheckCorrupt
	case r.Leaks > 0:
		return exitCheckLeaks
	}
	return exitOK
}

func leakRepaired(rep *vhdx.CheckReport) bool {
	for _, p := range rep.Problems {
		if p.Leak && p.Repaired {
			return true
		}
	}
	return false
}

func mibUnits(n int64) int64 { return (n + 1<<20 - 1) >> 20 }

func runCheck(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("check")
	repair := fs.Bool("repair", false, "")
	output := fs.String("output", "human", "")
	pos, err := parseArgs(fs, args, checkUsage, stdout, 1, 1)
	if err == nil && *output != "human" && *output != "json" {
		err = usagef("check", "--output %q: want human or json", *output)
	}
	var ue *usageError
	if errors.As(err, &ue) {
		// 2 means "corrupted" here, as in qemu-img check.
		return &exitStatusError{exitFailure, err}
	}
	if err != nil {
		return err
	}
	path := pos[0]
	rep, err := vhdx.Check(path, *repair)
	if rep == nil {
		// Not even opened: nothing to report but the reason.
		return fmt.Errorf("check %s: %s", path, cause(err, path))
	}
	layers := []layerCheck{{0, path, rep, err}}
	if err == nil {
		layers = append(layers, checkBelow(path)...)
	}
	r := classifyLayers(layers)
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "    ")
		if err := enc.Encode(r.checkJSON); err != nil {
			return err
		}
	} else {
		printCheck(stdout, r, len(layers))
	}
	if r.code == exitOK {
		return nil
	}
	return &exitStatusError{r.code, fmt.Errorf("check %s: %s", path, checkSummary(r, *repair))}
}

// layerCheck is the check of one layer of a chain.
type layerCheck struct {
	depth int
	path  string
	rep   *vhdx.CheckReport
	err   error
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
			rep = &vhdx.CheckReport{Problems: []vhdx.Problem{{Offset: -1, What: cause(err, f)}}}
		}
		out = append(out, layerCheck{d + 1, f, rep, err})
	}
	return out
}

// classifyLayers adds up the layers' results: a problem in any layer counts,
// named by its layer, and the exit status is the worst of them in
// qemu-img's order (could not check, corrupted, leaks).
func classifyLayers(layers []layerCheck) checkResult {
	var total checkResult
	for _, l := range layers {
		r := classifyCheck(l.path, l.rep, l.err)
		prefix := layerName(l)
		if l.depth == 0 {
			total = r
			total.Problems = total.Problems[:0]
		} else {
			total.CheckErrors += r.CheckErrors
			total.Corruptions += r.Corruptions
			total.Leaks += r.Leaks
			total.LeakedBytes += r.LeakedBytes
			if total.Error == "" && r.Error != "" {
				total.Error = prefix + r.Error
			}
		}
		for _, p := range r.Problems {
			p.What = prefix + p.What
			total.Problems = append(total.Problems, p)
		}
		if r.code == exitCheckCorrupt {
			name := l.path
			if l.depth > 0 {
				name = strings.TrimSuffix(prefix, ": ")
			}
			total.damaged = append(total.damaged, name)
		}
	}
	total.code = total.exitCode()
	return total
}

func printCheck(w io.Writer, r checkResult, layers int) {
	for _, p := range r.Problems {
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
		fmt.Fprintf(w, "%s%s%s\n", where, p.What, state)
	}
	chain := ""
	if layers > 1 {
		chain = fmt.Sprintf(" in the %d layers of the chain", layers)
	}
	switch {
	case r.code != exitOK:
		// checkSummary goes to stderr.
	case len(r.Problems) == 0:
		fmt.Fprintf(w, "No errors found%s\n", chain)
	default:
		fmt.Fprintln(w, "All problems were repaired")
	}
}

// checkSummary is the one stderr line of a non-zero exit.
func checkSummary(r checkResult, repaired bool) string {
	hint := ""
	if !repaired {
		hint = "; try --repair"
	}
	switch r.code {
	case exitFailure:
		return "could not complete: " + r.Error
	case exitCheckCorrupt:
		where := ""
		if len(r.damaged) > 0 {
			where = " in " + strings.Join(r.damaged, ", ")
		}
		return fmt.Sprintf("image is corrupted: %d problem(s) remain%s%s", r.Corruptions, where, hint)
	default:
		return fmt.Sprintf("no corruption; %d bytes of leaked space at the end of the file (harmless%s)", r.LeakedBytes, hint)
	}
}
