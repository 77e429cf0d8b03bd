package vhdx

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
	"unicode/utf16"

	"github.com/google/uuid"
)

// checker decides what a validation failure does. Open stops at the first
// one; Check (collect=true) records it and carries on where that is safe.
type checker struct {
	collect  bool
	problems []Problem
	unlisted int    // problems past maxProblems, counted only
	dirtyLog bool   // a read-only pass found an active log
	usedEnd  uint64 // end of the last used structure, for the leak check
}

// maxProblems bounds the problems Check lists: a crafted 512 MiB BAT can
// break a rule in each of its 64 Mi entries, and a message for each would
// take gigabytes. The rest are counted (listProblems).
const maxProblems = 1000

// soft records a problem that does not prevent opening (one header or one
// region table copy bad while the other is good).
func (c *checker) soft(err error) {
	if c == nil || !c.collect {
		return
	}
	if len(c.problems) >= maxProblems {
		c.unlisted++
		return
	}
	c.problems = append(c.problems, Problem{Offset: errorOffset(err), What: err.Error()})
}

// listProblems returns the problems found, with one more naming how many
// were not listed.
func (c *checker) listProblems() []Problem {
	if c.unlisted == 0 {
		return c.problems
	}
	return append(c.problems, Problem{Offset: -1,
		What: fmt.Sprintf("%d more problems not listed (the first %d are): %v", c.unlisted, maxProblems, ErrCorrupt)})
}

// hard returns err when opening; when checking it records err and returns
// nil so the caller can go on validating the remaining entries.
func (c *checker) hard(err error) error {
	if c != nil && c.collect {
		c.soft(err)
		return nil
	}
	return err
}

// layout is everything learned from the header section, the metadata region
// and the BAT geometry.
type layout struct {
	fileSize uint64
	creator  string

	hdr     header
	hdrSlot int // 0: the header at 64 KiB is current; 1: the one at 128 KiB

	regions []region // the region table in use (all entries)
	bat     region
	meta    region

	blockSize      uint32
	logicalSector  uint32
	physicalSector uint32
	size           uint64
	diskID         uuid.UUID
	leaveAllocated bool

	// Differencing images (§2.6.2.6): HasParent and the parsed locator,
	// with the metadata entry it came from (for rewrites).
	hasParent   bool
	locator     *parentLocator
	locatorItem metadataItem

	chunkRatio    uint64
	blockShift    uint8 // log2(blockSize)
	chunkShift    uint8 // log2(chunkRatio)
	payloadBlocks uint64
	batEntries    uint64 // entries kept in memory: last payload block's index + 1; differencing: through the last sector bitmap entry
	batOnDisk     uint64 // entries of batEntries the BAT region holds (fewer only for a differencing image's last bitmap entry)
}

func headerOffset(slot int) uint64 {
	if slot == 0 {
		return header1Offset
	}
	return header2Offset
}

func headerName(slot int) string { return fmt.Sprintf("header %d", slot+1) }

// readFileID checks the file type identifier (§2.2.1) and returns the
// creator string, which is diagnostic only.
func readFileID(s Storage) (string, error) {
	var b [fileIDCreatorOff + fileIDCreatorLen]byte
	n, err := s.ReadAt(b[:], fileIDOffset)
	if n < len(b) && err != nil && !errors.Is(err, io.EOF) {
		// A host I/O error says nothing about the file's type.
		return "", fmt.Errorf("read file identifier at offset 0x0: %w", err)
	}
	if n < len(fileIDSignature) || string(b[:len(fileIDSignature)]) != fileIDSignature {
		return "", fmt.Errorf("file identifier at offset 0x0: signature is not %q: %w", fileIDSignature, ErrNotVHDX)
	}
	if n < len(b) {
		return "", errAt(ErrCorrupt, 0, "file identifier", "file ends inside the 64 KiB identifier")
	}
	u := make([]uint16, 0, fileIDCreatorLen/2)
	for i := fileIDCreatorOff; i < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u)), nil
}

