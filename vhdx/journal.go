package vhdx

// The journal: metadata updates written through the log (MS-VHDX §2.3),
// one entry per commit. Reading and replaying the log is in log.go.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sync/atomic"

	"github.com/google/uuid"
)

// logUpdate is one metadata change to journal: a 4 KiB sector (data) or a
// zeroed range (data nil, zeroLength > 0). offset is 4 KiB aligned.
type logUpdate struct {
	offset     uint64
	data       []byte
	zeroLength uint64
}

// journal writes metadata updates through the log (§2.3: write the entry,
// flush, apply to the final offsets, flush), preceded by a flush of earlier
// writes (see doCommit).
//
// Each commit writes one entry whose Tail points to itself. That is correct
// because the entry's updates are applied and flushed before the next entry
// is written: commit flushes them before returning, commitBatch leaves
// that to the sync every commit starts with (doCommit), or holds them again. When the next entry
// is written no earlier entry has updates "yet to be written and flushed"
// (§2.3.2), so every sequence is that single entry.
// Replay after a crash therefore applies at most the last entry, which holds
// the complete update of one commit: the image shows the metadata of either
// the previous or the new commit, never a mix.
//
// Entries are placed one after another around the ring and never straddle
// its end (a reader must handle straddling, QEMU writes it, but we need not
// produce it). The one invariant placement keeps is that the entry of the
// previous commit is never overwritten before the new one is durable: if a
// crash tore the new entry while the previous one was damaged too, an older,
// stale entry would become the newest valid one and replay old metadata over
// newer. When the new entry fits neither after the previous one nor before
// it, a 4 KiB empty "bridge" entry (no descriptors) is written and flushed
// first, which makes the previous entry obsolete; at most two bridges are
// ever needed, which is why an entry may be at most one sector shorter than
// the log.
//
// Sequence numbers increase strictly. The caller gives a LogGuid it has just
// written to the header, so the log holds no entry with that GUID and the
// first entry is number 1. The first commit checks this by scanning the log
// (one read of the log per session) and, should the GUID have been used
// before, continues after the newest valid entry instead.
//
// A commit that fails after it may have written to the file leaves the
// journal pending (j.err): the caller keeps its in-memory state as it was
// before the failed commit, and the next commit (or Image.recoverLocked)
// first recovers (logrecover.go): it reads the log back to learn whether the
// failed entry reached it, then writes a compensating entry that puts the
// failed commit's targets back to their contents from before it. When the
// log does not read back as the journal left it, the journal goes dead and
// the image needs `vhost-vhdx check --repair` (j.dead).
// A commit that fails while reserving host space (nospace.go) has written
// nothing and leaves the journal usable.
//
// A journal is not safe for concurrent use; the caller serialises commits.
type journal struct {
	s  Storage
	lr logRegion

	scanned bool
	seq     uint64 // SequenceNumber of the newest entry with this GUID; 0: none
	prevPos uint32 // extent of that entry within the log
	prevLen uint32

	buf []byte // entry under construction, reused across commits
	run []byte // consecutive sectors being applied with one write, reused
	ap  logApplier
	err error // the failure recovery is pending for, nil if none

	space journalSpace // host space reserved so far (nospace.go)

	failed  *failedCommit // what the failed commit may have left (logrecover.go)
	dead    error         // recovery is not safe: every commit fails with it
	pending *atomic.Bool  // if set, mirrors err != nil for lock-free readers (Image.Flush)
	preBuf  []byte        // targets' contents before the apply, reused
	preList []logUpdate   // the updates restoring them, reused

	// deferred: the sectors the last commit wrote in place without a sync
	// (commitBatch), by file offset, as written;
	// deferredZero: it also zeroed a range. Cleared by every sync the
	// journal issues after them.
	deferred     map[uint64][]byte
	deferredZero bool
	skip         []bool // unchangedSectors' result, reused across commits

	commits    *atomic.Uint64 // if set, counts successful commits (Image.Counters)
	recoveries *atomic.Uint64 // if set, counts recoveries after a failed commit
}

// newJournal returns a journal for lr; lr.guid must already be in the
// current header.
func newJournal(s Storage, lr logRegion) *journal {
	return &journal{s: s, lr: lr, ap: logApplier{s: s, lr: lr}}
}

