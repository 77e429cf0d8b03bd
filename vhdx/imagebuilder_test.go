package vhdx

// A structure-aware image builder for fuzzing. The fuzz input is not a file
// but a compact description of one, decoded field by field (specReader):
// geometry, which header copy is current, region table entries, metadata
// items (unknown and required ones, a parent locator), BAT entries with
// their states and offsets, sector bitmaps, log entries with descriptors and
// data sectors, and the file size. buildImage writes that image into a
// sparse in-memory Storage (pageStorage), so one exec costs a few page
// writes instead of decompressing and copying megabytes.
//
// Every knob's zero value means "as the spec says": an input of all zeros
// (or an empty one) describes a valid image, and the mutator reaches broken
// structures by flipping the knobs. The builder records whether it broke
// something on purpose (builtImage.broken), so the fuzz target can also
// require that an image built without a deliberate flaw opens.
//
// The builder encodes every structure itself from MS-VHDX (section numbers
// at each one) rather than through the package's encoders, except the GUID
// byte order and CRC-32C helpers, so a misreading in the writer side of the
// package is not silently shared.

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sync"
	"unicode/utf16"

	"github.com/google/uuid"
)

// pageStorage is a sparse in-memory Storage: 4 KiB pages that were never
// written read as zeros and take no memory, so a 256 MiB block costs
// nothing until touched. It implements rangeZeroer by dropping pages.
type pageStorage struct {
	mu    sync.Mutex
	size  int64
	pages map[int64]*[psPage]byte
	limit int64
}

const psPage = 4096

func newPageStorage(limit int64) *pageStorage {
	return &pageStorage{pages: map[int64]*[psPage]byte{}, limit: limit}
}

func (p *pageStorage) ReadAt(b []byte, off int64) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if off < 0 {
		return 0, os.ErrInvalid
	}
	if off >= p.size {
		return 0, io.EOF
	}
	n := len(b)
	if int64(n) > p.size-off {
		n = int(p.size - off)
	}
	for done := 0; done < n; {
		pg, in := (off+int64(done))/psPage, int((off+int64(done))%psPage)
		k := min(n-done, psPage-in)
		if page := p.pages[pg]; page != nil {
			copy(b[done:done+k], page[in:])
		} else {
			clear(b[done : done+k])
		}
		done += k
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func (p *pageStorage) WriteAt(b []byte, off int64) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if off < 0 || int64(len(b)) > p.limit-off {
		return 0, fmt.Errorf("pagestorage: write [%d, +%d) beyond the %d-byte limit", off, len(b), p.limit)
	}
	p.write(b, off)
	return len(b), nil
}

func (p *pageStorage) write(b []byte, off int64) {
	for done := 0; done < len(b); {
		pg, in := (off+int64(done))/psPage, int((off+int64(done))%psPage)
		k := min(len(b)-done, psPage-in)
		page := p.pages[pg]
		if page == nil {
			if allZero(b[done : done+k]) {
				done += k
				continue
			}
			page = new([psPage]byte)
			p.pages[pg] = page
		}
		copy(page[in:], b[done:done+k])
		done += k
	}
	p.size = max(p.size, off+int64(len(b)))
}

func (p *pageStorage) zeroRange(off, n int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	end := min(off+n, p.size)
	for pos := off; pos < end; {
		pg, in := pos/psPage, pos%psPage
		k := min(end-pos, psPage-in)
		if page := p.pages[pg]; page != nil {
			if k == psPage {
				delete(p.pages, pg)
			} else {
				clear(page[in : in+k])
			}
		}
		pos += k
	}
	return nil
}

func (p *pageStorage) Truncate(size int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if size < 0 || size > p.limit {
		return fmt.Errorf("pagestorage: truncate to %d beyond the %d-byte limit", size, p.limit)
	}
	p.truncate(size)
	return nil
}

func (p *pageStorage) truncate(size int64) {
	if size < p.size {
		for pg, page := range p.pages {
			switch {
			case pg*psPage >= size:
				delete(p.pages, pg)
			case (pg+1)*psPage > size:
				clear(page[size-pg*psPage:])
			}
		}
	}
	p.size = size
}