// readHeaders picks the current header (§2.2.2): the valid one with the
// higher SequenceNumber. Equal sequence numbers are accepted only when both
// headers are byte-identical, as Disk2VHD writes them (QEMU does the same).
func readHeaders(s Storage, c *checker) (header, int, error) {
	var bufs [2][headerSize]byte
	var valid [2]bool
	var reasons [2]string
	for slot := 0; slot < 2; slot++ {
		off := headerOffset(slot)
		b := bufs[slot][:]
		if err := readFull(s, b, off, headerName(slot)); err != nil {
			if errorOffset(err) < 0 { // an I/O error, not a short file
				return header{}, 0, err
			}
			reasons[slot] = "file ends inside the header"
			continue
		}
		if string(b[:4]) != hdrSignature {
			reasons[slot] = fmt.Sprintf("signature %q is not %q", b[:4], hdrSignature)
			continue
		}
		if got, want := storedChecksum(b, hdrOffChecksum), checksumWithFieldZeroed(b, hdrOffChecksum); got != want {
			reasons[slot] = fmt.Sprintf("checksum %#x does not match computed %#x", got, want)
			continue
		}
		valid[slot] = true
	}
	switch {
	case !valid[0] && !valid[1]:
		return header{}, 0, errAt(ErrCorrupt, header1Offset, "headers",
			"no valid header (header 1: %s; header 2 at offset %#x: %s)", reasons[0], header2Offset, reasons[1])
	case !valid[1]:
		c.soft(errAt(ErrCorrupt, header2Offset, "header 2", "%s (header 1 is used)", reasons[1]))
		return decodeHeader(bufs[0][:]), 0, nil
	case !valid[0]:
		c.soft(errAt(ErrCorrupt, header1Offset, "header 1", "%s (header 2 is used)", reasons[0]))
		return decodeHeader(bufs[1][:]), 1, nil
	}
	h1, h2 := decodeHeader(bufs[0][:]), decodeHeader(bufs[1][:])
	switch {
	case h1.seq > h2.seq:
		return h1, 0, nil
	case h2.seq > h1.seq:
		return h2, 1, nil
	case bytes.Equal(bufs[0][:], bufs[1][:]):
		return h1, 0, nil
	}
	return header{}, 0, errAt(ErrCorrupt, header1Offset, "headers",
		"header 1 and header 2 (offset %#x) have the same sequence number %d but different contents", header2Offset, h1.seq)
}

// validateHeader checks the fields of the current header (§2.2.2).
func validateHeader(h header, slot int, fileSize uint64) error {
	off, name := headerOffset(slot), headerName(slot)
	if h.version != 1 {
		return errAt(ErrUnsupported, off, name, "version %d is not 1", h.version)
	}
	if h.logVersion != 0 && h.logGUID != uuid.Nil {
		return errAt(ErrUnsupported, off, name, "log version %d is not 0 and the log GUID is set", h.logVersion)
	}
	if h.logLength%alignment != 0 || h.logLength < minLogLength {
		return errAt(ErrCorrupt, off, name, "log length %#x is not a non-zero multiple of 1 MiB", h.logLength)
	}
	if h.logOffset%alignment != 0 || h.logOffset < headerSectionSize {
		return errAt(ErrCorrupt, off, name, "log offset %#x is not a multiple of 1 MiB at or after 1 MiB", h.logOffset)
	}
	if h.logOffset > fileSize || uint64(h.logLength) > fileSize-h.logOffset {
		return errAt(ErrCorrupt, off, name, "log [%#x, +%#x) extends past the end of the file (size %#x)", h.logOffset, h.logLength, fileSize)
	}
	return nil
}

