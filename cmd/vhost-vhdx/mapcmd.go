package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
)

const mapUsage = `Usage: vhost-vhdx map [--json] IMAGE

List the virtual disk as runs of data and zeros, as a reader of IMAGE sees
it. Each data run names the layer it comes from (0: IMAGE itself, 1: its
parent, ... for a differencing chain), that layer's file and the offset in
it; zeros are runs no layer holds. Opens read-only without a lock.

Options:
  --json   print a JSON array of {offset, length, data, layer, file,
           file_offset}; a zero run has layer -1 and no file
`

// mapExtent is the JSON form of vhdx.Extent with the layer's file.
type mapExtent struct {
	Offset     int64  `json:"offset"`
	Length     int64  `json:"length"`
	Data       bool   `json:"data"`
	Layer      int    `json:"layer"`
	File       string `json:"file,omitempty"`
	FileOffset int64  `json:"file_offset"`
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
	files := layerPaths(im)
	cerr := im.Close()
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("map %s: %s", path, cause(err, path))
	}
	out := make([]mapExtent, len(exts))
	for i, e := range exts {
		out[i] = mapExtent{Offset: e.Offset, Length: e.Length, Data: e.Data, Layer: e.Layer, FileOffset: e.FileOffset}
		if e.Data && e.Layer >= 0 && e.Layer < len(files) {
			out[i].File = files[e.Layer]
		} else {
			out[i].Layer = -1
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "Offset\tLength\tType\tLayer\tFile offset\tFile")
	for _, e := range out {
		kind, layer, foff, file := "zero", "-", "-", "-"
		if e.Data {
			kind, layer, foff, file = "data", fmt.Sprint(e.Layer), fmt.Sprintf("%#x", e.FileOffset), e.File
		}
		fmt.Fprintf(tw, "%#x\t%#x\t%s\t%s\t%s\t%s\n", e.Offset, e.Length, kind, layer, foff, file)
	}
	return tw.Flush()
}
