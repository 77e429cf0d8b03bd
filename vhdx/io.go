package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const batSectorSize = 4 * kib // the log journals whole 4 KiB sectors (§2.3.1)

// checkRange validates an I/O request: sector-aligned offset and length, and
// [off, off+n) inside the virtual disk without overflowing.
func (im *Image) checkRange(op string, off int64, n uint64) error {
	if im.closed.Load() {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	lss := uint64(im.l.logicalSector)
	if off < 0 {
		return fmt.Errorf("%s at offset %d: negative offset: %w", op, off, ErrOutOfRange)
	}
	if uint64(off)%lss != 0 || n%lss != 0 {
		return fmt.Errorf("%s of %d bytes at offset %#x: not a multiple of the %d-byte sector: %w", op, n, off, lss, ErrUnaligned)
	}
	if uint64(off) > im.l.size || n > im.l.size-uint64(off) {
		return fmt.Errorf("%s of %d bytes at offset %#x: disk size is %#x: %w", op, n, off, im.l.size, ErrOutOfRange)
	}
	return nil
}

// locate returns the BAT entry index for virtual offset pos, the entry, the
// offset within the block and the bytes left in the block.
// BlockSize and the chunk ratio are powers of two (§2.6.2.1, §2.4), so
// this is shifts and masks: it runs once per layer of a chain per request.
func (im *Image) locate(pos uint64) (idx, entry, in, left uint64) {
	bs := uint64(im.l.blockSize)
	b := pos >> im.l.blockShift
	idx = b + b>>im.l.chunkShift
	in = pos & (bs - 1)
	return idx, im.bat.load(idx), in, bs - in
}

// readPayload reads from an allocated block, turning a short read into an
// error that names the block.
func (im *Image) readPayload(p []byte, fileOff uint64) error {
	if one := [1][]byte{p}; im.readFromView(one[:], fileOff, fileOff+uint64(len(p))) { // fileview.go
		return nil
	}
	n, err := im.s.ReadAt(p, int64(fileOff))
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return errAt(ErrCorrupt, fileOff, "payload block data", "file ends after %d of %d bytes", n, len(p))
	}
	return fmt.Errorf("read payload at offset %#x: %w", fileOff, err)
}

// writePayload writes guest data in place, into a block the guest may
// already read back: a sync failing before the next one succeeds may lose
// it (markDirty, recover.go).
func (im *Image) writePayload(p []byte, fileOff uint64) error {
	if err := im.writeFreshPayload(p, fileOff); err != nil {
		return err
	}
	im.markDirty()
	return nil
}

// writeFreshPayload writes guest data into a block not yet published in the
// BAT: the journal commit that publishes it syncs it first.
func (im *Image) writeFreshPayload(p []byte, fileOff uint64) error {
	if _, err := im.s.WriteAt(p, int64(fileOff)); err != nil {
		return fmt.Errorf("write payload at offset %#x: %w", fileOff, noSpace(err))
	}
	return nil
}

// ReadAt reads len(p) bytes at virtual offset off; both must be multiples of
// the logical sector size. Blocks in any state but FULLY_PRESENT read as
// zeros (§2.5.1.1: NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED and the v0.95
// UNMAPPED value 5). No lock is taken.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.checkRange("read", off, uint64(len(p))); err != nil {
		return 0, err
	}
	defer im.ep.exit(im.ep.enter()) // epoch.go: no reuse of what we may load
	if im.parent != nil {
		if err := im.readChain(p, uint64(off)); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	done := 0
	for done < len(p) {
		_, e, in, left := im.locate(uint64(off) + uint64(done))
		n := int(min(uint64(len(p)-done), left))
		chunk := p[done : done+n]
		if batState(e) == stateFullyPresent {
			if im.hookLoaded != nil {
				im.hookLoaded(e)
			}
			if err := im.readPayload(chunk, batFileOffset(e)+in); err != nil {
				return done, err
			}
		} else {
			clear(chunk)
		}
		done += n
	}
	return done, nil
}

