package frontend

// SetAvailIdx stores an arbitrary avail.idx, for hostile-driver tests
// (e.g. one that jumps past the ring size), and kicks the back-end. Later
// PutAvail calls continue from it.
func (q *Queue) SetAvailIdx(idx uint16) {
	q.availIdx = idx
	store16(q.f.Mem, q.availOff+2, idx)
	q.Kick()
}

// DescTable writes descs as an indirect descriptor table (VIRTIO 1.2
// §2.7.5.3) in fresh guest memory, skew bytes past a 16-byte boundary (a
// hostile driver may misalign it), and returns its guest-physical address.
func (f *Frontend) DescTable(skew int, descs ...RawDesc) (uint64, error) {
	off, err := f.Alloc(16*len(descs)+skew, 16)
	if err != nil {
		return 0, err
	}
	off += skew
	for i, d := range descs {
		putRawDesc(f.Mem[off+16*i:], d)
	}
	return GPA(off), nil
}
