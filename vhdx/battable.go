package vhdx

import (
	"bytes"
	"encoding/binary"
	"sync/atomic"
)

// The BAT in memory (§2.5) is a table of pages of batPageEntries entries.
// A page that holds nothing but one state without a block is not stored:
// qemu-img writes every payload entry of a new image out as
// PAYLOAD_BLOCK_ZERO (state 2, FileOffsetMB 0) and a fresh image of ours
// has every entry NOT_PRESENT (0), so a 16 TiB disk with 1 MiB blocks (a
// 128 MiB BAT) is held in a few hundred KiB until blocks are allocated.
//
// Rules of a page that is not stored ("implicit"): every payload entry
// holds the page's fill, a state value 0 or 2 (no FileOffsetMB, nothing to
// validate, never owning a block), and every sector bitmap entry holds 0
// (SB_BLOCK_NOT_PRESENT). The fills are set while loading, before the
// table is shared, and never change after that.
//
// Concurrency: entries are read without locks (doc.go). A page is stored
// the first time an entry of it takes a value other than its implicit one:
// the page is built with the implicit values and published with a
// compare-and-swap, so two writers storing into one implicit page at once
// (they hold Image.mu today, but nothing here relies on it) end up on the
// same page, and a reader sees either the implicit value or the page's,
// which agree until the entry's own store.
type batTable struct {
	n          uint64 // entries
	chunkRatio uint64 // where the sector bitmap entries are (§2.5)
	pages      []atomic.Pointer[batPage]
	fill       []uint8 // per page: the payload entries' value while implicit
}

// batPageEntries is 512: one 4 KiB page of memory per stored page, and one
// BAT sector of the file (batSectorSize).
const batPageEntries = 512

type batPage [batPageEntries]atomic.Uint64

// batPageBuiltHook, when set (tests only), runs after materialize built a
// page and before it tries to publish it.
var batPageBuiltHook func(p uint64)

func newBATTable(n, chunkRatio uint64) *batTable {
	pages := (n + batPageEntries - 1) / batPageEntries
	return &batTable{
		n:          n,
		chunkRatio: chunkRatio,
		pages:      make([]atomic.Pointer[batPage], pages),
		fill:       make([]uint8, pages),
	}
}

// len is the number of entries.
func (t *batTable) len() uint64 { return t.n }

// implicit is entry i's value while its page is not stored.
func (t *batTable) implicit(i uint64) uint64 {
	f := t.fill[i/batPageEntries]
	if f == 0 || isBitmapIndex(i, t.chunkRatio) {
		return 0
	}
	return uint64(f)
}

// load returns entry i (i < len()).
func (t *batTable) load(i uint64) uint64 {
	if pg := t.pages[i/batPageEntries].Load(); pg != nil {
		return pg[i%batPageEntries].Load()
	}
	return t.implicit(i)
}

// store sets entry i (i < len()), storing its page first if needed.
func (t *batTable) store(i, e uint64) {
	p := i / batPageEntries
	pg := t.pages[p].Load()
	if pg == nil {
		if e == t.implicit(i) {
			return
		}
		pg = t.materialize(p)
	}
	pg[i%batPageEntries].Store(e)
}

// materialize stores page p with its implicit values and returns it, or
// the page another writer stored first.
func (t *batTable) materialize(p uint64) *batPage {
	pg := new(batPage)
	first := p * batPageEntries
	if t.fill[p] != 0 {
		for k := range pg {
			pg[k].Store(t.implicit(first + uint64(k)))
		}
	}
	if hook := batPageBuiltHook; hook != nil {
		hook(p)
	}
	if t.pages[p].CompareAndSwap(nil, pg) {
		return pg
	}
	return t.pages[p].Load()
}

// forEachStored calls fn for every entry of the stored pages, in order.
// The entries of implicit pages are skipped: they never own a block
// (offset 0) and need no validation, which is what the callers look for.
func (t *batTable) forEachStored(fn func(i, e uint64)) {
	for p := range t.pages {
		pg := t.pages[p].Load()
		if pg == nil {
			continue
		}
		first := uint64(p) * batPageEntries
		for k := uint64(0); k < batPageEntries && first+k < t.n; k++ {
			fn(first+k, pg[k].Load())
		}
	}
}

// notPresentPage and zeroStatePage are a page of payload entries of each
// implicit fill, as they lie in the file (uniformFill compares with them).
var notPresentPage, zeroStatePage = func() (np, zs [batPageEntries * 8]byte) {
	for k := 0; k < len(zs); k += 8 {
		binary.LittleEndian.PutUint64(zs[k:], stateZero)
	}
	return np, zs
}()

// setPage is how loadBAT fills page p from b, the page's entries as they
// lie in the file (up to batPageEntries of them, little-endian; entries
// past b stay 0): a page of one fill is left implicit, any other is
// stored. Only before the table is shared.
func (t *batTable) setPage(p uint64, b []byte, inPlace bool) {
	if f, ok := t.uniformFill(p*batPageEntries, b); ok {
		t.fill[p] = f
		return
	}
	pg := new(batPage)
	if view := pageBytes(pg); inPlace && view != nil {
		copy(view, b)
	} else {
		for k := 0; k+8 <= len(b); k += 8 {
			pg[k/8].Store(binary.LittleEndian.Uint64(b[k:]))
		}
	}
	t.pages[p].Store(pg)
}

// uniformFill reports whether the entries in b, the first being entry
// first, are what an implicit page of some fill holds: every payload entry
// one value, 0 or PAYLOAD_BLOCK_ZERO, every bitmap entry 0. A short b (the
// end of the BAT region) counts the entries past it as 0, so its fill must
// be 0 unless they are all bitmap entries.
//
// It runs for every page of a BAT while it loads, so it compares each run
// of payload entries between two bitmap entries with one bytes.Equal
// against a page of the fill (vectorised) instead of entry by entry: a
// 16 TiB image's 128 MiB BAT spent half of `info` here.
func (t *batTable) uniformFill(first uint64, b []byte) (uint8, bool) {
	le := binary.LittleEndian
	stride := t.chunkRatio + 1
	nextBitmap := first + t.chunkRatio - first%stride // the first bitmap entry at or after first
	var fill uint64
	var pattern []byte // a page of fill entries, once a payload entry set fill
	i, end := first, first+uint64(len(b)/8)
	for i < end {
		if i == nextBitmap {
			if le.Uint64(b[(i-first)*8:]) != 0 {
				return 0, false
			}
			nextBitmap += stride
			i++
			continue
		}
		run := b[(i-first)*8 : (min(nextBitmap, end)-first)*8] // payload entries only
		if pattern == nil {
			switch fill = le.Uint64(run); fill {
			case stateNotPresent:
				pattern = notPresentPage[:]
			case stateZero:
				pattern = zeroStatePage[:]
			default:
				return 0, false
			}
		}
		if !bytes.Equal(run, pattern[:len(run)]) {
			return 0, false
		}
		i += uint64(len(run) / 8)
	}
	// Entries past b in this page that lie in the table read 0 while the
	// page is implicit: with a fill of ZERO they must all be bitmap entries.
	for ; fill != 0 && i < min(first+batPageEntries, t.n); i++ {
		if i != nextBitmap {
			return 0, false
		}
		nextBitmap += stride
	}
	return uint8(fill), true
}
