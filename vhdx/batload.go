package vhdx

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"

	"golang.org/x/sys/unix"
)

// Loading the BAT of a huge image (a 64 TiB disk with 1 MiB blocks has a
// 512 MiB BAT) must cost O(BAT) time, nothing per entry on the heap, and
// memory no larger than the BAT itself:
//
//   - The table's stored pages (battable.go) are the only per-entry memory.
//     A page whose entries are all NOT_PRESENT, or all PAYLOAD_BLOCK_ZERO
//     (what qemu-img writes out for a new image), is not stored, so a fresh
//     image takes a few hundred KiB however large its BAT.
//   - The BAT is read in 1 MiB chunks into one reused buffer (which stays in
//     the CPU's cache) and validated there; pages that must be stored are
//     copied out of it. A chunk lying in a hole of a sparse file (SEEK_DATA,
//     dataSeeker) is not read at all: it reads as zeros.
//   - The overlap rule (§2.5.1: blocks overlap nothing) marks the file's
//     MiBs in a bitmap (one bit per MiB: 8 MiB for a 64 TiB file). Only a
//     file far larger than the blocks its BAT can reference (a sparse file
//     crafted to make that bitmap huge) falls back to sorting the indices
//     of the used entries, memory at most half the BAT.
//   - Messages are formatted only for a broken rule.

// batReadChunk is how much of the BAT one read fetches.
const batReadChunk = 1 * mib

// batInPlace: copy a stored page in one memmove where pageBytes allows.
// Tests turn it off to compare with decoding entry by entry, the path of
// big-endian hosts.
var batInPlace = true

// dataSeeker is implemented by storages that know where a sparse file holds
// data. nextData returns the offset of the first byte at or after off that
// may hold data (off itself when unknown); everything in between reads as
// zeros. The overlay of an in-memory log replay (overlay.go) must not
// implement it: replayed BAT sectors may lie in a hole of the file below.
type dataSeeker interface {
	nextData(off int64) (int64, error)
}

// nextData asks the file system (lseek SEEK_DATA). Only a query: no I/O
// uses the file position (every read and write is pread/pwrite).
func (s osStorage) nextData(off int64) (int64, error) {
	for {
		n, err := unix.Seek(int(s.f.Fd()), off, unix.SEEK_DATA)
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ENXIO):
			return math.MaxInt64, nil // no data at or after off
		}
		return off, nil // not supported here: read it
	}
}

// nextData forwards to the wrapped storage (reads are not latched).
func (s *syncLatch) nextData(off int64) (int64, error) {
	if d, ok := s.Storage.(dataSeeker); ok {
		return d.nextData(off)
	}
	return off, nil
}

// batResult is what loadBAT learned beyond the entries themselves.
type batResult struct {
	entries   *batTable
	usedEnd   uint64 // end of the last used structure
	allocated uint64 // number of FULLY_PRESENT and PARTIALLY_PRESENT payload blocks
}

func batEntryName(i uint64) string { return fmt.Sprintf("BAT entry %d", i) }

// batLoader carries the state of one pass over the BAT.
type batLoader struct {
	l   *layout
	c   *checker
	res *batResult
	bs  uint64 // payload block size

	stride       uint64 // chunk ratio + 1: distance between sector bitmap entries
	nextBitmap   uint64 // index of the next sector bitmap entry
	chunkPartial bool   // the current chunk has a PARTIALLY_PRESENT block
	retainedEnd  uint64 // end of the blocks UNDEFINED/UNMAPPED entries still point to

	used fileUse
}

// refuse reports a broken rule of entry i; when checking (c.hard returns
// nil) the entry is kept as NOT_PRESENT so nothing uses what it points to.
func (ld *batLoader) refuse(i uint64, err error) error {
	if err := ld.c.hard(err); err != nil {
		return err
	}
	ld.res.entries.store(i, 0)
	return nil
}

// zeroEntries reports whether b (a multiple of 8 bytes) holds only zeros.
func zeroEntries(b []byte) bool {
	for j := 0; j+8 <= len(b); j += 8 {
		if binary.LittleEndian.Uint64(b[j:]) != 0 {
			return false
		}
	}
	return true
}

