package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// memDisk is an in-memory Disk. It checks the handler's promise that every
// offset and length it passes on is in range and sector-aligned.
type memDisk struct {
	data              []byte
	logical, physical uint32
	flushes           int
	violations        int   // accesses the handler should have refused
	ioErr             error // returned by ReadVec/WriteVec/Flush when set
}

func newMemDisk(size int, logical uint32) *memDisk {
	d := &memDisk{data: make([]byte, size), logical: logical, physical: 4096}
	for i := range d.data {
		d.data[i] = byte(i*7 + i>>9)
	}
	return d
}

func (d *memDisk) check(n int, off int64) error {
	if n == 0 || off < 0 || off%int64(d.logical) != 0 || n%int(d.logical) != 0 || off > int64(len(d.data)) || int64(n) > int64(len(d.data))-off {
		d.violations++
		return fmt.Errorf("memDisk: bad access %d bytes at %d", n, off)
	}
	return nil
}

func vecLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

func (d *memDisk) ReadVec(bufs [][]byte, off int64) error {
	if d.ioErr != nil {
		return d.ioErr
	}
	if err := d.check(vecLen(bufs), off); err != nil {
		return err
	}
	for _, b := range bufs {
		off += int64(copy(b, d.data[off:]))
	}
	return nil
}

func (d *memDisk) WriteVec(bufs [][]byte, off int64) error {
	if d.ioErr != nil {
		return d.ioErr
	}
	if err := d.check(vecLen(bufs), off); err != nil {
		return err
	}
	for _, b := range bufs {
		off += int64(copy(d.data[off:], b))
	}
	return nil
}

func (d *memDisk) Flush() error {
	d.flushes++
	return d.ioErr
}

func (d *memDisk) Size() int64                { return int64(len(d.data)) }
func (d *memDisk) LogicalSectorSize() uint32  { return d.logical }
func (d *memDisk) PhysicalSectorSize() uint32 { return d.physical }

// trimDisk adds the optional Discard and WriteZeroes upgrades.
type trimDisk struct {
	*memDisk
	calls []string
}

func (d *trimDisk) Discard(off, n int64) error {
	if err := d.check(int(n), off); err != nil {
		return err
	}
	d.calls = append(d.calls, fmt.Sprintf("discard %d+%d", off, n))
	return nil
}

func (d *trimDisk) WriteZeroes(off, n int64, unmap bool) error {
	if err := d.check(int(n), off); err != nil {
		return err
	}
	clear(d.data[off : off+n])
	d.calls = append(d.calls, fmt.Sprintf("zeroes %d+%d unmap=%v", off, n, unmap))
	return nil
}

var errDisk = errors.New("memDisk: injected I/O error")

// hdr builds a virtio_blk_outhdr.
func hdr(typ uint32, sector uint64) []byte {
	b := make([]byte, hdrSize)
	binary.LittleEndian.PutUint32(b[hdrType:], typ)
	binary.LittleEndian.PutUint64(b[hdrSector:], sector)
	return b
}

// seg builds a virtio_blk_discard_write_zeroes segment.
func seg(sector uint64, n, flags uint32) []byte {
	b := make([]byte, segSize)
	binary.LittleEndian.PutUint64(b[segSector:], sector)
	binary.LittleEndian.PutUint32(b[segNumSectors:], n)
	binary.LittleEndian.PutUint32(b[segFlags:], flags)
	return b
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// split cuts b at the given offsets into separate buffers.
func split(b []byte, at ...int) [][]byte {
	var out [][]byte
	prev := 0
	for _, a := range at {
		out = append(out, b[prev:a])
		prev = a
	}
	return append(out, b[prev:])
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}
