package vhdx

// Group commit of a differencing image's first writes: writes into sectors
// the top of a chain does not hold yet share one journal entry and one set
// of fdatasyncs, using the batches of groupcommit.go.
//
// A member joins the open batch under Image.mu: it reserves what its block
// lacks (a payload block for a NOT_PRESENT block, the chunk's sector bitmap
// block when the chunk has none) unless a member of the same open batch
// reserved it already, and records the sectors whose bits it will set. It
// then writes its payload without the lock (into the reserved block, or
// into the sectors of the PARTIALLY_PRESENT block, whose bits stay clear,
// so readers still see the parent there) and waits for the batch.
//
// A write that makes its block FULLY_PRESENT (it covers the block, or the
// block reads as zeros: ZERO, UNDEFINED, UNMAPPED) joins the same batches
// (joinFullBatch): it reserves a fresh block, zeroed if reused (a
// PARTIALLY_PRESENT block keeps its range, whose sectors with clear bits
// are not read until the entry), writes its payload without the lock and
// waits; the entry sets the block's BAT entry FULLY_PRESENT, with no
// bitmap (§2.5.1). Later writes into that block while the batch is open
// write into the same range and join it; once a leader has taken it they
// wait for it (writeDiff).
//
// The leader takes the batch, waits until every member's payload write has
// returned (allocBatch.writing), and builds the entry under Image.mu: each
// bitmap page once, from its published contents, with the fresh blocks'
// bits cleared and every member's bits set, then the BAT sectors (payload
// PARTIALLY_PRESENT or FULLY_PRESENT, bitmap present). It commits with Image.mu released:
// sync (every member's payload durable, doc.go rule 2), entry, sync,
// in-place writes deferred (rule 4). Then, under Image.mu, it publishes
// bitmap pages, bitmap entries, payload entries, in that order, and wakes
// the members. A sector's bit is therefore never durable before its data:
// after a power cut the sector shows either the parent (bit clear) or the
// new data (bit set), never the zeros of a block whose data was lost.
//
// A member whose payload write fails leaves the batch before the build
// (its bits are not set, a reservation nobody else uses is given back) and
// gets its error; the other members are unaffected (host I/O rule 1: a
// failed data write fails that request only). A member whose block changed
// while it wrote (a discard moved it to ZERO, a whole-block write made it
// FULLY_PRESENT) is not committed either: once the batch is done it starts
// over, as if it had arrived after the change. A failed commit fails every
// remaining member (rule 7).

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
)

// errDiffRetry tells writeDiff to look at the block again: the batch the
// write joined did not commit it (its block changed meanwhile).
var errDiffRetry = errors.New("differencing write: block changed, retry")

// diffMember is a first write of a differencing image in a batch.
type diffMember struct {
	idx         uint64 // payload block entry
	chunk       uint64
	entry       uint64 // the entry when it joined (NOT_PRESENT: newPay)
	newPay      bool   // the batch reserved the payload block
	first, last uint64 // the virtual sectors whose bits it sets
	full        bool   // it makes its block FULLY_PRESENT (diffReservations.full)
	failed      bool   // its payload write failed: not committed
	retry       bool   // its block changed: not committed, start over
}

// fullBlock is a block a batch makes FULLY_PRESENT: a whole-block write
// (NOT_PRESENT or PARTIALLY_PRESENT before), or any write into a block
// that reads as zeros (ZERO, UNDEFINED, UNMAPPED). No bitmap is involved
// (§2.5.1: a FULLY_PRESENT block's bitmap is not consulted).
type fullBlock struct {
	off   uint64 // the block's range: reserved, or the PARTIALLY_PRESENT block's own
	entry uint64 // the block's entry when it was reserved
	fresh bool   // off was reserved by the batch (zeroed, or past the old file end)
}

// diffReservations is what a batch reserved for a differencing image.
type diffReservations struct {
	members []*diffMember
	writing int                   // members whose payload write is in flight
	pay     map[uint64]uint64     // payload entry index → reserved block
	sb      map[uint64]uint64     // chunk → reserved sector bitmap block
	pages   map[uint64]bool       // bitmap page keys touched
	full    map[uint64]*fullBlock // payload entry index → block made FULLY_PRESENT
}

