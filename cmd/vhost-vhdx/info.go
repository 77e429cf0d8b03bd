package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/google/uuid"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const infoUsage = `Usage: vhost-vhdx info [--backing-chain] [--json] IMAGE

Show an image's size, type, block and sector sizes, allocation, log state
and GUIDs; for a differencing image also its parent (the path the locator
led to), parent_linkage and depth. The image, and the chain below a
differencing image, are opened read-only without a lock, so this works
while the image is being served.

Options:
  --backing-chain  show every layer of the chain, the image first, then its
                   parent, down to the base
  --json           print vhdx.Info as a JSON object (with --backing-chain:
                   an array of them, the image first)
`

func runInfo(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("info")
	asJSON := fs.Bool("json", false, "")
	chain := fs.Bool("backing-chain", false, "")
	pos, err := parseArgs(fs, args, infoUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	path := pos[0]
	im, err := openInspect(path)
	if err != nil {
		return fmt.Errorf("info %s: %s", path, cause(err, path))
	}
	infos := im.BackingChain()
	paths := layerPaths(im)
	if err := im.Close(); err != nil {
		return fmt.Errorf("info %s: %s", path, cause(err, path))
	}
	if !*chain {
		infos, paths = infos[:1], paths[:1]
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if *chain {
			return enc.Encode(infos)
		}
		return enc.Encode(infos[0])
	}
	for i, in := range infos {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		if err := printInfo(stdout, paths[i], i, in); err != nil {
			return err
		}
	}
	return nil
}

// layerPaths lists the file of each layer of im's chain, im first.
func layerPaths(im *vhdx.Image) []string {
	var out []string
	for l := im; l != nil; l = l.Parent() {
		out = append(out, l.Path())
	}
	return out
}

// openInspect opens an image for inspection: read-only and without a lock,
// so a running server does not stop it. The read-only open never modifies
// the file; a dirty log makes it fail (vhdx.ErrDirtyLog) instead.
func openInspect(path string) (*vhdx.Image, error) {
	return vhdx.Open(path, vhdx.OpenOptions{ReadOnly: true, NoLock: true, ReplayLogInMemory: true})
}

// printInfo prints one layer; layer is its depth below the image asked
// about (0 for the image itself).
func printInfo(w io.Writer, path string, layer int, in vhdx.Info) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) {
		fmt.Fprintf(tw, "%s:\t%s\n", k, fmt.Sprintf(format, args...))
	}
	row("image", "%s", path)
	if layer > 0 {
		row("layer", "%d (backing file of layer %d)", layer, layer-1)
	}
	row("type", "%s", in.Type)
	if in.Type == vhdx.Differencing {
		row("parent", "%s", in.ParentPath)
		row("parent linkage", "%s", in.ParentLinkage)
	}
	row("virtual size", "%s", formatSize(in.VirtualSize))
	row("block size", "%s", formatSize(uint64(in.BlockSize)))
	row("logical sector size", "%d", in.LogicalSectorSize)
	row("physical sector size", "%d", in.PhysicalSectorSize)
	if in.FileSize >= 0 {
		row("file size", "%s", formatSize(uint64(in.FileSize)))
	}
	row("allocated", "%s", formatSize(uint64(max(in.AllocatedBytes, 0))))
	if in.HostAllocatedBytes >= 0 {
		// What the file really occupies: below the file size when sparse,
		// and what a guest's discards give back.
		row("allocated on host", "%s", formatSize(uint64(in.HostAllocatedBytes)))
	}
	row("disk id", "%s", in.DiskID)
	row("file write guid", "%s", in.FileWriteGUID)
	row("data write guid", "%s", in.DataWriteGUID)
	// A non-nil log GUID in the current header means a writer has the
	// image open, or crashed before clearing it (MS-VHDX §2.2.2.1).
	logState := "clean"
	if in.LogGUID != uuid.Nil {
		logState = fmt.Sprintf("in use (log guid %s)", in.LogGUID)
	}
	if in.LogReplayed {
		logState += ", pending updates replayed in memory for this report (the file is unchanged; `check --repair` replays them into it)"
	}
	row("log", "%s, %s at offset %#x", logState, formatSize(uint64(in.LogLength)), in.LogOffset)
	if in.Creator != "" {
		row("creator", "%s", in.Creator)
	}
	return tw.Flush()
}