func (p *pageStorage) Sync() error { return nil }

func (p *pageStorage) Size() (int64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.size, nil
}

func (p *pageStorage) clone() *pageStorage {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := &pageStorage{size: p.size, pages: make(map[int64]*[psPage]byte, len(p.pages)), limit: p.limit}
	for pg, page := range p.pages {
		cp := *page
		c.pages[pg] = &cp
	}
	return c
}

// equal reports whether both storages hold the same bytes (a page never
// written equals a page of zeros), and where they first differ.
func (p *pageStorage) equal(q *pageStorage) (bool, string) {
	if p.size != q.size {
		return false, fmt.Sprintf("size %d != %d", p.size, q.size)
	}
	var zero [psPage]byte
	diff := func(a, b map[int64]*[psPage]byte) (bool, int64) {
		for pg, page := range a {
			other := b[pg]
			if other == nil {
				other = &zero
			}
			if *page != *other {
				return true, pg
			}
		}
		return false, 0
	}
	if d, pg := diff(p.pages, q.pages); d {
		return false, fmt.Sprintf("page at %#x differs", pg*psPage)
	}
	if d, pg := diff(q.pages, p.pages); d {
		return false, fmt.Sprintf("page at %#x differs", pg*psPage)
	}
	return true, ""
}

// bytesAt returns n bytes at off (zeros past the end).
func (p *pageStorage) bytesAt(off int64, n int) []byte {
	b := make([]byte, n)
	p.ReadAt(b, off)
	return b
}

// specReader decodes the fuzz input field by field. Past the end of the
// input every field reads as zero, the value that builds a valid structure.
type specReader struct{ b []byte }

func (r *specReader) u8() uint8 {
	if len(r.b) == 0 {
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *specReader) u16() uint16 { return uint16(r.u8()) | uint16(r.u8())<<8 }
func (r *specReader) u32() uint32 { return uint32(r.u16()) | uint32(r.u16())<<16 }
func (r *specReader) u64() uint64 { return uint64(r.u32()) | uint64(r.u32())<<32 }

// Fixed layout of a built image (all 1 MiB aligned, §2.1): header section,
// log, metadata region and BAT, then payload and sector bitmap blocks in
// slots from bPayload on.
const (
	bLogOff   = 1 * mib
	bLogLen   = 1 * mib
	bMetaOff  = 2 * mib
	bMetaLen  = 1 * mib
	bBATOff   = 3 * mib
	bBATLen   = 1 * mib
	bExtra    = 4 * mib // an unknown region, when there is one
	bPayload  = 5 * mib
	bMaxBlock = 40 // payload blocks at most: past a chunk boundary when blocks are 256 MiB
	bLimit    = 16 * gib
)

var zeros60K [regionTableSize - psPage]byte

// builtImage is a built image and what the model needs to know about it.
type builtImage struct {
	s         *pageStorage
	lss       uint32
	bs        uint32
	size      uint64
	hasParent bool
	dataWrite uuid.UUID // DataWriteGuid of the current header
	bat       []uint64  // every BAT entry written, sector bitmap entries included
	cr        uint64    // chunk ratio
	logActive bool      // log entries were written and LogGuid is set
	// broken: a knob deliberately broke a rule of the spec (or chose
	// something the package may refuse); an image that is not broken
	// must open.
	broken  bool
	written []uint64 // virtual sectors the builder put data into
	// softDamage: one redundant copy (header or region table) was broken
	// while the other is good; Check reports it, Open does not mind.
	softDamage bool
}

// sectorData is what the builder puts into sector sec of payload block blk
// (a pattern that differs per layer, block and sector).
func sectorData(layer byte, blk, sec uint64, n uint32) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(uint64(i)*131+blk*7+sec*13) ^ layer
	}
	b[0], b[1] = layer|0x80, byte(blk)
	return b
}