// units bounds the 4 KiB sectors the batch's entry may hold: one per page
// and one per BAT entry changed.
func (d *diffReservations) units() int {
	return len(d.pages) + len(d.pay) + len(d.sb) + len(d.full)
}

// joinDiffBatch is the bitmap path of writeDiff: p lies inside block idx
// (entry e, NOT_PRESENT or PARTIALLY_PRESENT) and does not cover it. Caller
// holds im.mu; it is released while p is written and while the batch
// commits. errDiffRetry: the block changed; look again.
func (im *Image) joinDiffBatch(p []byte, pos, idx, in, e uint64) error {
	l := &im.l
	ag := &im.ag
	bs := uint64(l.blockSize)
	lss := uint64(l.logicalSector)
	block := pos / bs
	chunk := block / l.chunkRatio
	sbi := l.sbIndex(chunk)
	if sbi >= l.batOnDisk {
		return fmt.Errorf("write at %#x: the sector bitmap entry %d of chunk %d lies past the BAT region (length %#x): %w",
			pos, sbi, chunk, l.bat.length, ErrUnsupported)
	}
	b := ag.open
	sb := im.bat.load(sbi)
	if batState(sb) != stateFullyPresent {
		if ob := ag.pendSB[chunk]; ob != nil && ob != b {
			// The chunk's bitmap block is in a batch being committed:
			// after it, the chunk has one.
			ag.cond.Wait()
			return errDiffRetry
		}
	}
	newPay := batState(e) == stateNotPresent
	m := &diffMember{idx: idx, chunk: chunk, entry: e, newPay: newPay,
		first: pos / lss, last: (pos+uint64(len(p)))/lss - 1}
	keys := im.memberPages(m)
	d := b.diffRes()
	need := 0
	for _, k := range keys {
		if !d.pages[k] {
			need++
		}
	}
	if _, ok := d.pay[idx]; newPay && !ok {
		need++
	}
	if _, ok := d.sb[chunk]; batState(sb) != stateFullyPresent && !ok {
		need++
	}
	if need > 0 && d.units()+need+len(b.items) > allocBatchMax {
		ag.cond.Wait() // until a leader takes the open batch
		return errDiffRetry
	}

	// Reserve what the block lacks, unless a member of this batch did.
	payOff := batFileOffset(e)
	var own []ownedSpan // reserved by this call, in file order
	if newPay {
		off, ok := d.pay[idx]
		if !ok {
			var err error
			if off, err = im.reserveBlock(idx); err != nil { // zeroed if reused
				return err
			}
			own = append(own, im.blockSpan(off))
		}
		payOff = off
	}
	if _, ok := d.sb[chunk]; batState(sb) != stateFullyPresent && !ok {
		off := im.fileEnd
		if off > maxFileOffset-bitmapBlockSize {
			im.giveBackAll(own)
			return fmt.Errorf("write at %#x: file would exceed %#x bytes: %w", pos, uint64(maxFileOffset), ErrUnsupported)
		}
		im.fileEnd = off + bitmapBlockSize
		own = append(own, ownedSpan{off, off + bitmapBlockSize})
		if err := im.growTo(im.fileEnd); err != nil {
			im.giveBackAll(own)
			return err
		}
		d.sb[chunk] = off
		ag.pendSB[chunk] = b
	}
	if newPay {
		d.pay[idx] = payOff
		ag.pendPay[idx] = b
	}
	for _, k := range keys {
		d.pages[k] = true
	}
	d.members = append(d.members, m)
	d.writing++
	im.mu.Unlock()
	// Unpublished sectors (their bits are clear): the batch syncs them
	// before its entry. A PARTIALLY_PRESENT block's run may also cover
	// sectors already present, which the guest reads back.
	var werr error
	if newPay {
		werr = im.writeFreshPayload(p, payOff+in)
	} else {
		werr = im.writePayload(p, payOff+in)
	}
	im.mu.Lock()
	return im.finishMember(b, m, werr)
}