// loadBAT reads and validates the BAT (§2.5). The entries array is allocated
// only after checking that the BAT region holds the required entries and
// lies inside the file, so its size is bounded by the file size.
//
// In a differencing image sector bitmap entries may be SB_BLOCK_PRESENT
// (§2.5.1.2) and payload entries PARTIALLY_PRESENT (§2.5.1.1); both point
// to blocks (1 MiB for a bitmap) that must lie in the file and overlap
// nothing, and a chunk with a PARTIALLY_PRESENT block must have its bitmap.
func loadBAT(s Storage, l *layout, c *checker) (*batResult, error) {
	need := l.batEntries
	if l.hasParent {
		need = batIndex(l.payloadBlocks-1, l.chunkRatio) + 1
	}
	if need > uint64(l.bat.length)/8 {
		return nil, errAt(ErrCorrupt, l.bat.offset, "BAT region",
			"length %#x holds %d entries but the %d-byte disk with %d-byte blocks needs %d",
			l.bat.length, l.bat.length/8, l.size, l.blockSize, need)
	}
	n := l.batOnDisk
	ld := &batLoader{
		l: l, c: c, bs: uint64(l.blockSize),
		res:        &batResult{entries: newBATTable(l.batEntries, l.chunkRatio)},
		stride:     l.chunkRatio + 1,
		nextBitmap: l.chunkRatio,
	}
	ld.used = newFileUse(l)

	seeker, _ := s.(dataSeeker)
	buf := make([]byte, min(n*8, batReadChunk))
	// base stays a multiple of batPageEntries: chunks are whole pages but
	// for the last, and a hole is skipped in whole pages.
	for base := uint64(0); base < n; {
		cnt := min(batReadChunk/8, n-base)
		off := l.bat.offset + base*8
		if seeker != nil {
			next, err := seeker.nextData(int64(off))
			if err != nil {
				return nil, fmt.Errorf("BAT at offset %#x: %w", off, err)
			}
			if uint64(next) > off { // a hole: entries that read as zero
				z := min((uint64(next)-off)/8, n-base)
				if z < n-base {
					z -= z % batPageEntries
				}
				if z > 0 {
					if err := ld.zeros(base, z); err != nil {
						return nil, err
					}
					base += z
					continue
				}
			}
		}
		chunk := buf[:cnt*8]
		if err := readFull(s, chunk, off, "BAT"); err != nil {
			return nil, err
		}
		if zeroEntries(chunk) { // the pages' implicit state already
			if err := ld.zeros(base, cnt); err != nil {
				return nil, err
			}
			base += cnt
			continue
		}
		for k := uint64(0); k < cnt; k += batPageEntries {
			ld.res.entries.setPage((base+k)/batPageEntries, chunk[k*8:min(k+batPageEntries, cnt)*8], batInPlace)
		}
		// Validated after the pages are set: a refused entry is then
		// stored as NOT_PRESENT over what was copied.
		if err := ld.chunk(chunk, base); err != nil {
			return nil, err
		}
		base += cnt
	}
	if n < l.batEntries {
		// Entries past the BAT region (a differencing image's last bitmap
		// entry) are NOT_PRESENT.
		if err := ld.zeros(n, l.batEntries-n); err != nil {
			return nil, err
		}
	}
	if ld.chunkPartial {
		// The last chunk's bitmap entry lies past the BAT region.
		i := l.batEntries - 1
		if err := c.hard(errAt(ErrCorrupt, l.bat.offset+i*8, batEntryName(i),
			"the last chunk has a PARTIALLY_PRESENT block but its sector bitmap entry lies past the BAT region (length %#x)", l.bat.length)); err != nil {
			return nil, err
		}
	}
	if err := ld.used.finish(ld); err != nil {
		return nil, err
	}
	ld.res.usedEnd = max(ld.used.end, ld.retainedEnd)
	return ld.res, nil
}

