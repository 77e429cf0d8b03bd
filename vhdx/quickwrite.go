package vhdx

// QuickWrite reports whether a write of n bytes at virtual offset off
// would, as the image stands now, be plain pwrites into blocks this file
// already holds: no block allocation (a journal entry and its syncs), no
// sector bitmap of a differencing image, no first-write header update.
// The vhost-user queue runs such overwrites inline instead of on a
// goroutine of their own (blk.QuickWriter). It is a hint read without a
// lock: a block discarded in between just makes the write take the slow
// path it would have taken anyway. It walks at most one BAT entry per
// block of the range, so it bounds itself by the range the caller checked
// (blk caps a request at 2 GiB: 2048 entries with 1 MiB blocks).
func (im *Image) QuickWrite(off, n int64) bool {
	if im.readOnly || im.l.hasParent || !im.dataSession.Load() || n <= 0 ||
		im.checkRange("write", off, uint64(n)) != nil {
		return false
	}
	end := uint64(off) + uint64(n)
	for pos := uint64(off); pos < end; {
		_, e, _, left := im.locate(pos)
		if batState(e) != stateFullyPresent {
			return false
		}
		pos += left
	}
	return true
}