// joinFullBatch is the FULLY_PRESENT path of writeDiff: p lies inside
// block idx (entry e) and covers it, or the block reads as zeros (ZERO,
// UNDEFINED, UNMAPPED), or a member of the open batch already makes the
// block FULLY_PRESENT and p joins it (writing into the same range). The
// first such member reserves a fresh block (zeroed if reused, so the rest
// of a partial write's block reads zeros, as the state did) unless the
// block is PARTIALLY_PRESENT, whose own range then fills: sectors whose
// bits are clear are not read from it until the entry, after the batch's
// sync, makes the block FULLY_PRESENT. Caller holds im.mu, and no batch
// but the open one reserved the block (writeDiff); im.mu is released while
// p is written and while the batch commits. errDiffRetry: look again.
func (im *Image) joinFullBatch(p []byte, idx, in, e uint64) error {
	ag := &im.ag
	b := ag.open
	d := b.diffRes()
	fb := d.full[idx]
	if fb == nil {
		if d.units()+1+len(b.items) > allocBatchMax {
			ag.cond.Wait() // until a leader takes the open batch
			return errDiffRetry
		}
		fb = &fullBlock{off: batFileOffset(e), entry: e}
		if batState(e) != statePartiallyPresent {
			off, err := im.reserveBlock(idx) // space.go: reused (zeroed) or fresh
			if err != nil {
				return err
			}
			fb.off, fb.fresh = off, true
		}
		d.full[idx] = fb
		ag.pendFull[idx] = b
	}
	m := &diffMember{idx: idx, entry: fb.entry, full: true}
	d.members = append(d.members, m)
	d.writing++
	im.mu.Unlock()
	var werr error
	if fb.fresh {
		werr = im.writeFreshPayload(p, fb.off+in)
	} else {
		// Sectors whose bits are set are the guest's: an in-place write.
		werr = im.writePayload(p, fb.off+in)
	}
	im.mu.Lock()
	return im.finishMember(b, m, werr)
}

// finishMember is the end of a member's turn, its payload write returned
// with werr: it waits for batch b (leading it if nobody does) and returns
// the member's result. Caller holds im.mu.
func (im *Image) finishMember(b *allocBatch, m *diffMember, werr error) error {
	ag := &im.ag
	d := b.diff
	d.writing--
	if werr != nil {
		m.failed = true // the leader leaves it out and gives back what only it used
	}
	if ag.arrived != nil {
		ag.arrived(len(d.members))
	}
	ag.cond.Broadcast() // a leader may be waiting for the payload writes
	// Even a failed member waits for its batch (and leads it if nobody
	// does): its reservations stay pending until the batch is done, and a
	// writer waiting for them needs someone to finish it.
	im.awaitBatch(b)
	if werr != nil {
		return werr
	}
	if b.err != nil {
		return b.err
	}
	if m.retry {
		return errDiffRetry
	}
	return nil
}

// memberPages returns the keys of the bitmap pages m changes: those of its
// sectors, and for a fresh payload block those of the whole block, whose
// other bits are cleared (the spec does not consult the bitmap of a
// NOT_PRESENT block, so bits left from an earlier life of the block must
// not expose the fresh block's zeros).
func (im *Image) memberPages(m *diffMember) []uint64 {
	lo, hi := m.clearRange(&im.l)
	perChunk := im.l.chunkRatio * im.l.sectorsPerBlock()
	first, last := (lo%perChunk)/bitmapPageBits, (hi%perChunk)/bitmapPageBits
	keys := make([]uint64, 0, last-first+1)
	for page := first; page <= last; page++ {
		keys = append(keys, m.chunk*bitmapPagesPerBlk+page)
	}
	return keys
}

// clearRange is the sector range whose bitmap pages m touches: its own
// sectors, or its whole block when the block is fresh.
func (m *diffMember) clearRange(l *layout) (lo, hi uint64) {
	if !m.newPay {
		return m.first, m.last
	}
	spb := l.sectorsPerBlock()
	lo = (m.first / spb) * spb
	return lo, lo + spb - 1
}

