package frontend

// SetAvailIdx stores an arbitrary avail.idx, for hostile-driver tests
// (e.g. one that jumps past the ring size), and kicks the back-end. Later
// PutAvail calls continue from it.
func (q *Queue) SetAvailIdx(idx uint16) {
	q.availIdx = idx
	store16(q.f.Mem, q.availOff+2, idx)
	q.Kick()
}
