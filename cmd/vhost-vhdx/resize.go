package main

import (
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const resizeUsage = `Usage: vhost-vhdx resize [--shrink] IMAGE SIZE

Change the virtual size of an image that is not in use. SIZE is absolute
(10G) or relative to the current size (+10G, -1G), as with qemu-img resize.
Growing a dynamic image allocates nothing; a fixed image gets its new
blocks allocated. When the block allocation table no longer fits its
region it is moved to the end of the file, through the log.

Options:
  --shrink   allow a smaller size; refused while a block past the new end
             holds data (the error names its offset: discard it first, e.g.
             with fstrim or blkdiscard in the guest)

Differencing images take their size from their parent and are refused.
`

func runResize(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("resize")
	shrink := fs.Bool("shrink", false, "")
	// "-1G" is a size, not a flag: take it out before flag parsing.
	var rest []string
	negative := ""
	for _, a := range args {
		if len(a) > 1 && a[0] == '-' && a[1] >= '0' && a[1] <= '9' && negative == "" {
			negative = a
			continue
		}
		rest = append(rest, a)
	}
	want := 2
	if negative != "" {
		want = 1
	}
	pos, err := parseArgs(fs, rest, resizeUsage, stdout, want, want)
	if err != nil {
		return err
	}
	path, sizeArg := pos[0], negative
	if negative == "" {
		sizeArg = pos[1]
	}
	sign := ""
	if strings.HasPrefix(sizeArg, "+") || strings.HasPrefix(sizeArg, "-") {
		sign, sizeArg = sizeArg[:1], sizeArg[1:]
	}
	n, err := parseSize(sizeArg)
	if err != nil {
		return usagef("resize", "SIZE: %v", err)
	}
	newSize := n
	if sign != "" {
		im, err := openInspect(path)
		if err != nil {
			return fmt.Errorf("resize %s: %s", path, cause(err, path))
		}
		cur := uint64(im.Size())
		im.Close()
		switch {
		case sign == "+" && n > math.MaxUint64-cur:
			return usagef("resize", "SIZE +%s: too large", sizeArg)
		case sign == "+":
			newSize = cur + n
		case n >= cur:
			return usagef("resize", "SIZE -%s: the disk is only %s", sizeArg, formatSize(cur))
		default:
			newSize = cur - n
		}
	}
	if err := vhdx.Resize(path, newSize, *shrink); err != nil {
		return fmt.Errorf("resize %s: %s", path, cause(err, path))
	}
	fmt.Fprintf(stdout, "%s: virtual size is now %s\n", path, formatSize(newSize))
	return nil
}