// commit journals updates, applies them and makes them durable. Updates are
// applied in order; later ones win where they overlap. flushedFileOffset and
// lastFileOffset go to the entry header (§2.3.1.1): the first must not
// exceed the current file size, both are multiples of 1 MiB, and the file is
// extended to lastFileOffset after the updates are applied, as replay would.
func (j *journal) commit(updates []logUpdate, flushedFileOffset, lastFileOffset uint64) error {
	_, err := j.commitMode(updates, flushedFileOffset, lastFileOffset, true, true)
	return err
}

// commitBatch is commit without the final sync: the updates are written in
// place but not flushed. That is safe because the entry is durable and is
// the newest in the log, so replay after a crash writes them again; the
// next commit's entry either holds them again or follows a sync, and a
// Flush or Close syncs too. It may also skip the sync before the entry
// (presync false): the caller vouches that the entry depends on nothing
// unsynced (its FlushedFileOffset is a durable size, no range it points to
// needs zeroing to be durable first). The updates left unsynced by the
// previous commit must then be durable before this entry can become the
// newest: the journal syncs first unless this entry holds every one of
// them again (the same sectors, with current contents), in which case
// replaying this entry alone restores them. It reports whether it synced
// before writing the entry. Allocation batches use it (groupcommit.go).
func (j *journal) commitBatch(updates []logUpdate, flushedFileOffset, lastFileOffset uint64, presync bool) (bool, error) {
	return j.commitMode(updates, flushedFileOffset, lastFileOffset, false, presync)
}

// deferredSectors returns the file offsets of the 4 KiB sectors the last
// commit wrote in place without a sync (nil if none, or if it zeroed a
// range, which no entry can hold again).
func (j *journal) deferredSectors() []uint64 {
	if j.deferredZero {
		return nil
	}
	offs := make([]uint64, 0, len(j.deferred))
	for off := range j.deferred {
		offs = append(offs, off)
	}
	slices.Sort(offs)
	return offs
}

func (j *journal) commitMode(updates []logUpdate, flushedFileOffset, lastFileOffset uint64, syncApplied, presync bool) (bool, error) {
	if j.err != nil {
		if err := j.recover(); err != nil {
			return false, err
		}
	}
	entryLen, dataCount, err := j.checkCommit(updates, flushedFileOffset, lastFileOffset)
	if err != nil {
		return false, err
	}
	if err := j.reserve(updates); err != nil {
		// Nothing was written: the journal stays usable (nospace.go).
		return false, fmt.Errorf("log: commit: %w (%w)", err, errLogUntouched)
	}
	if !presync && !j.holdsDeferred(updates) {
		presync = true
	}
	if err := j.doCommit(updates, entryLen, dataCount, flushedFileOffset, lastFileOffset, syncApplied, presync); err != nil {
		j.noteFailure(err, flushedFileOffset, lastFileOffset)
		return presync, err
	}
	if j.commits != nil {
		j.commits.Add(1)
	}
	return presync, nil
}

