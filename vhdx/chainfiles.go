package vhdx

import "fmt"

// ChainFiles lists the files of the differencing chain of the image at
// path, path first, then its parent and so on, following each layer's parent
// locator the way Open does (§2.6.2.6.3) but without validating the links
// (linkage, geometry): for tools that check or describe a broken chain layer
// by layer. Each file is opened on its own, read-only and without a lock,
// a pending log replayed in memory. The walk stops at the first file that
// does not open (it is listed: it exists, and is the layer at fault) or
// whose parent is not found, with that error; a loop or a chain deeper than
// MaxChainDepth ends it too.
func ChainFiles(path string) ([]string, error) {
	files := []string{path}
	var seen []fileID
	opts := OpenOptions{ReadOnly: true, NoLock: true, ReplayLogInMemory: true}
	for {
		p := files[len(files)-1]
		im, err := openFileWith(p, opts, openMetadata) // the locator, not the BAT
		if err != nil {
			return files, err
		}
		id, err := fileIDOf(im.f)
		if err != nil {
			im.Close()
			return files, fmt.Errorf("%s: stat: %w", p, err)
		}
		for _, s := range seen {
			if s == id {
				im.Close()
				return files[:len(files)-1], fmt.Errorf("%s is already a layer of this chain: %w", p, ErrChainLoop)
			}
		}
		seen = append(seen, id)
		if !im.l.hasParent {
			im.Close()
			return files, nil
		}
		pl := im.l.locator
		next, tried := pl.resolveParent(p)
		im.Close()
		if next == "" {
			return files, fmt.Errorf("%s: parent_linkage %v: %s: %w", p, pl.linkage, describeTried(pl, tried), ErrParentNotFound)
		}
		if len(files) > MaxChainDepth {
			return files, fmt.Errorf("%s: more than %d parents: %w", path, MaxChainDepth, ErrChainTooDeep)
		}
		files = append(files, next)
	}
}