// zeros accounts for entries [base, base+cnt), all zero: NOT_PRESENT is
// valid for every payload and sector bitmap entry, so only a chunk with a
// PARTIALLY_PRESENT block whose bitmap entry is among them breaks a rule.
func (ld *batLoader) zeros(base, cnt uint64) error {
	end := base + cnt
	if ld.nextBitmap >= end {
		return nil
	}
	i := ld.nextBitmap
	ld.nextBitmap += (end - i + ld.stride - 1) / ld.stride * ld.stride
	if ld.chunkPartial {
		ld.chunkPartial = false
		return ld.c.hard(errAt(ErrCorrupt, ld.l.bat.offset+i*8, batEntryName(i),
			"sector bitmap entry is NOT_PRESENT but its chunk has a PARTIALLY_PRESENT block (§2.5.1.2)"))
	}
	return nil
}

// chunk validates the entries in b, the first being entry base. The
// inner loop runs over the payload entries between two sector bitmap
// entries and handles the two states that need no check (NOT_PRESENT and
// ZERO, §2.5.1.1: no block, FileOffsetMB reserved) without a call: a fresh
// qemu-img image has every entry in state ZERO. The entries are in the
// table already (setPage); only a refused one is stored again.
func (ld *batLoader) chunk(b []byte, base uint64) error {
	le := binary.LittleEndian
	for j := uint64(0); j+8 <= uint64(len(b)); {
		i := base + j/8
		if i == ld.nextBitmap {
			ld.nextBitmap += ld.stride
			if err := ld.bitmapEntry(i, le.Uint64(b[j:])); err != nil {
				return err
			}
			j += 8
			continue
		}
		stop := min(uint64(len(b)), j+(ld.nextBitmap-i)*8) // ld.nextBitmap-i < stride
		for j+8 <= stop {
			end := j + 8
			if j+64 <= stop {
				// 8 entries that are all NOT_PRESENT or ZERO (states 0 and
				// 2, the only ones with bits 0 and 2 clear) pass with one
				// test.
				g := b[j : j+64]
				or := le.Uint64(g[0:]) | le.Uint64(g[8:]) | le.Uint64(g[16:]) | le.Uint64(g[24:]) |
					le.Uint64(g[32:]) | le.Uint64(g[40:]) | le.Uint64(g[48:]) | le.Uint64(g[56:])
				if or&5 == 0 {
					j += 64
					continue
				}
				end = j + 64
			}
			for ; j < end; j += 8 {
				e := le.Uint64(b[j:])
				if st := batState(e); st == stateNotPresent || st == stateZero {
					continue
				}
				if err := ld.payloadEntry(base+j/8, e); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// checkBlock validates the offset of a block of size sz pointed to by entry
// e; it returns the rule broken, or "".
func (ld *batLoader) checkBlock(e, sz uint64) string {
	off, fileSize := batFileOffset(e), ld.l.fileSize
	switch {
	case e&batReservedMask != 0:
		return fmt.Sprintf("reserved bits %#x are set", e&batReservedMask)
	case off < headerSectionSize:
		return fmt.Sprintf("block offset %#x lies in the header section", off)
	case off > fileSize || sz > fileSize-off:
		return fmt.Sprintf("block [%#x, %#x) extends past the end of the file (size %#x)", off, off+sz, fileSize)
	}
	return ""
}

func (ld *batLoader) bitmapEntry(i, e uint64) error {
	l := ld.l
	eoff := l.bat.offset + i*8
	st := batState(e)
	partial := ld.chunkPartial
	ld.chunkPartial = false
	if !l.hasParent {
		// §2.5.1.2: fixed and dynamic images have no sector bitmaps.
		if st != sbNotPresent {
			if err := ld.c.hard(errAt(ErrCorrupt, eoff, batEntryName(i),
				"sector bitmap entry has state %d; only NOT_PRESENT is valid without a parent", st)); err != nil {
				return err
			}
		}
		// The entry is kept as it is, so a journaled BAT sector writes it
		// back unchanged.
		return nil
	}
	var rule string
	switch st {
	case sbNotPresent:
		if partial {
			rule = "sector bitmap entry is NOT_PRESENT but its chunk has a PARTIALLY_PRESENT block (§2.5.1.2)"
		}
	case stateFullyPresent: // SB_BLOCK_PRESENT
		rule = ld.checkBlock(e, 1*mib)
	default:
		rule = fmt.Sprintf("sector bitmap entry state %d is reserved", st)
	}
	if rule != "" {
		return ld.refuse(i, errAt(ErrCorrupt, eoff, batEntryName(i), "%s", rule))
	}
	if st == stateFullyPresent {
		return ld.used.add(ld, i, batFileOffset(e), 1*mib, true)
	}
	return nil
}

func (ld *batLoader) payloadEntry(i, e uint64) error {
	l := ld.l
	eoff := l.bat.offset + i*8
	switch batState(e) {
	case stateUndefined, stateUnmapped, stateUnmappedV095:
		// §2.5.1.1: these may keep FileOffsetMB, which then still owns its
		// block (§2.5.1: a nonzero offset is unique). Its space is not
		// leaked; keep it out of the leak truncation.
		if off := batFileOffset(e); off >= headerSectionSize && off < l.fileSize {
			ld.retainedEnd = max(ld.retainedEnd, min(off+ld.bs, l.fileSize))
		}
		return nil
	case stateNotPresent, stateZero:
		return nil
	case stateReserved4:
		return ld.refuse(i, errAt(ErrCorrupt, eoff, batEntryName(i), "state 4 is reserved"))
	case statePartiallyPresent:
		if !l.hasParent {
			return ld.refuse(i, errAt(ErrCorrupt, eoff, batEntryName(i),
				"PARTIALLY_PRESENT is valid only in a differencing image"))
		}
		ld.chunkPartial = true
	}
	// FULLY_PRESENT, or PARTIALLY_PRESENT in a differencing image.
	if rule := ld.checkBlock(e, ld.bs); rule != "" {
		return ld.refuse(i, errAt(ErrCorrupt, eoff, batEntryName(i), "%s", rule))
	}
	ld.res.allocated++
	return ld.used.add(ld, i, batFileOffset(e), ld.bs, false)
}

// blockOf returns the block entry i (as stored) points to, if it owns one.
func (ld *batLoader) blockOf(i uint64) (off, size uint64, bitmap, ok bool) {
	e := ld.res.entries.load(i)
	st := batState(e)
	if isBitmapIndex(i, ld.l.chunkRatio) {
		return batFileOffset(e), 1 * mib, true, ld.l.hasParent && st == stateFullyPresent
	}
	switch st {
	case stateFullyPresent, statePartiallyPresent:
		return batFileOffset(e), ld.bs, false, true
	}
	return 0, 0, false, false
}

func blockKind(bitmap bool) string {
	if bitmap {
		return "sector bitmap block"
	}
	return "block"
}

// fixedSpan is a structure outside the BAT's blocks (§2.5.1: blocks overlap
// none of them).
type fixedSpan struct {
	start, end uint64
	what       string
}

// fileUse finds blocks that overlap each other or a fixed structure.
type fileUse struct {
	fixed []fixedSpan
	end   uint64 // end of the last used structure so far

	bits []uint64 // one bit per MiB of the file; nil in the fallback
	idx  []uint32 // fallback: entries owning a block, sorted at finish

	named int // overlaps named by a rescan so far (bounded, see overlap)
}

// maxNamedOverlaps bounds the rescans that name the other block of an
// overlap: each is O(BAT), and a crafted BAT can overlap everywhere.
const maxNamedOverlaps = 16

func newFileUse(l *layout) fileUse {
	u := fileUse{fixed: []fixedSpan{{0, headerSectionSize, "header section"},
		{l.hdr.logOffset, l.hdr.logOffset + uint64(l.hdr.logLength), "log"}}}
	for _, r := range l.regions {
		u.fixed = append(u.fixed, fixedSpan{r.offset, r.end(), regionLabel(r.guid)})
	}
	for _, f := range u.fixed {
		u.end = max(u.end, f.end)
	}
	// Blocks lie inside the file (checkBlock), so the bitmap covers the
	// file. Use it while it is no larger than the BAT (plus 1 MiB): a file
	// more than 64 times the size of what its BAT can map is crafted.
	mibs := (l.fileSize + mib - 1) / mib
	words := (mibs + 63) / 64
	if words*8 <= l.batEntries*8+1*mib {
		u.bits = make([]uint64, words)
		for _, f := range u.fixed {
			for m := f.start / mib; m < min(f.end/mib, mibs); m++ {
				u.bits[m/64] |= 1 << (m % 64)
			}
		}
	}
	return u
}

// add records the block [off, off+size) of entry i (both multiples of
// 1 MiB, inside the file) and reports an overlap with what is already used.
func (u *fileUse) add(ld *batLoader, i, off, size uint64, bitmap bool) error {
	u.end = max(u.end, off+size)
	if u.bits == nil {
		u.idx = append(u.idx, uint32(i))
		return nil
	}
	clash := false
	for m := off / mib; m < (off+size)/mib; m++ {
		w, bit := m/64, uint64(1)<<(m%64)
		clash = clash || u.bits[w]&bit != 0
		u.bits[w] |= bit
	}
	if !clash {
		return nil
	}
	return u.overlap(ld, i, off, size, bitmap)
}

// overlap reports that the block of entry i overlaps an earlier one or a
// fixed structure, naming which.
func (u *fileUse) overlap(ld *batLoader, i, off, size uint64, bitmap bool) error {
	end := off + size
	other := "another block"
	var oStart, oEnd uint64
	found := false
	for _, f := range u.fixed {
		if f.start < end && off < f.end {
			other, oStart, oEnd, found = f.what, f.start, f.end, true
			break
		}
	}
	if !found && u.named < maxNamedOverlaps {
		u.named++
		for j := uint64(0); j < i; j++ {
			if jo, js, jb, ok := ld.blockOf(j); ok && jo < end && off < jo+js {
				other, oStart, oEnd, found = spanLabel(j, jb), jo, jo+js, true
				break
			}
		}
	}
	msg := fmt.Sprintf("%s [%#x, %#x) overlaps %s", blockKind(bitmap), off, end, other)
	if found {
		msg += fmt.Sprintf(" [%#x, %#x)", oStart, oEnd)
	}
	return ld.c.hard(errAt(ErrCorrupt, ld.l.bat.offset+i*8, batEntryName(i), "%s", msg))
}

func spanLabel(i uint64, bitmap bool) string {
	if bitmap {
		return fmt.Sprintf("sector bitmap block of BAT entry %d", i)
	}
	return fmt.Sprintf("payload block of BAT entry %d", i)
}

// finish runs the fallback: the used entries sorted by block offset, swept
// once against the block reaching furthest and against the fixed spans.
func (u *fileUse) finish(ld *batLoader) error {
	if u.bits != nil || len(u.idx) == 0 {
		return nil
	}
	offOf := func(i uint32) uint64 { return batFileOffset(ld.res.entries.load(uint64(i))) }
	slices.SortFunc(u.idx, func(a, b uint32) int {
		return cmp.Or(cmp.Compare(offOf(a), offOf(b)), cmp.Compare(a, b))
	})
	var reach uint64
	var reachIdx uint32
	for k, i := range u.idx {
		off, size, bitmap, _ := ld.blockOf(uint64(i))
		end := off + size
		var err error
		for _, f := range u.fixed {
			if f.start < end && off < f.end {
				err = ld.c.hard(errAt(ErrCorrupt, ld.l.bat.offset+uint64(i)*8, batEntryName(uint64(i)),
					"%s [%#x, %#x) overlaps %s [%#x, %#x)", blockKind(bitmap), off, end, f.what, f.start, f.end))
				break
			}
		}
		if err == nil && k > 0 && off < reach {
			ro, rs, rb, _ := ld.blockOf(uint64(reachIdx))
			err = ld.c.hard(errAt(ErrCorrupt, ld.l.bat.offset+uint64(i)*8, batEntryName(uint64(i)),
				"%s [%#x, %#x) overlaps %s [%#x, %#x)", blockKind(bitmap), off, end, spanLabel(uint64(reachIdx), rb), ro, ro+rs))
		}
		if err != nil {
			return err
		}
		if end > reach {
			reach, reachIdx = end, i
		}
	}
	u.idx = nil
	return nil
}
