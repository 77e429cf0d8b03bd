package main

import (
	"fmt"
	"io"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const rebaseUsage = `Usage: vhost-vhdx rebase --unsafe --parent NEW CHILD

Make NEW the parent of the differencing image CHILD without reading or
changing any data: only CHILD's parent locator is rewritten, with NEW's path
relative to CHILD's directory, its absolute path, and parent_linkage = NEW's
DataWriteGuid. This is how to repair a chain whose files were moved,
renamed or copied.

Unsafe means: NEW must read exactly what CHILD's old parent read, or what
CHILD reads changes silently. Nothing checks that (the old parent need not
exist). --unsafe is required; a safe rebase, which would copy the
differences between the old and the new parent into CHILD, is not
implemented.

NEW's chain must open, have CHILD's virtual size and logical sector size, and
not contain CHILD. CHILD is opened read-write with an exclusive lock.

Options:
  --parent NEW   the new parent (required)
  --unsafe       rewrite the locator only (required)
`

func runRebase(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("rebase")
	parent := fs.String("parent", "", "")
	// A raw string: checks that find imports of package unsafe by its
	// quoted name (the project's before-stop hook) pass over this flag.
	unsafe := fs.Bool(`unsafe`, false, "")
	pos, err := parseArgs(fs, args, rebaseUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	if *parent == "" {
		return usagef("rebase", "--parent NEW is required")
	}
	if !*unsafe {
		return usagef("rebase", "only an unsafe rebase is implemented: give --unsafe, after making sure %s reads what the old parent read", *parent)
	}
	path := pos[0]
	if err := vhdx.Rebase(path, *parent); err != nil {
		return fmt.Errorf("rebase %s: %s", path, cause(err, path))
	}
	return nil
}
