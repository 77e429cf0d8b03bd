package main

import (
	"fmt"
	"io"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const commitUsage = `Usage: vhost-vhdx commit CHILD

Merge the differencing image CHILD into its parent: every sector CHILD holds
is written into the parent, so that afterwards the parent alone reads what
the chain read through CHILD.

CHILD is not emptied: it keeps its data and is re-linked to the updated
parent, so it still opens and reads the same. Delete it if it is no longer
needed, or go on using it. A chain above CHILD is not affected. Other
children of the same parent no longer open afterwards: the data under them
changed (their parent_linkage no longer matches the parent).

commit is crash safe: at every moment both files are valid and the chain
reads the same. If it is interrupted, run it again; it completes the merge
(and replays a log the parent was left with).

Both CHILD and its parent are opened read-write with exclusive locks: neither
may be in use (served, or open in another tool). Progress is shown on stderr
when it is a terminal.
`

func runCommit(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("commit")
	pos, err := parseArgs(fs, args, commitUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	path := pos[0]
	var p *progress
	err = vhdx.Commit(path, func(done, total int64) {
		if p == nil {
			p = newProgressFor(stderr, "committing", total)
		}
		p.update(done)
	})
	if p != nil {
		p.finish(err == nil)
	}
	if err != nil {
		return fmt.Errorf("commit %s: %s", path, cause(err, path))
	}
	return nil
}