// holdsDeferred reports whether updates rewrite every sector the previous
// commit left unsynced.
func (j *journal) holdsDeferred(updates []logUpdate) bool {
	if j.deferredZero {
		return false
	}
	for off := range j.deferred {
		found := false
		for _, u := range updates {
			if u.data != nil && u.offset == off {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// checkCommit validates the arguments without touching the file and returns
// the entry length and the number of data descriptors.
func (j *journal) checkCommit(updates []logUpdate, flushed, last uint64) (uint64, uint64, error) {
	inval := func(format string, args ...any) (uint64, uint64, error) {
		return 0, 0, fmt.Errorf("log: commit: %s: %w", fmt.Sprintf(format, args...), ErrInvalidArgument)
	}
	if j.lr.guid == uuid.Nil {
		return inval("the log GUID is zero")
	}
	if j.lr.length == 0 || j.lr.length%logMiB != 0 {
		return inval("log length %#x is not a non-zero multiple of 1 MiB", j.lr.length)
	}
	if flushed%logMiB != 0 || last%logMiB != 0 || last > math.MaxInt64 {
		return inval("FlushedFileOffset %#x / LastFileOffset %#x not multiples of 1 MiB", flushed, last)
	}
	if uint64(len(updates)) > math.MaxUint32 {
		return inval("%d updates", len(updates))
	}
	var dataCount uint64
	for i, u := range updates {
		n := u.zeroLength
		if u.data != nil {
			if len(u.data) != logSectorSize || u.zeroLength != 0 {
				return inval("update %d: data must be exactly 4096 bytes with no zero length", i)
			}
			n = logSectorSize
			dataCount++
		} else if u.zeroLength == 0 || u.zeroLength%logSectorSize != 0 {
			return inval("update %d: zero length %#x is not a non-zero multiple of 4 KiB", i, u.zeroLength)
		}
		if u.offset%logSectorSize != 0 {
			return inval("update %d: offset %#x is not 4 KiB aligned", i, u.offset)
		}
		if _, why := checkTarget(j.lr, u.offset, n); why != "" {
			return inval("update %d at %#x: %s", i, u.offset, why)
		}
	}
	entryLen := (logDescSectors(uint64(len(updates))) + dataCount) * logSectorSize
	if entryLen > uint64(j.lr.length)-logSectorSize {
		return inval("entry of %#x bytes does not fit a log of %#x bytes less one sector", entryLen, j.lr.length)
	}
	size, err := j.s.Size()
	if err != nil {
		return 0, 0, fmt.Errorf("log: commit: file size: %w", err)
	}
	if size < 0 || flushed > uint64(size) {
		return inval("FlushedFileOffset %#x exceeds the file size %#x", flushed, size)
	}
	return entryLen, dataCount, nil
}

func (j *journal) doCommit(updates []logUpdate, entryLen, dataCount, flushed, last uint64, syncApplied, presync bool) error {
	j.failed = nil // set below once the file may have been written
	if !j.scanned {
		if err := j.scan(); err != nil {
			return err
		}
		j.scanned = true
	}
	// What the previous commit wrote in place; durable once this entry's
	// sync (below) returns, so sectors rewritten with the same contents
	// need no second in-place write.
	skip := unchangedSectors(updates, j.deferred, j.skip[:0])
	j.skip = skip
	// Flush first, as QEMU does before every log write: the entry must not
	// become durable before the file size it records as FlushedFileOffset
	// (§2.3.1.1: that size "must have been stable on the host disk"), nor
	// before payload data that the updated metadata will point to, nor
	// before the previous commit's deferred updates. commitBatch skips it
	// when its caller and holdsDeferred showed none of these can matter.
	if presync {
		if err := j.s.Sync(); err != nil {
			return fmt.Errorf("log: commit: sync before writing the entry: %w", err)
		}
		j.deferred, j.deferredZero = nil, false
	}
	pos, err := j.place(uint32(entryLen), flushed, last)
	if err != nil {
		return err
	}
	b := j.buildEntry(updates, pos, uint32(entryLen), dataCount, flushed, last)
	if err := j.writeEntry(b, pos); err != nil {
		return err
	}
	// The entry is durable. Keep the targets' contents from before the
	// apply: should it fail part-way, recovery writes them back.
	pre, noPre, err := j.preimages(updates)
	if err != nil {
		j.failed = &failedCommit{}
		return err
	}
	if err := j.apply(updates, last, skip, syncApplied); err != nil {
		j.failed = &failedCommit{applyStarted: true, pre: pre, noPre: noPre}
		return err
	}
	return nil
}

// apply writes the updates of a durable entry to their final offsets,
// extends the file to last and syncs (§2.3: apply, then flush).
func (j *journal) apply(updates []logUpdate, last uint64, skip []bool, syncApplied bool) error {
	size, err := j.s.Size()
	if err != nil {
		return fmt.Errorf("log: commit: file size: %w", err)
	}
	j.ap.size = uint64(size)
	for i := 0; i < len(updates); {
		u := updates[i]
		if u.data == nil {
			if err := j.ap.zeroRange(u.offset, u.zeroLength); err != nil {
				return err
			}
			i++
			continue
		}
		if skip[i] {
			i++
			continue
		}
		// Consecutive data updates to consecutive sectors go out as one
		// write. Order is kept: only neighbours in the list are merged, and
		// a run of ascending sectors cannot overlap itself.
		k := i + 1
		for k < len(updates) && updates[k].data != nil && !skip[k] && updates[k].offset == updates[k-1].offset+logSectorSize {
			k++
		}
		w := u.data
		if k > i+1 {
			w = j.run[:0]
			for _, v := range updates[i:k] {
				w = append(w, v.data...)
			}
			j.run = w
		}
		if err := j.ap.writeSector(w, u.offset); err != nil {
			return err
		}
		i = k
	}
	if err := j.ap.extend(last); err != nil {
		return err
	}
	if !syncApplied {
		// Deferred: the next sync makes the updates durable; until then
		// the next entry must hold them again or follow a sync.
		for i, u := range updates {
			switch {
			case u.data == nil:
				j.deferredZero = true
			case !skip[i]:
				if j.deferred == nil {
					j.deferred = map[uint64][]byte{}
				}
				j.deferred[u.offset] = u.data
			}
		}
		return nil
	}
	if err := j.s.Sync(); err != nil {
		return fmt.Errorf("log: commit: sync after apply: %w", err)
	}
	return nil
}

// unchangedSectors marks the data updates that rewrite a sector with what
// prev (the previous commit's in-place writes) holds for it, where every
// update of that sector in the list does so; none when the list zeroes a
// range, which might overlap.
func unchangedSectors(updates []logUpdate, prev map[uint64][]byte, skip []bool) []bool {
	skip = append(skip, make([]bool, len(updates))...) // no allocation once skip has room
	if len(prev) == 0 {
		return skip
	}
	differs := map[uint64]bool{}
	for _, u := range updates {
		if u.data == nil {
			return skip
		}
		if p, ok := prev[u.offset]; !ok || !bytes.Equal(p, u.data) {
			differs[u.offset] = true
		}
	}
	for i, u := range updates {
		skip[i] = !differs[u.offset]
	}
	return skip
}

// scan finds the newest valid entry with this GUID, if any (see journal).
func (j *journal) scan() error {
	sc, err := newLogScan(j.s, j.lr)
	if err != nil {
		return err
	}
	for p := uint32(0); p < sc.sectors; p++ {
		n, err := sc.node(p * logSectorSize)
		if err != nil {
			return err
		}
		if n.valid && n.e.seq > j.seq {
			j.seq, j.prevPos, j.prevLen = n.e.seq, n.e.pos, n.e.length
		}
	}
	if j.seq > math.MaxUint64-4 {
		return errAt(ErrCorrupt, j.lr.offset, "log", "sequence numbers exhausted")
	}
	return nil
}

// fits reports whether an entry of n bytes at pos stays before the end of
// the log and clear of the previous entry (a circular extent).
func (j *journal) fits(pos, n uint32) bool {
	length := uint64(j.lr.length)
	if uint64(pos)+uint64(n) > length {
		return false
	}
	if j.seq == 0 {
		return true
	}
	// Offset of pos relative to the previous entry's start, on the ring.
	rel := (uint64(pos) + length - uint64(j.prevPos)) % length
	if rel < uint64(j.prevLen) {
		return false // pos lies inside the previous entry
	}
	return rel+uint64(n) <= length // and the entry ends before wrapping onto it
}

// place chooses where the next entry of n bytes goes, writing bridge entries
// when needed (see journal).
func (j *journal) place(n uint32, flushed, last uint64) (uint32, error) {
	for bridges := 0; ; bridges++ {
		next := uint32(0)
		if j.seq != 0 {
			next = uint32((uint64(j.prevPos) + uint64(j.prevLen)) % uint64(j.lr.length))
		}
		switch {
		case j.fits(next, n):
			return next, nil
		case j.fits(0, n):
			return 0, nil
		case bridges == 2:
			// Unreachable while n ≤ log length − 4 KiB (see journal).
			return 0, fmt.Errorf("log: no room for an entry of %#x bytes: %w", n, ErrInvalidArgument)
		}
		at := next
		if j.fits(0, logSectorSize) {
			at = 0
		} else if !j.fits(next, logSectorSize) {
			return 0, errAt(ErrCorrupt, j.lr.offset, "log", "the newest entry fills the whole log")
		}
		if len(j.deferred) > 0 || j.deferredZero {
			// A bridge holds no updates: once it is the newest entry,
			// replay no longer restores the previous commit's deferred
			// ones, so they must be durable before it is.
			if err := j.s.Sync(); err != nil {
				return 0, fmt.Errorf("log: commit: sync before a bridge entry: %w", err)
			}
			j.deferred, j.deferredZero = nil, false
		}
		b := j.buildEntry(nil, at, logSectorSize, 0, flushed, last)
		if err := j.writeEntry(b, at); err != nil { // flushed before the real entry may overwrite the previous one
			return 0, err
		}
	}
}

// writeEntry writes a built entry and makes it durable, then records it as
// the previous entry.
func (j *journal) writeEntry(b []byte, pos uint32) error {
	off := j.lr.offset + uint64(pos)
	if _, err := j.s.WriteAt(b, int64(off)); err != nil {
		j.failed = &failedCommit{entryUnsure: true, pos: pos, length: uint32(len(b))}
		return fmt.Errorf("log: write entry at offset %#x: %w", off, err)
	}
	if err := j.s.Sync(); err != nil {
		j.failed = &failedCommit{entryUnsure: true, pos: pos, length: uint32(len(b))}
		return fmt.Errorf("log: commit: sync entry at offset %#x: %w", off, err)
	}
	// That sync also made the previous commit's deferred updates durable
	// (they were written before it), so no later entry needs to hold them.
	j.deferred, j.deferredZero = nil, false
	j.seq++
	j.prevPos, j.prevLen = pos, uint32(len(b))
	return nil
}

// buildEntry lays out the entry with sequence number j.seq+1 in j.buf
// (§2.3.1): header and descriptors, then one data sector per data update
// with its first 8 and last 4 bytes moved into the descriptor.
func (j *journal) buildEntry(updates []logUpdate, pos, entryLen uint32, dataCount, flushed, last uint64) []byte {
	le := binary.LittleEndian
	seq := j.seq + 1
	if cap(j.buf) < int(entryLen) {
		j.buf = make([]byte, entryLen)
	}
	b := j.buf[:entryLen]
	clear(b)
	copy(b[logHdrOffSignature:], logSigEntry)
	le.PutUint32(b[logHdrOffEntryLength:], entryLen)
	le.PutUint32(b[logHdrOffTail:], pos) // every entry is its own tail (see journal)
	le.PutUint64(b[logHdrOffSequence:], seq)
	le.PutUint32(b[logHdrOffDescCount:], uint32(len(updates)))
	guidToDisk(b[logHdrOffLogGUID:], j.lr.guid)
	le.PutUint64(b[logHdrOffFlushed:], flushed)
	le.PutUint64(b[logHdrOffLast:], last)

	dataStart := int(entryLen) - int(dataCount)*logSectorSize
	ds := dataStart
	for i, u := range updates {
		// Descriptor i sits in slot i+2 counting the header's two slots;
		// slots run on across descriptor sectors, 128 per sector.
		d := b[(i+logHeaderDescSlots)*logDescriptorSize:][:logDescriptorSize]
		le.PutUint64(d[logDescOffFileOff:], u.offset)
		le.PutUint64(d[logDescOffSequence:], seq)
		if u.data == nil {
			copy(d[logDescOffSignature:], logSigZero)
			le.PutUint64(d[logDescOffZeroLen:], u.zeroLength)
			continue
		}
		copy(d[logDescOffSignature:], logSigDesc)
		copy(d[logDescOffLeading:logDescOffLeading+logLeadingLen], u.data[:logLeadingLen])
		copy(d[logDescOffTrailing:logDescOffTrailing+logTrailingLen], u.data[logDataTrailingOff:])
		sec := b[ds : ds+logSectorSize]
		copy(sec[logDataOffSig:], logSigData)
		le.PutUint32(sec[logDataOffSeqHigh:], uint32(seq>>32))
		copy(sec[logDataOffData:logDataOffSeqLow], u.data[logDataOffData:logDataOffSeqLow])
		le.PutUint32(sec[logDataOffSeqLow:], uint32(seq))
		ds += logSectorSize
	}
	putChecksum(b, logHdrOffChecksum)
	return b
}
