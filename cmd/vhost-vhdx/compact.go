package main

import (
	"fmt"
	"io"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const compactUsage = `Usage: vhost-vhdx compact IMAGE

Give an image's unused space back to the host, offline (like Hyper-V's
Optimize-VHD): allocated blocks that hold only zeros are unmapped, blocks at
the end of the file are moved into the holes discards left, and the file is
truncated. Every step goes through the image's log, so a crash at any point
loses nothing. Progress is shown when stderr is a terminal. Fixed images
keep every block and are refused.

For the most effect, let the guest discard first (fstrim, or mount with
-o discard); blocks the guest freed without discarding still hold its old
data and are not zeros.
`

func runCompact(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("compact")
	pos, err := parseArgs(fs, args, compactUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	path := pos[0]
	var progress vhdx.CompactProgress
	if isTerminal(stderr) {
		last := ""
		progress = func(phase string, done, total uint64) {
			pct := uint64(100)
			if total > 0 {
				pct = done * 100 / total
			}
			line := fmt.Sprintf("\r%s: %3d%% (%d/%d blocks)", phase, pct, done, total)
			if line != last {
				fmt.Fprint(stderr, line)
				last = line
			}
		}
	}
	rep, err := vhdx.Compact(path, progress)
	if progress != nil {
		fmt.Fprintln(stderr)
	}
	if err != nil {
		return fmt.Errorf("compact %s: %s", path, cause(err, path))
	}
	fmt.Fprintf(stdout, "%s: %d all-zero blocks unmapped, %d blocks moved\n", path, rep.ZeroBlocks, rep.MovedBlocks)
	fmt.Fprintf(stdout, "file size: %s -> %s\n", formatSize(uint64(max(rep.FileSizeBefore, 0))), formatSize(uint64(max(rep.FileSizeAfter, 0))))
	if rep.HostBefore >= 0 && rep.HostAfter >= 0 {
		fmt.Fprintf(stdout, "allocated on host: %s -> %s (%s reclaimed)\n", formatSize(uint64(rep.HostBefore)), formatSize(uint64(rep.HostAfter)),
			formatSize(uint64(max(rep.HostBefore-rep.HostAfter, 0))))
	}
	return nil
}
