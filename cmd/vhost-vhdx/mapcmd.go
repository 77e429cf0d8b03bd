package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
)

const mapUsage = `Usage: vhost-vhdx map [--json] IMAGE

List the virtual disk as runs of data (stored in the file, with their file
offset) and zeros (unallocated). Opens read-only without a lock.

Options:
  --json   print a JSON array of {offset, length, data, file_offset}
`

// mapExtent is the JSON form of vhdx.Extent; the vhdx type carries no tags.
type mapExtent struct {
	Offset     int64 `json:"offset"`
	Length     int64 `json:"length"`
	Data       bool  `json:"data"`
	FileOffset int64 `json:"file_offset"`
}

func runMap(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("map")
	asJSON := fs.Bool("json", false, "")
	pos, err := parseArgs(fs, args, mapUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	path := pos[0]
	im, err := openInspect(path)
	if err != nil {
		return fmt.Errorf("map %s: %s", path, cause(err, path))
	}
	exts, err := im.Extents()
	cerr := im.Close()
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("map %s: %s", path, cause(err, path))
	}
	out := make([]mapExtent, len(exts))
	for i, e := range exts {
		out[i] = mapExtent{Offset: e.Offset, Length: e.Length, Data: e.Data, FileOffset: e.FileOffset}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "Offset\tLength\tType\tFile offset\t")
	for _, e := range out {
		kind, foff := "zero", "-"
		if e.Data {
			kind, foff = "data", fmt.Sprintf("%#x", e.FileOffset)
		}
		fmt.Fprintf(tw, "%#x\t%#x\t%s\t%s\t\n", e.Offset, e.Length, kind, foff)
	}
	return tw.Flush()
}