// diffRes returns the batch's differencing reservations, set up on first
// use.
func (b *allocBatch) diffRes() *diffReservations {
	if b.diff == nil {
		b.diff = &diffReservations{pay: map[uint64]uint64{}, sb: map[uint64]uint64{},
			pages: map[uint64]bool{}, full: map[uint64]*fullBlock{}}
	}
	return b.diff
}

// diffCommit is a differencing batch built for its commit: the entry's
// updates and what to publish after it.
type diffCommit struct {
	updates []logUpdate
	pages   []logUpdate // bitmap pages, also the first len(pages) updates
	keys    []uint64    // their cache keys
	sbs     []batChange // bitmap entries to publish
	pays    []batChange // payload entries to publish (PARTIALLY_PRESENT)
	fulls   []batChange // payload entries to publish (FULLY_PRESENT)
	fresh   int         // blocks of fulls the batch reserved
	spans   []ownedSpan // reservations the entry names, in file order
}

// buildDiffBatch drops the members that failed or whose block changed,
// gives back reservations no member is left to use, and builds the entry.
// Caller holds im.mu, as leader, with every payload write returned. On an
// error, dc.spans still lists the reservations the entry would have named.
func (im *Image) buildDiffBatch(d *diffReservations) (*diffCommit, error) {
	l := &im.l
	livePay := map[uint64]bool{}
	liveSB := map[uint64]bool{}
	liveFull := map[uint64]bool{}
	var live, bitMembers []*diffMember
	for _, m := range d.members {
		if m.failed {
			continue
		}
		cur := im.bat.load(m.idx)
		if m.full {
			// A discard changed the block meanwhile: start over.
			if cur != d.full[m.idx].entry {
				m.retry = true
				continue
			}
			live = append(live, m)
			liveFull[m.idx] = true
			continue
		}
		if m.newPay && batState(cur) != stateNotPresent || !m.newPay && cur != m.entry {
			m.retry = true
			continue
		}
		live = append(live, m)
		bitMembers = append(bitMembers, m)
		if m.newPay {
			livePay[m.idx] = true
		}
		if _, ok := d.sb[m.chunk]; ok {
			liveSB[m.chunk] = true
		}
	}
	dc := &diffCommit{}
	var dead []ownedSpan
	for idx, off := range d.pay {
		if livePay[idx] {
			dc.pays = append(dc.pays, batChange{idx: idx, new: makeBATEntry(statePartiallyPresent, off)})
			dc.spans = append(dc.spans, im.blockSpan(off))
		} else {
			dead = append(dead, im.blockSpan(off))
		}
	}
	for chunk, off := range d.sb {
		sp := ownedSpan{off, off + bitmapBlockSize}
		if liveSB[chunk] {
			dc.sbs = append(dc.sbs, batChange{idx: l.sbIndex(chunk), new: makeBATEntry(stateFullyPresent, off)})
			dc.spans = append(dc.spans, sp)
		} else {
			dead = append(dead, sp)
		}
	}
	for idx, fb := range d.full {
		switch {
		case liveFull[idx]:
			dc.fulls = append(dc.fulls, batChange{idx: idx, new: makeBATEntry(stateFullyPresent, fb.off)})
			if fb.fresh {
				dc.spans = append(dc.spans, im.blockSpan(fb.off))
				dc.fresh++
			}
		case fb.fresh:
			dead = append(dead, im.blockSpan(fb.off))
		}
	}
	byStart := func(x, y ownedSpan) int { return cmp.Compare(x.start, y.start) }
	slices.SortFunc(dead, byStart)
	slices.SortFunc(dc.spans, byStart)
	// Never named by an entry: free at once (nospace.go).
	im.giveBackAll(dead)
	if len(live) == 0 {
		return dc, nil
	}

	// Bitmap pages: published contents (or zeros in a fresh bitmap block),
	// fresh blocks' bits cleared, then every member's bits set.
	perChunk := l.chunkRatio * l.sectorsPerBlock()
	pages := map[uint64][]byte{}
	var keys []uint64
	for _, m := range bitMembers {
		for _, k := range im.memberPages(m) {
			if _, ok := pages[k]; ok {
				continue
			}
			buf := make([]byte, bitmapPageSize)
			if _, fresh := d.sb[m.chunk]; !fresh {
				sb := im.bat.load(l.sbIndex(m.chunk))
				if err := im.copyBitmapPage(buf, m.chunk, k%bitmapPagesPerBlk, sb); err != nil {
					return dc, err
				}
			}
			pages[k] = buf
			keys = append(keys, k)
		}
	}
	bits := func(m *diffMember, lo, hi uint64, op func([]byte, uint64, uint64)) {
		for _, k := range im.memberPages(m) {
			pageFirst := m.chunk*perChunk + (k%bitmapPagesPerBlk)*bitmapPageBits
			pageLast := pageFirst + bitmapPageBits - 1
			if lo <= pageLast && hi >= pageFirst {
				op(pages[k], max(lo, pageFirst)-pageFirst, min(hi, pageLast)-pageFirst)
			}
		}
	}
	for _, m := range bitMembers {
		if m.newPay {
			lo, hi := m.clearRange(l)
			bits(m, lo, hi, clearBits)
		}
	}
	for _, m := range bitMembers {
		bits(m, m.first, m.last, setBits)
	}
	slices.Sort(keys)
	for _, k := range keys {
		chunk, page := k/bitmapPagesPerBlk, k%bitmapPagesPerBlk
		sbOff, fresh := d.sb[chunk]
		if !fresh {
			sbOff = batFileOffset(im.bat.load(l.sbIndex(chunk)))
		}
		dc.pages = append(dc.pages, logUpdate{offset: sbOff + page*bitmapPageSize, data: pages[k]})
		dc.keys = append(dc.keys, k)
	}

	// BAT sectors: payload PARTIALLY_PRESENT or FULLY_PRESENT, bitmap
	// present.
	changes := slices.Concat(dc.pays, dc.fulls, dc.sbs)
	slices.SortFunc(changes, func(x, y batChange) int { return cmp.Compare(x.idx, y.idx) })
	bat, err := im.batchUpdates(changes, nil)
	if err != nil {
		return dc, err
	}
	dc.updates = append(slices.Clone(dc.pages), bat...)
	return dc, nil
}

