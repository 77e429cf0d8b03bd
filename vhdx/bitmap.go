package vhdx

// Sector bitmaps of a differencing image (MS-VHDX §2.4): one bit per logical
// sector, bit 0 of byte 0 for the first sector of the chunk, a set bit
// meaning "this file holds the sector", a clear one "ask the parent". A
// chunk's bitmap is one 1 MiB block, located by the BAT entry
// (k+1)*(ChunkRatio+1)-1 for chunk k, and only consulted for
// PARTIALLY_PRESENT payload blocks.
//
// Bitmaps are cached lazily in 4 KiB pages, the unit the journal rewrites,
// each covering 32768 sectors (16 MiB of 512-byte sectors, 128 MiB of
// 4096-byte ones). The cache holds at most bitmapCachePages pages per image
// and evicts the least recently used, so memory does not grow with the disk.

import (
	"fmt"
	"sync"
)

const (
	bitmapPageSize    = 4 * kib
	bitmapPageBits    = bitmapPageSize * 8 // sectors per page
	bitmapBlockSize   = 1 * mib
	bitmapPagesPerBlk = bitmapBlockSize / bitmapPageSize
)

// bitmapCachePages caps each image's cache (1 MiB of pages). Tests lower
// the cap of their own images to drive eviction (shrinkBitmapCaches).
const bitmapCachePages = 256

type bitmapPage struct {
	key        uint64 // chunk*bitmapPagesPerBlk + page within the bitmap block
	bits       [bitmapPageSize]byte
	prev, next *bitmapPage // LRU list, most recent at head
}

// bitmapCache is shared by the readers and the writer of one image. mu
// guards the map, the list and the page contents: a reader looks bits up
// under mu and does its data I/O after releasing it; the writer (under
// Image.mu) replaces a page's contents under mu after the journal commit
// that made them durable. A miss reads the page from the file under mu, so
// a page read from disk can never be inserted after a newer version was
// stored.
type bitmapCache struct {
	mu    sync.Mutex
	pages map[uint64]*bitmapPage
	head  *bitmapPage
	tail  *bitmapPage
	max   int
}

func newBitmapCache() *bitmapCache {
	return &bitmapCache{pages: make(map[uint64]*bitmapPage), max: bitmapCachePages}
}

func (c *bitmapCache) unlink(p *bitmapPage) {
	if p.prev != nil {
		p.prev.next = p.next
	} else {
		c.head = p.next
	}
	if p.next != nil {
		p.next.prev = p.prev
	} else {
		c.tail = p.prev
	}
	p.prev, p.next = nil, nil
}

func (c *bitmapCache) pushFront(p *bitmapPage) {
	p.next = c.head
	if c.head != nil {
		c.head.prev = p
	}
	c.head = p
	if c.tail == nil {
		c.tail = p
	}
}

// slot returns a page struct for key, evicting the oldest when full.
// Caller holds mu and fills bits.
func (c *bitmapCache) slot(key uint64) *bitmapPage {
	var p *bitmapPage
	if len(c.pages) >= c.max && c.tail != nil {
		p = c.tail
		c.unlink(p)
		delete(c.pages, p.key)
	} else {
		p = new(bitmapPage)
	}
	p.key = key
	c.pages[key] = p
	c.pushFront(p)
	return p
}

// lookup returns the cached page for key and marks it recently used.
// Caller holds mu.
func (c *bitmapCache) lookup(key uint64) (*bitmapPage, bool) {
	p, ok := c.pages[key]
	if ok && c.head != p {
		c.unlink(p)
		c.pushFront(p)
	}
	return p, ok
}

// drop removes a page whose load failed. Caller holds mu.
func (c *bitmapCache) drop(p *bitmapPage) {
	c.unlink(p)
	delete(c.pages, p.key)
}

// store replaces (or inserts) the page for key with data.
func (c *bitmapCache) store(key uint64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.pages[key]
	if !ok {
		p = c.slot(key)
	}
	copy(p.bits[:], data)
}

// len reports the number of cached pages (tests).
func (c *bitmapCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pages)
}