// locatorSpec describes a parent locator (§2.6.2.6): which keys and values
// to write. linkage is the parent's DataWriteGuid the locator should name.
func buildLocator(r *specReader, linkage uuid.UUID, broken *bool) []byte {
	k := r.u8()
	type kv struct{ k, v string }
	entries := []kv{{keyParentLinkage, formatLinkage(linkage)}, {keyRelativePath, `.\base.vhdx`}}
	if k&1 != 0 {
		entries[0].v = formatLinkage(uuid.UUID{1}) // names another parent
		*broken = true
	}
	if k&2 != 0 {
		entries = append(entries, kv{keyParentLinkage2, formatLinkage(uuid.UUID{2})})
	}
	if k&4 != 0 {
		entries = append(entries, kv{keyAbsolutePath, `\\?\C:\vm\base.vhdx`}, kv{keyVolumePath, `\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vm\base.vhdx`})
	}
	if k&8 != 0 {
		entries = append(entries, kv{"vendor_key", "x"}) // unknown keys are kept (§2.6.2.6.3)
	}
	if k&16 != 0 {
		entries[0].v = "{not-a-guid}"
		*broken = true
	}
	if k&32 != 0 {
		entries = append(entries, kv{keyRelativePath, "again"}) // a duplicate key
		*broken = true
	}
	if k&64 != 0 {
		entries = entries[1:] // no parent_linkage
		*broken = true
	}
	le := binary.LittleEndian
	tableEnd := plHeaderSize + len(entries)*plEntrySize
	b := make([]byte, tableEnd)
	guidToDisk(b, ParentLocatorVHDX)
	le.PutUint16(b[plOffCount:], uint16(len(entries)))
	for i, e := range entries {
		for j, s := range []string{e.k, e.v} {
			u := utf16.Encode([]rune(s))
			ent := b[plHeaderSize+i*plEntrySize:]
			le.PutUint32(ent[4*j:], uint32(len(b)))     // KeyOffset, ValueOffset
			le.PutUint16(ent[8+2*j:], uint16(2*len(u))) // KeyLength, ValueLength
			for _, c := range u {
				b = le.AppendUint16(b, c)
			}
		}
	}
	if k&128 != 0 { // one raw mutation of the header or table
		at, v := int(r.u16())%len(b), r.u8()
		b[at] ^= v | 1
		*broken = true
	}
	return b
}

