package vhdx

import "golang.org/x/sys/unix"

// hostAllocated returns the bytes the image file occupies on the host file
// system: st_blocks, which stat(2) counts in 512-byte units whatever the
// file system's block size. Holes (never written, or punched by a discard)
// do not count. -1 for images opened on a Storage (no file) or when fstat
// fails.
func (im *Image) hostAllocated() int64 {
	if im.f == nil {
		return -1
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(im.f.Fd()), &st); err != nil {
		return -1
	}
	return st.Blocks * 512
}