// commitDiffBatch commits a differencing batch as its leader. Caller holds
// im.mu; it is released during the journal commit.
func (im *Image) commitDiffBatch(b *allocBatch) error {
	ag := &im.ag
	d := b.diff
	for d.writing > 0 {
		ag.cond.Wait() // the entry may go out only after every payload
	}
	dc, err := im.buildDiffBatch(d)
	if err == nil && len(dc.updates) == 0 {
		return nil // no member left to commit
	}
	fileEnd := im.fileEnd
	if err == nil {
		err = im.growTo(fileEnd)
	}
	untouched := true
	if err == nil {
		j := im.journal
		if ag.beforeDiffCommit != nil {
			ag.beforeDiffCommit()
		}
		im.mu.Unlock()
		untouched = false
		// presync: the members' payloads must be durable before the entry
		// that sets their bits (doc.go rules 2 and 6).
		_, err = j.commitBatch(dc.updates, fileEnd, fileEnd, true)
		if err != nil {
			untouched = errors.Is(err, errLogUntouched)
			err = fmt.Errorf("differencing batch of %d sector bitmap pages, %d new partial blocks, %d blocks made whole: commit through the log: %w",
				len(dc.pages), len(dc.pays), len(dc.fulls), err)
		}
		im.mu.Lock()
	}
	if err != nil {
		if untouched {
			// No entry can name the ranges (nospace.go): give them back.
			im.giveBackAll(dc.spans)
		}
		return err
	}
	// Publish: bitmap pages, then bitmap entries, then payload entries,
	// so a reader that sees PARTIALLY_PRESENT finds the bitmap.
	for i, k := range dc.keys {
		im.bitmaps.store(k, dc.pages[i].data)
	}
	for _, c := range dc.sbs {
		im.bat.store(c.idx, c.new)
	}
	for _, c := range slices.Concat(dc.pays, dc.fulls) {
		im.bat.store(c.idx, c.new)
	}
	im.batchCommitted(uint64(len(dc.pays)+dc.fresh), fileEnd)
	return nil
}
