package blk

import "encoding/binary"

// QuickWriter is an optional Disk upgrade. QuickWrite reports whether a
// write of n bytes at byte offset off would, as the disk stands now,
// complete without allocating space or syncing (vhdx: every block it
// touches is allocated in the top image). It is a scheduling hint only: a
// wrong answer costs parallelism, never correctness.
type QuickWriter interface {
	QuickWrite(off, n int64) bool
}

// IsRead reports whether the request whose device-readable buffers are
// readable is an IN or a GET_ID: it changes nothing on the disk, so it
// never waits for an allocation or a sync. A header too short to hold the
// type (split after fewer than 4 bytes, or missing) says false: Handle
// will judge it.
func IsRead(readable [][]byte) bool {
	if len(readable) == 0 || len(readable[0]) < hdrType+4 {
		return false
	}
	t := binary.LittleEndian.Uint32(readable[0][hdrType:])
	return t == TypeIn || t == TypeGetID
}

// Quick reports whether the request can run without waiting for an
// allocation or a sync: a read (IsRead), or, in write-back mode on a Disk
// that is a QuickWriter, an OUT whose whole range is already allocated (an
// overwrite). A queue runs quick requests inline and hands the others to
// goroutines of their own (vhostuser worker.go), so nothing quick queues
// behind a FLUSH or an allocating write. The range is not validated here:
// Handle does that; an absurd one just is not quick.
func Quick(d Disk, o Options, readable [][]byte) bool {
	if IsRead(readable) {
		return true
	}
	if o.ReadOnly || o.Cache.WriteThrough() || len(readable) == 0 || len(readable[0]) < hdrSize {
		return false
	}
	if binary.LittleEndian.Uint32(readable[0][hdrType:]) != TypeOut {
		return false
	}
	qw, ok := d.(QuickWriter)
	if !ok {
		return false
	}
	n := int64(-hdrSize)
	for _, b := range readable {
		n += int64(len(b)) // a chain totals at most 2^32-1 bytes: no overflow
	}
	sector := binary.LittleEndian.Uint64(readable[0][hdrSector:])
	if n <= 0 || sector >= 1<<(63-sectorShift) { // off must fit an int64
		return false
	}
	return qw.QuickWrite(int64(sector)*SectorSize, n)
}

// QuickWrite asks the disk in service (DiskRef is a QuickWriter whatever
// it holds; one that is not answers false).
func (r *DiskRef) QuickWrite(off, n int64) bool {
	if q, ok := r.cur.Load().d.(QuickWriter); ok {
		return q.QuickWrite(off, n)
	}
	return false
}