// bitRun returns the length (≤ count) of the run of equal bits starting at
// bit first of b, and the bit's value. first+count ≤ 8*len(b).
func bitRun(b []byte, first, count uint64) (uint64, bool) {
	set := b[first>>3]>>(first&7)&1 == 1
	want := byte(0)
	if set {
		want = 0xFF
	}
	i := first
	end := first + count
	for i < end {
		if i&7 == 0 && end-i >= 8 {
			if b[i>>3] == want {
				i += 8
				continue
			}
		}
		if (b[i>>3]>>(i&7)&1 == 1) != set {
			break
		}
		i++
	}
	return i - first, set
}

// sbIndex is the BAT index of chunk k's sector bitmap entry (§2.5).
func (l *layout) sbIndex(chunk uint64) uint64 { return (chunk+1)*(l.chunkRatio+1) - 1 }

// sectorsPerBlock is BlockSize / LogicalSectorSize.
func (l *layout) sectorsPerBlock() uint64 { return uint64(l.blockSize) / uint64(l.logicalSector) }

// bitmapRun looks up the presence bits of count sectors of this image from
// virtual sector vsec: it returns how many of them (at least one, at most
// the rest of the 4 KiB bitmap page) share the first one's bit, and that
// bit. The chunk's bitmap block must be SB_BLOCK_PRESENT.
func (im *Image) bitmapRun(vsec, count uint64) (uint64, bool, error) {
	perChunk := im.l.chunkRatio * im.l.sectorsPerBlock()
	chunk, inChunk := vsec/perChunk, vsec%perChunk
	page, bit := inChunk/bitmapPageBits, inChunk%bitmapPageBits
	count = min(count, bitmapPageBits-bit)
	sb := im.bat.load(im.l.sbIndex(chunk))
	c := im.bitmaps
	c.mu.Lock()
	defer c.mu.Unlock()
	p, err := im.cachedBitmapPage(chunk, page, sb)
	if err != nil {
		return 0, false, err
	}
	n, set := bitRun(p.bits[:], bit, count)
	return n, set, nil
}

// bitmapRuns calls f for each run of sectors of [pos, pos+n) (sector
// aligned, inside one PARTIALLY_PRESENT block) that share their bitmap bit,
// in order: the run's virtual offset, its length in bytes and the bit.
func (im *Image) bitmapRuns(pos, n uint64, f func(at, k uint64, set bool) error) error {
	lss := uint64(im.l.logicalSector)
	for done := uint64(0); done < n; {
		run, set, err := im.bitmapRun((pos+done)/lss, (n-done)/lss)
		if err != nil {
			return err
		}
		k := run * lss
		if err := f(pos+done, k, set); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// cachedBitmapPage returns page of chunk's bitmap (block entry sb) from the
// cache, reading it from the file on a miss; a page whose read failed is
// not kept. Caller holds im.bitmaps.mu, which the returned page's bits are
// valid under.
func (im *Image) cachedBitmapPage(chunk, page, sb uint64) (*bitmapPage, error) {
	c := im.bitmaps
	key := chunk*bitmapPagesPerBlk + page
	p, ok := c.lookup(key)
	if !ok {
		p = c.slot(key)
		if err := im.loadBitmapPage(p.bits[:], chunk, page, sb); err != nil {
			c.drop(p)
			return nil, err
		}
	}
	return p, nil
}

// loadBitmapPage reads page of chunk's bitmap block, located by entry sb.
func (im *Image) loadBitmapPage(b []byte, chunk, page, sb uint64) error {
	if batState(sb) != stateFullyPresent {
		i := im.l.sbIndex(chunk)
		return errAt(ErrCorrupt, im.l.bat.offset+i*8, batEntryName(i),
			"sector bitmap of chunk %d is not present but a block of it is PARTIALLY_PRESENT", chunk)
	}
	off := batFileOffset(sb) + page*bitmapPageSize
	if err := readFull(im.s, b, off, "sector bitmap block"); err != nil {
		return fmt.Errorf("read sector bitmap of chunk %d: %w", chunk, err)
	}
	return nil
}