// buildImage decodes a description from r and writes the image. layer
// tags the payload data; parent, when not nil, is the base a differencing
// image (HasParent) is built over.
func buildImage(r *specReader, layer byte, parent *builtImage) *builtImage {
	le := binary.LittleEndian
	bi := &builtImage{s: newPageStorage(bLimit)}
	s := bi.s
	put := func(off uint64, b []byte) { s.write(b, int64(off)) }

	// Geometry (§2.6.2.1 to §2.6.2.5).
	g := r.u8()
	bi.lss, bi.bs = 512, 1<<(20+uint(g>>2)%9)
	if g&1 != 0 {
		bi.lss = 4096
	}
	pss := uint32(4096)
	if g&2 != 0 {
		pss = 512
	}
	nblocks := 1 + uint64(r.u8())%bMaxBlock
	spb := uint64(bi.bs / bi.lss)
	tail := uint64(r.u16()) % spb // sectors in the last block; 0: whole
	if tail == 0 {
		tail = spb
	}
	bi.size = (nblocks-1)*uint64(bi.bs) + tail*uint64(bi.lss)
	if parent != nil {
		// A child has its parent's sector size and virtual size; its
		// block size is its own when the geometry knob is not zero.
		bs := bi.bs
		bi.lss, bi.bs, bi.size = parent.lss, parent.bs, parent.size
		if g != 0 {
			bi.bs = bs
		}
		spb = uint64(bi.bs / bi.lss)
		nblocks = payloadBlocks(bi.size, bi.bs)
		bi.hasParent = true
	}
	bi.cr = chunkRatio(bi.lss, bi.bs)

	// File identifier (§2.2.1).
	put(0, []byte(fileIDSignature))

	// Headers (§2.2.2): which copy is current, and flaws in either.
	hk := r.u8()
	logGUID := uuid.Nil
	nlog := int(r.u8() % 4)
	if nlog > 0 {
		logGUID = uuid.UUID{0x4c, 0x4f, 0x47, byte(nlog)}
	}
	bi.dataWrite = uuid.UUID{0xd1, layer, 1}
	mkHeader := func(seq uint64, current bool) []byte {
		h := make([]byte, headerSize)
		copy(h, hdrSignature)
		le.PutUint64(h[hdrOffSequence:], seq)
		guidToDisk(h[hdrOffFileWrite:], uuid.UUID{0xf1, layer})
		guidToDisk(h[hdrOffDataWrite:], bi.dataWrite)
		if current {
			guidToDisk(h[hdrOffLogGUID:], logGUID)
		}
		le.PutUint16(h[hdrOffVersion:], 1)
		le.PutUint32(h[hdrOffLogLength:], bLogLen)
		le.PutUint64(h[hdrOffLogOffset:], bLogOff)
		if current && hk&0x10 != 0 {
			le.PutUint16(h[hdrOffVersion:], 2) // unknown version
			bi.broken = true
		}
		if current && hk&0x20 != 0 { // log length or offset not 1 MiB aligned / outside
			le.PutUint32(h[hdrOffLogLength:], uint32(r.u16())<<12)
			le.PutUint64(h[hdrOffLogOffset:], uint64(r.u16())<<16)
			bi.broken = true
		}
		putChecksum(h, hdrOffChecksum)
		return h
	}
	seq := [2]uint64{10, 9}
	switch hk & 3 {
	case 1:
		seq = [2]uint64{9, 10}
	case 2: // equal sequence numbers, identical headers: accepted
		seq = [2]uint64{10, 10}
	case 3: // equal sequence numbers, different headers
		seq = [2]uint64{10, 10}
		bi.broken, bi.softDamage = true, true
	}
	cur := 0
	if seq[1] > seq[0] {
		cur = 1
	}
	for slot := 0; slot < 2; slot++ {
		h := mkHeader(seq[slot], slot == cur || seq[0] == seq[1])
		if hk&3 == 3 && slot == 1 {
			h[hdrOffFileWrite] ^= 1 // same sequence number, different contents
			putChecksum(h, hdrOffChecksum)
		}
		if hk&(4<<slot) != 0 {
			h[hdrOffChecksum] ^= 0x55 // this copy's checksum fails
			bi.softDamage = true      // Open may use the other copy, Check names this one
			if slot == cur {
				bi.broken = true
			}
		}
		put(headerOffset(slot), h)
	}
	if hk&0xC == 0xC {
		bi.broken = true // neither copy valid
	}
	if hk&0x40 != 0 {
		put(0, []byte("vhdxfilX")) // not a VHDX file
		bi.broken = true
	}

	// Region table (§2.2.3): BAT and metadata, optionally more.
	rk := r.u8()
	type rte struct {
		g        uuid.UUID
		off      uint64
		length   uint32
		required uint32
	}
	rt := []rte{{RegionBAT, bBATOff, bBATLen, 1}, {RegionMetadata, bMetaOff, bMetaLen, 1}}
	if rk&1 != 0 {
		rt = append(rt, rte{uuid.UUID{0xee}, bExtra, mib, 0}) // unknown, not required: ignored
	}
	if rk&2 != 0 {
		rt = append(rt, rte{uuid.UUID{0xef}, bExtra, mib, 1}) // unknown, required: refused
		bi.broken = true
	}
	if rk&4 != 0 { // the BAT region at a fuzzed place and length
		rt[0].off, rt[0].length = uint64(r.u8())<<20, uint32(r.u16())<<12
		bi.broken = true
	}
	if rk&8 != 0 {
		rt = append(rt, rt[1]) // metadata region listed twice
		bi.broken = true
	}
	if rk&16 != 0 {
		rt[1].required = 0 // known regions not flagged required
	}
	if rk&32 != 0 {
		rt[1].off += 4096 // not 1 MiB aligned
		bi.broken = true
	}
	tbl := make([]byte, psPage) // the entries; the other 60 KiB of the table are zeros
	copy(tbl, rtSignature)
	le.PutUint32(tbl[rtOffEntryCount:], uint32(len(rt)))
	for i, e := range rt {
		x := tbl[rtHeaderSize+i*rtEntrySize:]
		guidToDisk(x[rteOffGUID:], e.g)
		le.PutUint64(x[rteOffFileOff:], e.off)
		le.PutUint32(x[rteOffLength:], e.length)
		le.PutUint32(x[rteOffRequired:], e.required)
	}
	// §2.2.3.1: CRC-32C over the whole 64 KiB table, checksum field zero.
	binary.LittleEndian.PutUint32(tbl[rtOffChecksum:], crc32.Update(crc32.Checksum(tbl, castagnoli), castagnoli, zeros60K[:]))
	for i, off := range []uint64{regionTable1Off, regionTable2Off} {
		t := tbl
		if rk&(64<<i) != 0 {
			t = append([]byte(nil), tbl...)
			t[rtOffChecksum] ^= 0x33
		}
		put(off, t)
	}
	switch rk >> 6 {
	case 1, 2:
		bi.softDamage = true
	case 3:
		bi.broken = true
	}
	batOff := rt[0].off

	// Metadata (§2.6.1, §2.6.2).
	mk := r.u8()
	type item struct {
		id    uuid.UUID
		flags uint32
		data  []byte
	}
	fp := make([]byte, 8)
	le.PutUint32(fp, bi.bs)
	if mk&1 != 0 {
		le.PutUint32(fp[4:], fpFlagLeaveBlockAllocated)
	}
	vs, id, ls, ps := make([]byte, 8), make([]byte, 16), make([]byte, 4), make([]byte, 4)
	le.PutUint64(vs, bi.size)
	guidToDisk(id, uuid.UUID{0xd0, layer})
	le.PutUint32(ls, bi.lss)
	le.PutUint32(ps, pss)
	const req, virt = mdFlagIsRequired, mdFlagIsVirtual
	items := []item{{MetaFileParameters, req, fp}, {MetaVirtualDiskSize, req | virt, vs},
		{MetaVirtualDiskID, req | virt, id}, {MetaLogicalSectorSize, req | virt, ls}, {MetaPhysicalSectorSize, req | virt, ps}}
	if bi.hasParent {
		le.PutUint32(fp[4:], le.Uint32(fp[4:])|fpFlagHasParent)
		items = append(items, item{MetaParentLocator, req, buildLocator(r, parent.dataWrite, &bi.broken)})
	}
	if mk&2 != 0 {
		items = append(items, item{uuid.UUID{0xab}, 0, []byte("unknown, optional")})
	}
	if mk&4 != 0 {
		items = append(items, item{uuid.UUID{0xac}, req, []byte("unknown, required")})
		bi.broken = true
	}
	if mk&8 != 0 {
		items = append(items, item{uuid.UUID{0xad}, mdFlagIsUser, []byte("user item")})
	}
	if mk&16 != 0 { // a required item missing
		i := int(r.u8()) % 5
		items = append(items[:i], items[i+1:]...)
		bi.broken = true
	}
	if mk&32 != 0 { // one value replaced by a fuzzed one
		it := &items[int(r.u8())%len(items)]
		it.data = append([]byte(nil), it.data...)
		binary.LittleEndian.PutUint32(it.data, r.u32())
		bi.broken = true
	}
	mt := make([]byte, psPage) // the entries; the other 60 KiB of the table are zeros
	copy(mt, mdSignature)
	le.PutUint16(mt[mdOffEntryCount:], uint16(len(items)))
	at := uint32(mdItemMinOffset)
	for i, it := range items {
		x := mt[mdHeaderSize+i*mdEntrySize:]
		guidToDisk(x[mdeOffItemID:], it.id)
		off := at
		if mk&64 != 0 && i == 1 {
			off -= 8 // overlaps the previous item
			bi.broken = true
		}
		le.PutUint32(x[mdeOffOffset:], off)
		le.PutUint32(x[mdeOffLength:], uint32(len(it.data)))
		le.PutUint32(x[mdeOffFlags:], it.flags)
		put(bMetaOff+uint64(off), it.data)
		at += uint32(roundUp(uint64(len(it.data)), 8))
	}
	if mk&128 != 0 {
		copy(mt, "metadatX")
		bi.broken = true
	}
	put(bMetaOff, mt)

	// BAT (§2.5): payload entries, and a sector bitmap entry after every
	// chunkRatio of them (§2.5, figure 6).
	nent := batIndex(nblocks-1, bi.cr) + 1
	if bi.hasParent {
		nent = (nblocks + bi.cr - 1) / bi.cr * (bi.cr + 1)
	}
	bi.bat = make([]uint64, nent)
	slot := uint64(0)
	alloc := func(n uint64) uint64 { // next free slot of n bytes
		off := bPayload + slot
		slot += roundUp(n, mib)
		return off
	}
	for i := uint64(0); i < nent; i++ {
		k := r.u8()
		st := uint64(k & 7)
		if isBitmapIndex(i, bi.cr) {
			if !bi.hasParent {
				if k&8 != 0 { // a sector bitmap entry in a base image
					bi.bat[i] = makeBATEntry(stateFullyPresent, alloc(mib))
					bi.broken = true
				}
				continue
			}
			// A chunk's bitmap is present unless the knob says no;
			// bits are set below, per PARTIALLY_PRESENT block.
			if k&8 == 0 && bi.bat[i] == 0 {
				bi.bat[i] = makeBATEntry(stateFullyPresent, alloc(mib))
			}
			continue
		}
		blk := i - i/(bi.cr+1)
		if blk >= nblocks {
			continue // a differencing BAT runs on to its last chunk's bitmap entry
		}
		if st == stateReserved4 || (st == statePartiallyPresent && !bi.hasParent) {
			bi.broken = true
		}
		var off uint64
		switch {
		case st == stateFullyPresent || st == statePartiallyPresent:
			off = alloc(uint64(bi.bs))
		case (st == stateUndefined || st == stateUnmapped) && k&8 != 0:
			off = alloc(uint64(bi.bs)) // retains its old block (§2.5.1.1)
		}
		if k&0x10 != 0 && off != 0 { // point at another block's slot
			off = bPayload + uint64(r.u8())%max(slot/mib, 1)*mib
			bi.broken = true
		}
		if k&0x20 != 0 {
			off = uint64(r.u16()) << 20 // anywhere, in the header section, past the end
			bi.broken = true
		}
		e := makeBATEntry(st, off)
		if k&0x40 != 0 {
			e |= 1 << 3 // a reserved bit (§2.5.1: MUST be zero)
			bi.broken = true
		}
		bi.bat[i] = e
		if st == stateFullyPresent || st == statePartiallyPresent {
			nsec := min(spb, (bi.size-blk*uint64(bi.bs))/uint64(bi.lss))
			for _, sec := range []uint64{0, uint64(r.u16()) % nsec, nsec - 1} {
				put(off+sec*uint64(bi.lss), sectorData(layer, blk, sec, bi.lss))
				bi.written = append(bi.written, blk*spb+sec)
			}
		}
		if st == statePartiallyPresent && bi.hasParent {
			sb := bi.bat[(blk/bi.cr+1)*(bi.cr+1)-1]
			if sb == 0 {
				// Its chunk's bitmap entry comes later in the BAT;
				// take the bitmap block now if the knob allows.
				sbi := (blk/bi.cr+1)*(bi.cr+1) - 1
				if k&0x80 != 0 {
					bi.broken = true // left NOT_PRESENT
				} else if sbi < nent {
					bi.bat[sbi] = makeBATEntry(stateFullyPresent, alloc(mib))
					sb = bi.bat[sbi]
				}
			}
			if sb != 0 {
				bits := make([]byte, spb/8)
				for runs := r.u8() % 4; runs > 0; runs-- {
					lo := uint64(r.u16()) % spb
					hi := min(spb-1, lo+uint64(r.u8()))
					for b := lo; b <= hi; b++ { // LSB first (§2.4)
						bits[b/8] |= 1 << (b % 8)
					}
				}
				put(batFileOffset(sb)+(blk%bi.cr)*spb/8, bits)
			}
		}
	}
	// Entries for bitmaps filled in out of order above are written with
	// the others: serialise the whole BAT now.
	batBytes := make([]byte, 8*nent)
	for i, e := range bi.bat {
		le.PutUint64(batBytes[8*i:], e)
	}
	if uint64(len(batBytes)) > bBATLen {
		batBytes = batBytes[:bBATLen]
	}
	put(batOff, batBytes)
	fileEnd := bPayload + slot

	// Log (§2.3): nlog entries one after another from the start of the
	// log, each with a few data and zero descriptors.
	if nlog > 0 {
		bi.logActive = true
		bi.broken = true // replay may rewrite anything the fuzzer aimed at
		pos := uint32(0)
		seq := uint64(r.u16()) + 1
		for n := 0; n < nlog; n++ {
			ek := r.u8()
			ndesc := int(ek % 4)
			type desc struct {
				zero bool
				off  uint64
				zlen uint64
				data []byte
			}
			var ds []desc
			for d := 0; d < ndesc; d++ {
				dk := r.u8()
				var off uint64
				switch dk & 3 {
				case 0:
					off = batOff
				case 1:
					off = bMetaOff + uint64(r.u8())*4096
				case 2:
					off = bPayload + uint64(r.u16())*4096
				case 3:
					off = uint64(r.u32()) << 12
				}
				if dk&4 != 0 {
					ds = append(ds, desc{zero: true, off: off, zlen: uint64(r.u8()) << 12})
					continue
				}
				data := make([]byte, logSectorSize)
				if off == batOff {
					copy(data, batBytes) // a BAT sector rewritten with itself
				} else {
					for i := range data {
						data[i] = dk ^ byte(i)
					}
				}
				ds = append(ds, desc{off: off, data: data})
			}
			ndata := 0
			for _, d := range ds {
				if !d.zero {
					ndata++
				}
			}
			entryLen := uint32(1+ndata) * logSectorSize
			b := make([]byte, entryLen)
			copy(b, logSigEntry)
			le.PutUint32(b[logHdrOffEntryLength:], entryLen)
			le.PutUint32(b[logHdrOffTail:], 0)
			if ek&0x10 != 0 {
				le.PutUint32(b[logHdrOffTail:], pos) // each entry its own tail
			}
			le.PutUint64(b[logHdrOffSequence:], seq)
			le.PutUint32(b[logHdrOffDescCount:], uint32(len(ds)))
			guidToDisk(b[logHdrOffLogGUID:], logGUID)
			if ek&0x20 != 0 {
				guidToDisk(b[logHdrOffLogGUID:], uuid.UUID{9}) // an older log's entry
			}
			le.PutUint64(b[logHdrOffFlushed:], fileEnd)
			le.PutUint64(b[logHdrOffLast:], fileEnd)
			if ek&0x40 != 0 {
				le.PutUint64(b[logHdrOffLast:], fileEnd+uint64(r.u8())<<20) // file must grow
			}
			di := 0
			for i, d := range ds {
				x := b[(i+logHeaderDescSlots)*logDescriptorSize:][:logDescriptorSize]
				le.PutUint64(x[logDescOffFileOff:], d.off)
				le.PutUint64(x[logDescOffSequence:], seq)
				if d.zero {
					copy(x, logSigZero)
					le.PutUint64(x[logDescOffZeroLen:], d.zlen)
					continue
				}
				copy(x, logSigDesc)
				copy(x[logDescOffLeading:], d.data[:logLeadingLen])
				copy(x[logDescOffTrailing:], d.data[logDataTrailingOff:])
				sec := b[(1+di)*logSectorSize:][:logSectorSize]
				copy(sec, logSigData)
				le.PutUint32(sec[logDataOffSeqHigh:], uint32(seq>>32))
				copy(sec[logDataOffData:logDataOffSeqLow], d.data[logDataOffData:logDataOffSeqLow])
				le.PutUint32(sec[logDataOffSeqLow:], uint32(seq))
				di++
			}
			putChecksum(b, logHdrOffChecksum)
			if ek&0x80 != 0 {
				b[int(r.u16())%len(b)] ^= 0x10 // torn entry
			}
			if uint64(pos)+uint64(entryLen) > bLogLen {
				break
			}
			put(bLogOff+uint64(pos), b)
			pos += entryLen
			seq += 1 + uint64(ek>>3&1) // a gap ends the active sequence
		}
	}

	// File size: exactly the used end, or cut short / extended.
	size := int64(fileEnd)
	switch fk := r.u8(); fk & 3 {
	case 1:
		size -= int64(r.u16()) << 12 // cut into the last structures
		bi.broken = true
	case 2:
		size += int64(r.u8()) << 20 // trailing space (a leak, not damage)
	case 3:
		size = int64(r.u16()) << 16
		bi.broken = true
	}
	s.truncate(max(size, 0))
	return bi
}