// parseRegionTable decodes and validates one 64 KiB region table copy
// (§2.2.3). Regions must be 1 MiB aligned, not overlap each other or the log,
// and include the BAT and metadata regions exactly once.
func parseRegionTable(b []byte, tableOff uint64, h header, fileSize uint64) (regions []region, bat, meta region, err error) {
	name := "region table"
	if tableOff == regionTable2Off {
		name = "region table 2"
	} else {
		name = "region table 1"
	}
	fail := func(sentinel error, off uint64, format string, args ...any) ([]region, region, region, error) {
		return nil, region{}, region{}, errAt(sentinel, off, name, format, args...)
	}
	if string(b[:4]) != rtSignature {
		return fail(ErrCorrupt, tableOff, "signature %q is not %q", b[:4], rtSignature)
	}
	if got, want := storedChecksum(b, rtOffChecksum), checksumWithFieldZeroed(b, rtOffChecksum); got != want {
		return fail(ErrCorrupt, tableOff, "checksum %#x does not match computed %#x", got, want)
	}
	count := binary.LittleEndian.Uint32(b[rtOffEntryCount:])
	if count > maxRegionEntries {
		return fail(ErrCorrupt, tableOff, "entry count %d exceeds %d", count, maxRegionEntries)
	}
	regions = make([]region, 0, count)
	var haveBAT, haveMeta bool
	for i := uint32(0); i < count; i++ {
		e := b[rtHeaderSize+i*rtEntrySize:]
		eoff := tableOff + rtHeaderSize + uint64(i)*rtEntrySize
		r := region{
			guid:     guidFromDisk(e[rteOffGUID:]),
			offset:   binary.LittleEndian.Uint64(e[rteOffFileOff:]),
			length:   binary.LittleEndian.Uint32(e[rteOffLength:]),
			required: binary.LittleEndian.Uint32(e[rteOffRequired:])&1 != 0,
		}
		ename := fmt.Sprintf("entry %d (%v)", i, r.guid)
		if r.offset < headerSectionSize || r.offset%alignment != 0 {
			return fail(ErrCorrupt, eoff, "%s: file offset %#x is not a multiple of 1 MiB at or after 1 MiB", ename, r.offset)
		}
		if r.length%alignment != 0 {
			return fail(ErrCorrupt, eoff, "%s: length %#x is not a multiple of 1 MiB", ename, r.length)
		}
		if r.offset > math.MaxUint64-uint64(r.length) {
			return fail(ErrCorrupt, eoff, "%s: offset %#x + length %#x overflows", ename, r.offset, r.length)
		}
		for _, prev := range regions {
			if prev.guid == r.guid {
				return fail(ErrCorrupt, eoff, "%s: GUID appears more than once", ename)
			}
		}
		switch r.guid {
		case RegionBAT:
			haveBAT, bat = true, r
		case RegionMetadata:
			haveMeta, meta = true, r
		default:
			if r.required {
				return fail(ErrUnsupported, eoff, "%s: unknown region is marked required", ename)
			}
		}
		regions = append(regions, r)
	}
	if !haveBAT {
		return fail(ErrCorrupt, tableOff, "no BAT region")
	}
	if !haveMeta {
		return fail(ErrCorrupt, tableOff, "no metadata region")
	}
	// §2.2.3.2: regions must not overlap each other or the log.
	spans := make([]region, 0, len(regions)+1)
	spans = append(spans, regions...)
	spans = append(spans, region{guid: uuid.Nil, offset: h.logOffset, length: h.logLength})
	slices.SortFunc(spans, func(a, b region) int { return cmp.Compare(a.offset, b.offset) })
	for i := 1; i < len(spans); i++ {
		if spans[i-1].end() > spans[i].offset {
			return fail(ErrCorrupt, tableOff, "%s [%#x, %#x) overlaps %s [%#x, %#x)",
				regionLabel(spans[i-1].guid), spans[i-1].offset, spans[i-1].end(),
				regionLabel(spans[i].guid), spans[i].offset, spans[i].end())
		}
	}
	if meta.length < metadataTableSize {
		return fail(ErrCorrupt, tableOff, "metadata region length %#x is smaller than its 64 KiB table", meta.length)
	}
	for _, r := range []region{bat, meta} {
		if r.end() > fileSize {
			return fail(ErrCorrupt, tableOff, "%s [%#x, %#x) extends past the end of the file (size %#x)",
				regionLabel(r.guid), r.offset, r.end(), fileSize)
		}
	}
	return regions, bat, meta, nil
}

func regionLabel(g uuid.UUID) string {
	switch g {
	case RegionBAT:
		return "BAT region"
	case RegionMetadata:
		return "metadata region"
	case uuid.Nil:
		return "log"
	}
	return "region " + g.String()
}

// readRegionTables uses region table 1, or table 2 when table 1 is corrupt.
func readRegionTables(s Storage, l *layout, c *checker) error {
	var firstErr error
	for _, off := range []uint64{regionTable1Off, regionTable2Off} {
		b := make([]byte, regionTableSize)
		err := readFull(s, b, off, "region table")
		if err == nil {
			l.regions, l.bat, l.meta, err = parseRegionTable(b, off, l.hdr, l.fileSize)
		}
		if err == nil {
			if firstErr != nil {
				c.soft(firstErr)
			}
			return nil
		}
		if firstErr == nil {
			firstErr = err
			if !isCorrupt(err) {
				// An unsupported feature is not damage: the other copy
				// would say the same thing.
				return err
			}
		}
	}
	return firstErr
}