// WriteAt writes p at virtual offset off (sector aligned). Writes to
// allocated blocks go straight to the file without a lock; the first write
// to an unallocated block allocates it (see allocate).
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, fmt.Errorf("write: %w", ErrReadOnly)
	}
	if err := im.checkRange("write", off, uint64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil // nothing to write: no session, no header update
	}
	if err := im.beginDataSession(); err != nil {
		return 0, err
	}
	defer im.ep.exit(im.ep.enter())
	done := 0
	for done < len(p) {
		pos := uint64(off) + uint64(done)
		idx, e, in, left := im.locate(pos)
		n := int(min(uint64(len(p)-done), left))
		if err := im.writeChunk(p[done:done+n], pos, idx, e, in); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// writeChunk writes p, which lies inside one block, at virtual offset pos
// (BAT entry idx, read as e; offset in within the block).
func (im *Image) writeChunk(p []byte, pos, idx, e, in uint64) error {
	switch batState(e) {
	case stateFullyPresent:
		if im.hookLoaded != nil {
			im.hookLoaded(e)
		}
		return im.writePayload(p, batFileOffset(e)+in)
	case statePartiallyPresent:
		// Sectors this file already holds are overwritten in place
		// without a lock, like a FULLY_PRESENT block.
		if ok, err := im.allPresent(pos, uint64(len(p))); err != nil {
			return err
		} else if ok {
			return im.writePayload(p, batFileOffset(e)+in)
		}
	}
	if im.l.hasParent {
		off, inPlace, err := im.writeDiff(p, pos, idx, in)
		if err != nil || !inPlace {
			return err
		}
		// Present meanwhile (another writer's batch): in place, no lock.
		return im.writePayload(p, off)
	}
	return im.allocate(p, idx, in)
}

// maxFileOffset keeps file offsets representable as int64 and in the 44-bit
// FileOffsetMB field (§2.5.1).
const maxFileOffset = 1 << 62

// batSectorUpdate builds the journal update of the 4 KiB BAT sector holding
// entry idx, with the entries in set ({index, value} pairs) changed. The
// sector is read from disk first so that entries beyond the ones kept in
// memory are preserved; entries held in memory are then written from
// memory, which is authoritative. Caller holds im.mu.
func (im *Image) batSectorUpdate(idx uint64, set [][2]uint64) (logUpdate, error) {
	const perSector = batSectorSize / 8
	sec := idx / perSector
	u, err := im.batSectorImage(sec, true)
	if err != nil {
		return logUpdate{}, err
	}
	first := sec * perSector
	for _, kv := range set {
		if j := kv[0]; j >= first && j-first < perSector && j < im.l.batOnDisk {
			binary.LittleEndian.PutUint64(u.data[(j-first)*8:], kv[1])
		}
	}
	return u, nil
}

// batSectorImage builds the journal update rewriting BAT sector sec with
// the entries held in memory, which are authoritative. The sector is read
// from disk first when it reaches past those entries, so the rest is
// preserved, or always when readAlways is set. Caller holds im.mu.
func (im *Image) batSectorImage(sec uint64, readAlways bool) (logUpdate, error) {
	const perSector = batSectorSize / 8
	first := sec * perSector
	secOff := im.l.bat.offset + first*8
	buf := make([]byte, batSectorSize)
	if readAlways || first+perSector > im.l.batOnDisk {
		if err := readFull(im.s, buf, secOff, "BAT sector"); err != nil {
			return logUpdate{}, err
		}
	}
	for j := uint64(0); j < perSector && first+j < im.l.batOnDisk; j++ {
		binary.LittleEndian.PutUint64(buf[j*8:], im.bat.load(first+j))
	}
	return logUpdate{offset: secOff, data: buf}, nil
}

// sectorSized reports whether every buffer is a whole number of sectors.
func sectorSized(bufs [][]byte, lss uint64) bool {
	for _, b := range bufs {
		if uint64(len(b))%lss != 0 {
			return false
		}
	}
	return true
}

// vecLen sums the buffer lengths.
func vecLen(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

// ReadVec reads into bufs (scatter) starting at virtual offset off. Only the
// total length needs to be sector aligned. Each (buffer ∩ block) piece is
// one pread, or a clear for unallocated blocks; on a file (vector.go)
// pieces back to back in the file share one preadv.
func (im *Image) ReadVec(bufs [][]byte, off int64) error {
	if err := im.checkRange("read", off, vecLen(bufs)); err != nil {
		return err
	}
	defer im.ep.exit(im.ep.enter())
	pos := uint64(off)
	if im.parent == nil {
		if vs := vectorOf(im.s); vs != nil {
			return im.readVecv(vs, bufs, pos, readAny) // vector.go: one preadv per run
		}
	}
	for _, buf := range bufs {
		if err := im.readLayer(buf, pos); err != nil { // chain.go
			return err
		}
		pos += uint64(len(buf))
	}
	return nil
}

// WriteVec writes bufs (gather) starting at virtual offset off. Each
// (buffer ∩ block) piece is one pwrite (on a file, pieces back to back in
// allocated blocks share one pwritev, vector.go); the first piece landing
// in an unallocated block allocates it and later pieces find it allocated.
func (im *Image) WriteVec(bufs [][]byte, off int64) error {
	if im.readOnly {
		return fmt.Errorf("write: %w", ErrReadOnly)
	}
	if err := im.checkRange("write", off, vecLen(bufs)); err != nil {
		return err
	}
	if vecLen(bufs) == 0 {
		return nil // nothing to write: no session, no header update
	}
	if im.l.hasParent && (!sectorSized(bufs, uint64(im.l.logicalSector)) ||
		len(bufs) > 1 && !im.holdsAll(uint64(off), vecLen(bufs))) {
		// A sector split across buffers would get its bitmap bit set
		// with half its data written; gather it first (rare: guests send
		// sector-sized segments). A first write into a child is gathered
		// too: it then joins a batch once per block, not once per
		// segment, each waiting for its own batch, and a write covering a
		// block is seen whole (FULLY_PRESENT, no bitmap; diffgroup.go).
		// The copy costs far less than the batch's syncs.
		flat := make([]byte, 0, vecLen(bufs))
		for _, b := range bufs {
			flat = append(flat, b...)
		}
		_, err := im.WriteAt(flat, off)
		return err
	}
	if err := im.beginDataSession(); err != nil {
		return err
	}
	defer im.ep.exit(im.ep.enter())
	pos := uint64(off)
	if vs := vectorOf(im.s); vs != nil {
		return im.writeVecv(vs, bufs, pos) // vector.go: one pwritev per run
	}
	for _, buf := range bufs {
		for len(buf) > 0 {
			idx, e, in, left := im.locate(pos)
			n := min(uint64(len(buf)), left)
			if err := im.writeChunk(buf[:n], pos, idx, e, in); err != nil {
				return err
			}
			buf = buf[n:]
			pos += n
		}
	}
	return nil
}