// modelRead is what sector sec of the virtual disk holds according to the
// builder's own BAT and bitmaps: for a base image FULLY_PRESENT blocks from
// the file and zeros elsewhere; for a differencing image, top-down, the
// first layer whose BAT (and for PARTIALLY_PRESENT, bitmap bit) says the
// sector is present; NOT_PRESENT falls through to the parent; ZERO,
// UNDEFINED and UNMAPPED read zeros (the package's documented choice for
// the states whose contents the spec leaves open, §2.5.1.1).
func modelRead(layers []*builtImage, sec uint64) []byte {
	for _, bi := range layers {
		lss := uint64(bi.lss)
		spb := uint64(bi.bs) / lss
		blk, in := sec/spb, sec%spb
		e := bi.bat[batIndex(blk, bi.cr)]
		switch batState(e) {
		case stateFullyPresent:
			return bi.s.bytesAt(int64(batFileOffset(e)+in*lss), int(lss))
		case statePartiallyPresent:
			if !bi.hasParent {
				break // refused by Open (§2.5.1.1)
			}
			sb := bi.bat[(blk/bi.cr+1)*(bi.cr+1)-1]
			bit := (blk%bi.cr)*spb + in
			b := bi.s.bytesAt(int64(batFileOffset(sb)+bit/8), 1)
			if b[0]>>(bit%8)&1 == 1 {
				return bi.s.bytesAt(int64(batFileOffset(e)+in*lss), int(lss))
			}
			continue
		case stateNotPresent:
			if bi.hasParent {
				continue
			}
		}
		return make([]byte, lss)
	}
	return make([]byte, layers[0].lss)
}

// modelSectors lists the sectors of im worth comparing: the first, middle and
// last sector of every block, the sectors the builder wrote data to, and
// each neighbour of them.
func modelSectors(bi *builtImage, im *Image) []uint64 {
	lss := uint64(im.LogicalSectorSize())
	spb := uint64(im.BlockSize()) / lss
	total := uint64(im.Size()) / lss
	seen := map[uint64]bool{}
	var out []uint64
	add := func(s uint64) {
		for _, x := range []uint64{s - 1, s, s + 1} {
			if x < total && !seen[x] {
				seen[x] = true
				out = append(out, x)
			}
		}
	}
	for blk := uint64(0); blk*spb < total; blk++ {
		add(blk * spb)
		add(blk*spb + spb/2)
		add(blk*spb + spb - 1)
	}
	if bi.matches(im) {
		for _, s := range bi.written {
			add(s)
		}
	}
	return out
}

// matches reports whether im has the geometry the builder meant; a fuzzed
// metadata value the package accepted makes the model meaningless.
func (bi *builtImage) matches(im *Image) bool {
	return im.LogicalSectorSize() == bi.lss && im.BlockSize() == bi.bs && uint64(im.Size()) == bi.size
}