// metadataItem is one metadata table entry (§2.6.1.2).
type metadataItem struct {
	id       uuid.UUID
	offset   uint32
	length   uint32
	user     bool
	required bool
	entryOff uint64
}

// readMetadata validates the metadata table (§2.6.1) and the known items
// (§2.6.2), filling the geometry in l.
func readMetadata(s Storage, l *layout) error {
	tableOff := l.meta.offset
	b := make([]byte, metadataTableSize)
	if err := readFull(s, b, tableOff, "metadata table"); err != nil {
		return err
	}
	if string(b[:8]) != mdSignature {
		return errAt(ErrCorrupt, tableOff, "metadata table", "signature %q is not %q", b[:8], mdSignature)
	}
	count := binary.LittleEndian.Uint16(b[mdOffEntryCount:])
	if count > maxMetadataEntries {
		return errAt(ErrCorrupt, tableOff, "metadata table", "entry count %d exceeds %d", count, maxMetadataEntries)
	}
	items := make([]metadataItem, 0, count)
	known := map[uuid.UUID]metadataItem{}
	users := 0
	for i := uint16(0); i < count; i++ {
		e := b[mdHeaderSize+int(i)*mdEntrySize:]
		flags := binary.LittleEndian.Uint32(e[mdeOffFlags:])
		it := metadataItem{
			id:       guidFromDisk(e[mdeOffItemID:]),
			offset:   binary.LittleEndian.Uint32(e[mdeOffOffset:]),
			length:   binary.LittleEndian.Uint32(e[mdeOffLength:]),
			user:     flags&mdFlagIsUser != 0,
			required: flags&mdFlagIsRequired != 0,
			entryOff: tableOff + mdHeaderSize + uint64(i)*mdEntrySize,
		}
		what := fmt.Sprintf("metadata entry %d (%v)", i, it.id)
		switch {
		case it.length == 0 && it.offset != 0:
			return errAt(ErrCorrupt, it.entryOff, what, "length is zero but offset is %#x", it.offset)
		case it.length != 0 && it.offset < mdItemMinOffset:
			return errAt(ErrCorrupt, it.entryOff, what, "offset %#x is below 64 KiB", it.offset)
		case it.length > maxMetadataItemLen:
			return errAt(ErrCorrupt, it.entryOff, what, "length %#x exceeds 1 MiB", it.length)
		case uint64(it.offset)+uint64(it.length) > uint64(l.meta.length):
			return errAt(ErrCorrupt, it.entryOff, what, "item [%#x, +%#x) extends past the metadata region (length %#x)",
				it.offset, it.length, l.meta.length)
		}
		for _, prev := range items {
			if prev.id == it.id && prev.user == it.user {
				return errAt(ErrCorrupt, it.entryOff, what, "item ID appears more than once")
			}
		}
		if it.user {
			users++
			if users > 1024 {
				return errAt(ErrCorrupt, it.entryOff, what, "more than 1024 user metadata items")
			}
		}
		if !it.user && isKnownMetadata(it.id) {
			known[it.id] = it
		} else if it.required {
			return errAt(ErrUnsupported, it.entryOff, what, "unknown metadata item is marked required")
		}
		items = append(items, it)
	}
	// §2.6.1.2: items must not overlap each other.
	sorted := slices.Clone(items)
	slices.SortFunc(sorted, func(a, b metadataItem) int { return int(int64(a.offset) - int64(b.offset)) })
	var prev *metadataItem
	for i := range sorted {
		it := &sorted[i]
		if it.length == 0 {
			continue
		}
		if prev != nil && uint64(prev.offset)+uint64(prev.length) > uint64(it.offset) {
			return errAt(ErrCorrupt, it.entryOff, "metadata table",
				"item %v [%#x, +%#x) overlaps item %v [%#x, +%#x)", it.id, it.offset, it.length, prev.id, prev.offset, prev.length)
		}
		prev = it
	}

	wantLen := []struct {
		id   uuid.UUID
		name string
		n    uint32
	}{
		{MetaFileParameters, "file parameters", 8},
		{MetaVirtualDiskSize, "virtual disk size", 8},
		{MetaVirtualDiskID, "virtual disk ID", 16},
		{MetaLogicalSectorSize, "logical sector size", 4},
		{MetaPhysicalSectorSize, "physical sector size", 4},
	}
	var vals [5][16]byte
	for i, w := range wantLen {
		it, ok := known[w.id]
		if !ok {
			return errAt(ErrCorrupt, tableOff, "metadata table", "required %s item is missing", w.name)
		}
		if it.length != w.n {
			return errAt(ErrCorrupt, it.entryOff, w.name+" metadata entry", "length %d is not %d", it.length, w.n)
		}
		if err := readFull(s, vals[i][:w.n], l.meta.offset+uint64(it.offset), w.name+" metadata item"); err != nil {
			return err
		}
	}
	le := binary.LittleEndian
	itemOff := func(id uuid.UUID) uint64 { return l.meta.offset + uint64(known[id].offset) }

	bs, fpFlags := le.Uint32(vals[0][0:]), le.Uint32(vals[0][4:])
	if fpFlags&fpFlagHasParent != 0 {
		// §2.6.2.6: a differencing image MUST have a parent locator.
		it, ok := known[MetaParentLocator]
		if !ok || it.length == 0 {
			return errAt(ErrCorrupt, itemOff(MetaFileParameters), "file parameters metadata item",
				"HasParent is set but there is no parent locator item")
		}
		b := make([]byte, it.length) // ≤ 1 MiB, checked above
		if err := readFull(s, b, l.meta.offset+uint64(it.offset), "parent locator metadata item"); err != nil {
			return err
		}
		pl, err := parseParentLocator(b, l.meta.offset+uint64(it.offset))
		if err != nil {
			return err
		}
		l.hasParent, l.locator, l.locatorItem = true, pl, it
	}
	if bs < minBlockSize || bs > maxBlockSize || bits.OnesCount32(bs) != 1 {
		return errAt(ErrCorrupt, itemOff(MetaFileParameters), "file parameters metadata item",
			"block size %#x is not a power of two in [1 MiB, 256 MiB]", bs)
	}
	l.blockSize, l.leaveAllocated = bs, fpFlags&fpFlagLeaveBlockAllocated != 0

	l.logicalSector = le.Uint32(vals[3][:])
	if l.logicalSector != 512 && l.logicalSector != 4096 {
		return errAt(ErrCorrupt, itemOff(MetaLogicalSectorSize), "logical sector size metadata item",
			"logical sector size %d is not 512 or 4096", l.logicalSector)
	}
	l.physicalSector = le.Uint32(vals[4][:])
	if l.physicalSector != 512 && l.physicalSector != 4096 {
		return errAt(ErrCorrupt, itemOff(MetaPhysicalSectorSize), "physical sector size metadata item",
			"physical sector size %d is not 512 or 4096", l.physicalSector)
	}
	l.size = le.Uint64(vals[1][:])
	if l.size == 0 || l.size%uint64(l.logicalSector) != 0 || l.size > maxVirtualDiskSize {
		return errAt(ErrCorrupt, itemOff(MetaVirtualDiskSize), "virtual disk size metadata item",
			"virtual disk size %d is not a non-zero multiple of the %d-byte logical sector at most 64 TiB",
			l.size, l.logicalSector)
	}
	l.diskID = guidFromDisk(vals[2][:])
	l.chunkRatio = chunkRatio(l.logicalSector, l.blockSize)
	l.blockShift = uint8(bits.TrailingZeros32(l.blockSize))
	l.chunkShift = uint8(bits.TrailingZeros64(l.chunkRatio))
	l.payloadBlocks = payloadBlocks(l.size, l.blockSize)
	l.batEntries = batIndex(l.payloadBlocks-1, l.chunkRatio) + 1
	l.batOnDisk = l.batEntries
	if l.hasParent {
		// §2.5: a differencing image's BAT reaches the sector bitmap entry
		// of the last chunk, (k+1)*(ChunkRatio+1)-1 for chunk k. The spec's
		// TotalBATEntries formula can fall short of it; a region that does
		// not hold it leaves that chunk without a bitmap (loadBAT).
		chunks := (l.payloadBlocks + l.chunkRatio - 1) / l.chunkRatio
		l.batEntries = chunks * (l.chunkRatio + 1)
		l.batOnDisk = min(l.batEntries, uint64(l.bat.length)/8)
	}
	return nil
}

func isKnownMetadata(id uuid.UUID) bool {
	switch id {
	case MetaFileParameters, MetaVirtualDiskSize, MetaVirtualDiskID,
		MetaLogicalSectorSize, MetaPhysicalSectorSize, MetaParentLocator:
		return true
	}
	return false
}
