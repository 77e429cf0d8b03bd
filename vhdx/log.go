package vhdx

// The metadata log (MS-VHDX §2.3): entry parsing, the search for the active
// sequence and replay. The journal that writes one entry per metadata
// commit is in journal.go.
//
// Every number read from the log is file data. The rules that keep a hostile
// log harmless are:
//
//   - The log is read one 4 KiB sector at a time; an entry is never buffered
//     whole, so EntryLength and DescriptorCount never size an allocation.
//     EntryLength is bounded by the log length before any sector past the
//     first is read, and DescriptorCount by EntryLength.
//   - Each log position is validated at most once (memoised), and every loop
//     over positions, chains or descriptors has a bound derived from the log
//     length, so the search is O(log length) sector reads and terminates on
//     any input.
//   - Replay refuses descriptors that would overwrite the file identifier, the
//     headers or the log itself.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"

	"github.com/google/uuid"
)

// Log geometry (§2.3.1).
const (
	logSectorSize      = 4096
	logEntryHeaderSize = 64
	logDescriptorSize  = 32
	logDescsPerSector  = logSectorSize / logDescriptorSize      // 128
	logHeaderDescSlots = logEntryHeaderSize / logDescriptorSize // the header takes 2 slots: 126 descriptors fit in sector 0
	logZeroChunk       = 64 * 1024                              // zeroing writes at most this much at a time
	logMiB             = 1 << 20

	// logMinTarget: descriptors may not write below this offset. The file
	// identifier (first 64 KiB, §2.2.1: "MUST NOT overwrite") and both
	// headers (64 and 128 KiB, §2.2.2: "updates to the headers cannot be
	// made through the log") live there. The region tables at 192 and
	// 256 KiB stay writable: §2.2.3 requires their updates to go through the
	// log.
	logMinTarget = 192 * 1024
)

// Entry header layout (§2.3.1.1).
const (
	logSigEntry          = "loge"
	logHdrOffSignature   = 0
	logHdrOffChecksum    = 4
	logHdrOffEntryLength = 8
	logHdrOffTail        = 12
	logHdrOffSequence    = 16
	logHdrOffDescCount   = 24
	logHdrOffReserved    = 28 // written as 0, not checked on read (QEMU ignores it too)
	logHdrOffLogGUID     = 32
	logHdrOffFlushed     = 48
	logHdrOffLast        = 56
)

// Descriptor layout (§2.3.1.2 zero descriptor, §2.3.1.3 data descriptor).
const (
	logSigZero          = "zero"
	logSigDesc          = "desc"
	logDescOffSignature = 0
	logDescOffTrailing  = 4 // data: TrailingBytes; zero: Reserved
	logDescOffLeading   = 8 // data: LeadingBytes; zero: ZeroLength
	logDescOffZeroLen   = 8
	logDescOffFileOff   = 16
	logDescOffSequence  = 24
	logLeadingLen       = 8
	logTrailingLen      = 4
)

// Data sector layout (§2.3.1.4).
const (
	logSigData         = "data"
	logDataOffSig      = 0
	logDataOffSeqHigh  = 4
	logDataOffData     = 8
	logDataOffSeqLow   = logSectorSize - 4
	logDataTrailingOff = logSectorSize - logTrailingLen
)

// logRegion locates the log, from the current header (§2.2.2 LogOffset,
// LogLength, LogGuid).
type logRegion struct {
	offset uint64
	length uint32
	guid   uuid.UUID
}

// logEntry is the header of one entry that passed every check of §2.3.1.
type logEntry struct {
	pos         uint32 // offset of the entry within the log
	length      uint32 // EntryLength
	tail        uint32 // Tail
	seq         uint64 // SequenceNumber
	descCount   uint32 // DescriptorCount
	descSectors uint32 // 4 KiB sectors holding the header and descriptors
	flushed     uint64 // FlushedFileOffset
	last        uint64 // LastFileOffset
}

// logDescSectors is the number of descriptor sectors for n descriptors: the
// first sector holds the 64-byte header and 126 descriptors, each further one
// 128 (§2.3.1). Never 0. Computed in uint64 so any uint32 count is safe.
func logDescSectors(n uint64) uint64 {
	return (n + logHeaderDescSlots + logDescsPerSector - 1) / logDescsPerSector
}

// logReader reads sectors of a circular log. The log is a ring (§2.3: "a
// single circular buffer"): QEMU's writer lets an entry run past the end of
// the log and continue at its start, so sector i of an entry is read modulo
// the log length.
type logReader struct {
	s   Storage
	lr  logRegion
	sec [logSectorSize]byte // descriptor / scratch sector
	dat [logSectorSize]byte // data sector during replay
}

// sectorOff is the file offset of sector i of the entry at pos. pos < length
// and i < length/4096, so the sum stays below 2^33 before the modulo.
func (r *logReader) sectorOff(pos, i uint32) uint64 {
	rel := (uint64(pos) + uint64(i)*logSectorSize) % uint64(r.lr.length)
	return r.lr.offset + rel
}

func (r *logReader) readSector(b []byte, pos, i uint32) (uint64, error) {
	off := r.sectorOff(pos, i)
	return off, readFull(r.s, b, off, "log sector")
}

// checkLogRegion validates lr against the file once, so that every later
// read stays inside the file (the core validates the header too; this keeps
// the log code safe on its own, e.g. under fuzzing).
func checkLogRegion(s Storage, lr logRegion) error {
	if lr.length == 0 || lr.length%logMiB != 0 {
		return errAt(ErrCorrupt, lr.offset, "log", "length %#x is not a non-zero multiple of 1 MiB (§2.2.2)", lr.length)
	}
	if lr.offset < logMiB || lr.offset%logMiB != 0 {
		return errAt(ErrCorrupt, lr.offset, "log", "offset is not a multiple of 1 MiB after the header section (§2.2.2)")
	}
	size, err := s.Size()
	if err != nil {
		return fmt.Errorf("log: file size: %w", err)
	}
	if size < 0 || lr.offset > uint64(size) || uint64(lr.length) > uint64(size)-lr.offset {
		return errAt(ErrCorrupt, lr.offset, "log", "log of %#x bytes extends past the end of the file (size %#x)", lr.length, size)
	}
	return nil
}

// parseEntry validates the entry starting at pos against every rule of
// §2.3.1 and returns its header. An invalid entry yields an error wrapping
// ErrCorrupt that names the rule; any other error is an I/O failure.
//
// The checks run in one pass, cheapest first per sector, and the CRC-32C over
// EntryLength bytes (checksum field zeroed) is accumulated sector by sector.
func (r *logReader) parseEntry(pos uint32) (logEntry, error) {
	le := binary.LittleEndian
	b := r.sec[:]
	hdrOff, err := r.readSector(b, pos, 0)
	if err != nil {
		return logEntry{}, err
	}
	bad := func(off uint64, format string, args ...any) (logEntry, error) {
		return logEntry{}, errAt(ErrCorrupt, off, "log entry", format, args...)
	}
	if string(b[logHdrOffSignature:logHdrOffSignature+4]) != logSigEntry {
		return bad(hdrOff, "signature %q is not %q (§2.3.1.1)", b[:4], logSigEntry)
	}
	e := logEntry{
		pos:       pos,
		length:    le.Uint32(b[logHdrOffEntryLength:]),
		tail:      le.Uint32(b[logHdrOffTail:]),
		seq:       le.Uint64(b[logHdrOffSequence:]),
		descCount: le.Uint32(b[logHdrOffDescCount:]),
		flushed:   le.Uint64(b[logHdrOffFlushed:]),
		last:      le.Uint64(b[logHdrOffLast:]),
	}
	stored := storedChecksum(b, logHdrOffChecksum)
	if e.length < logSectorSize || e.length%logSectorSize != 0 || e.length > r.lr.length {
		return bad(hdrOff, "EntryLength %#x is not a multiple of 4 KiB between 4 KiB and the log length %#x (§2.3.1.1)", e.length, r.lr.length)
	}
	if e.tail%logSectorSize != 0 || e.tail >= r.lr.length {
		return bad(hdrOff, "Tail %#x is not a multiple of 4 KiB inside the log (§2.3.1.1)", e.tail)
	}
	if e.seq == 0 {
		return bad(hdrOff, "SequenceNumber is 0 (§2.3.1.1: must be larger than zero)")
	}
	if g := guidFromDisk(b[logHdrOffLogGUID:]); g != r.lr.guid {
		return bad(hdrOff, "LogGuid %s does not match the header's %s (§2.3.1.1)", g, r.lr.guid)
	}
	if e.flushed%logMiB != 0 || e.last%logMiB != 0 {
		return bad(hdrOff, "FlushedFileOffset %#x or LastFileOffset %#x is not a multiple of 1 MiB (§2.3.1.1)", e.flushed, e.last)
	}
	total := uint64(e.length / logSectorSize)
	descSectors := logDescSectors(uint64(e.descCount))
	if descSectors > total {
		return bad(hdrOff, "DescriptorCount %d needs %d descriptor sectors but EntryLength holds %d sectors (§2.3.1)", e.descCount, descSectors, total)
	}
	e.descSectors = uint32(descSectors) // ≤ total ≤ 2^20

	crc := checksumWithFieldZeroed(b, logHdrOffChecksum)
	var dataDescs uint64
	var idx uint32
	for s := uint32(0); s < e.descSectors; s++ {
		secOff := hdrOff
		first := logHeaderDescSlots
		if s > 0 {
			if secOff, err = r.readSector(b, pos, s); err != nil {
				return logEntry{}, err
			}
			crc = crc32.Update(crc, castagnoli, b)
			first = 0
		}
		for slot := first; slot < logDescsPerSector && idx < e.descCount; slot++ {
			d := b[slot*logDescriptorSize : (slot+1)*logDescriptorSize]
			dOff := secOff + uint64(slot*logDescriptorSize)
			if sq := le.Uint64(d[logDescOffSequence:]); sq != e.seq {
				return bad(dOff, "descriptor %d SequenceNumber %d does not match the entry's %d (§2.3.1.2, §2.3.1.3)", idx, sq, e.seq)
			}
			if fo := le.Uint64(d[logDescOffFileOff:]); fo%logSectorSize != 0 {
				return bad(dOff, "descriptor %d FileOffset %#x is not a multiple of 4 KiB", idx, fo)
			}
			switch string(d[logDescOffSignature : logDescOffSignature+4]) {
			case logSigZero:
				if zl := le.Uint64(d[logDescOffZeroLen:]); zl%logSectorSize != 0 {
					return bad(dOff, "zero descriptor %d ZeroLength %#x is not a multiple of 4 KiB (§2.3.1.2)", idx, zl)
				}
			case logSigDesc:
				dataDescs++
			default:
				return bad(dOff, "descriptor %d signature %q is neither %q nor %q", idx, d[:4], logSigZero, logSigDesc)
			}
			idx++
		}
	}
	if dataSectors := total - descSectors; dataDescs != dataSectors {
		return bad(hdrOff, "%d data descriptors but EntryLength leaves %d data sectors (§2.3.1: must be equal)", dataDescs, dataSectors)
	}
	for s := e.descSectors; uint64(s) < total; s++ {
		secOff, err := r.readSector(b, pos, s)
		if err != nil {
			return logEntry{}, err
		}
		if err := checkDataSector(b, e.seq); err != nil {
			return bad(secOff, "data sector %d: %v", s-e.descSectors, err)
		}
		crc = crc32.Update(crc, castagnoli, b)
	}
	if crc != stored {
		return bad(hdrOff, "checksum %#x does not match computed %#x (§2.3.1.1)", stored, crc)
	}
	return e, nil
}

// checkDataSector checks a data sector's signature and split sequence number
// (§2.3.1.4). The returned error is only a reason; the caller wraps it.
func checkDataSector(b []byte, seq uint64) error {
	le := binary.LittleEndian
	if string(b[logDataOffSig:logDataOffSig+4]) != logSigData {
		return fmt.Errorf("signature %q is not %q (§2.3.1.4)", b[:4], logSigData)
	}
	hi, lo := le.Uint32(b[logDataOffSeqHigh:]), le.Uint32(b[logDataOffSeqLow:])
	if hi != uint32(seq>>32) || lo != uint32(seq) {
		return fmt.Errorf("SequenceHigh/Low %#x/%#x do not match the entry's %d (§2.3.1.4)", hi, lo, seq)
	}
	return nil
}

// logNode is the memoised verdict on one log position and, once resolved,
// where the chain of consecutive entries starting there ends.
type logNode struct {
	e     logEntry
	valid bool

	resolved bool
	end      uint32 // pos of the last entry of the chain starting here
	depth    uint32 // entries in that chain, this one included
}

// logScan searches the log for the active sequence (§2.3.3).
//
// A chain is a run of valid entries, each starting where the previous one
// ends (modulo the log length) with a SequenceNumber one greater (§2.3.2).
// Valid entries never overlap: every sector of a valid entry after the first
// starts with a descriptor or data signature, never "loge", so no other valid
// entry can start inside it. Hence at most one valid entry ends at any
// position, chains never merge, and "entry T lies in the chain starting at
// S" is exactly "T and S end at the same head and T is no further from it".
// That lets the steps of §2.3.3 run with one pass over the positions instead
// of re-walking a chain for every tail candidate.
type logScan struct {
	r       logReader
	sectors uint32 // log length / 4 KiB
	nodes   map[uint32]*logNode
}

func newLogScan(s Storage, lr logRegion) (*logScan, error) {
	if err := checkLogRegion(s, lr); err != nil {
		return nil, err
	}
	return &logScan{
		r:       logReader{s: s, lr: lr},
		sectors: lr.length / logSectorSize,
		nodes:   make(map[uint32]*logNode),
	}, nil
}

// node returns the memoised verdict for the entry at pos (a 4 KiB multiple
// below the log length).
func (sc *logScan) node(pos uint32) (*logNode, error) {
	if n, ok := sc.nodes[pos]; ok {
		return n, nil
	}
	// Most positions of a log hold no entry at all (an empty or old log
	// sector). Their verdict costs a read and no allocation: no message
	// is formatted and nothing is memoised (a position is looked at again
	// only as the successor of a valid entry).
	if ok, err := sc.r.hasEntrySignature(pos); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return &noEntry, nil
	}
	e, err := sc.r.parseEntry(pos)
	n := &logNode{e: e, valid: err == nil}
	if err != nil && !errors.Is(err, ErrCorrupt) {
		return nil, err // I/O error: not a verdict on the entry
	}
	sc.nodes[pos] = n
	return n, nil
}

// noEntry is the verdict on every position without an entry signature.
// Shared and never modified: only valid nodes are resolved.
var noEntry = logNode{}

// hasEntrySignature reports whether the sector at pos starts with "loge"
// (§2.3.1.1), reading it into r.sec.
func (r *logReader) hasEntrySignature(pos uint32) (bool, error) {
	b := r.sec[:]
	if _, err := r.readSector(b, pos, 0); err != nil {
		return false, err
	}
	return string(b[logHdrOffSignature:logHdrOffSignature+4]) == logSigEntry, nil
}

// succ returns the entry that extends the chain after n (§2.3.3 step 3), or
// nil. A whole-log entry ends where it starts and its own sequence number
// cannot follow itself, so it has no successor.
func (sc *logScan) succ(n *logNode) (*logNode, error) {
	next := uint32((uint64(n.e.pos) + uint64(n.e.length)) % uint64(sc.r.lr.length))
	m, err := sc.node(next)
	if err != nil || !m.valid || n.e.seq == math.MaxUint64 || m.e.seq != n.e.seq+1 {
		return nil, err
	}
	return m, nil
}

// resolve computes end and depth for the chain starting at start. Every
// position enters a chain at most once, so the total work over a scan is
// O(log sectors); the step bound only guards against a broken invariant.
func (sc *logScan) resolve(start *logNode) error {
	var path []*logNode
	n := start
	for !n.resolved {
		if uint32(len(path)) > sc.sectors {
			return errAt(ErrCorrupt, sc.r.lr.offset+uint64(start.e.pos), "log entry", "chain longer than the log has sectors")
		}
		path = append(path, n)
		m, err := sc.succ(n)
		if err != nil {
			return err
		}
		if m == nil {
			n.resolved, n.end, n.depth = true, n.e.pos, 1
			path = path[:len(path)-1]
			break
		}
		n = m
	}
	for i := len(path) - 1; i >= 0; i-- {
		p := path[i]
		p.resolved, p.end, p.depth = true, n.end, n.depth+1
		n = p
	}
	return nil
}

// contains reports whether the entry at pos is in the chain starting at s.
func (sc *logScan) contains(s *logNode, pos uint32) bool {
	t, ok := sc.nodes[pos]
	return ok && t.valid && t.resolved && t.end == s.end && t.depth <= s.depth
}

// findActive runs §2.3.3 steps 1–7 and returns the tail and head entries of
// the active sequence, or nil if there is none.
//
// Step 7 stops "when the current tail is less than the old tail", i.e. once
// the tail wraps. We stop as soon as the unwrapped tail reaches the log
// length: that is the same test, except that it also stops when a sequence
// covers the whole log and the tail wraps back onto itself, where the literal
// step would scan forever. Every iteration advances by at least 4 KiB, so
// there are at most (log length / 4 KiB) iterations.
//
// The returned tail is the head entry's Tail (§2.3.2: the head "points to the
// oldest entry ... that has the updates yet to be written"), which step 4
// guarantees is in the sequence. Entries before it were already applied and
// flushed, so they are not replayed. QEMU replays from the start of the chain
// instead; for entries written by QEMU and by us (every Tail points to its own
// entry, and each entry is flushed before the next) the result is the same.
func (sc *logScan) findActive() (tail, head *logNode, err error) {
	length := uint64(sc.r.lr.length)
	var candSeq uint64 // step 1: the empty candidate has sequence number 0
	for cur := uint64(0); cur < length; {
		advance := uint64(logSectorSize) // step 6 for an empty or invalid sequence
		n, err := sc.node(uint32(cur))   // step 2-3: the sequence starting at the current tail
		if err != nil {
			return nil, nil, err
		}
		if n.valid {
			if err := sc.resolve(n); err != nil {
				return nil, nil, err
			}
			h := sc.nodes[n.end]
			if sc.contains(n, h.e.tail) { // step 4
				if h.e.seq > candSeq { // step 5
					candSeq, tail, head = h.e.seq, sc.nodes[h.e.tail], h
				}
				// Step 6: continue at the sequence's head, the end of its last
				// entry. Chains do not overlap themselves, so the span is at
				// most the log length.
				advance = (uint64(h.e.pos)+length-uint64(n.e.pos))%length + uint64(h.e.length)
			}
		}
		cur += advance
	}
	return tail, head, nil
}

// hasActiveLog reports whether the log holds an active sequence that must be
// replayed (§2.3.3). A zero LogGuid means the log is empty (§2.2.2); a zero
// LogLength is treated the same way, as QEMU does.
func hasActiveLog(s Storage, lr logRegion) (bool, error) {
	_, _, head, err := findActiveLog(s, lr)
	return head != nil, err
}

// findActiveLog scans the log for its active sequence (§2.3.3): nil nodes
// when there is none, and no scan at all when the log is empty (a zero
// LogGuid or LogLength, as hasActiveLog says).
func findActiveLog(s Storage, lr logRegion) (sc *logScan, tail, head *logNode, err error) {
	if lr.guid == uuid.Nil || lr.length == 0 {
		return nil, nil, nil, nil
	}
	if sc, err = newLogScan(s, lr); err != nil {
		return nil, nil, nil, err
	}
	tail, head, err = sc.findActive()
	return sc, tail, head, err
}

// replayLog finds the active sequence and replays it (§2.3.3), then makes the
// result durable. It reports whether anything was replayed.
//
// No valid sequence is not an error, although §2.3.3 calls the file corrupt:
// it is exactly the state after a crash between writing a new LogGuid to the
// header and flushing the first entry, and QEMU opens such files too.
//
// A crash during replay is harmless: the log is untouched, so the next open
// replays it again, and replay is idempotent.
func replayLog(s Storage, lr logRegion) (replayed bool, err error) {
	sc, tail, head, err := findActiveLog(s, lr)
	if err != nil || head == nil {
		return false, err
	}
	size, err := s.Size()
	if err != nil {
		return false, fmt.Errorf("log replay: file size: %w", err)
	}
	if size < 0 || uint64(size) < head.e.flushed {
		return false, errAt(ErrCorrupt, lr.offset+uint64(head.e.pos), "log entry",
			"file truncated: size %#x is less than the head entry's FlushedFileOffset %#x (§2.3.3)", size, head.e.flushed)
	}
	if head.e.last > math.MaxInt64 {
		return false, errAt(ErrCorrupt, lr.offset+uint64(head.e.pos), "log entry", "LastFileOffset %#x is beyond any possible file", head.e.last)
	}
	ap := logApplier{s: s, lr: lr, size: uint64(size)}
	// Two passes: the first only checks every descriptor's target, so that a
	// refused log leaves the file untouched; the second writes.
	for _, dry := range []bool{true, false} {
		n := tail
		for i := uint32(0); ; i++ {
			if i > sc.sectors {
				return false, errAt(ErrCorrupt, lr.offset+uint64(tail.e.pos), "log entry", "active sequence longer than the log has sectors")
			}
			if err := ap.replayEntry(&sc.r, n.e, dry); err != nil {
				return false, err
			}
			if n == head {
				break
			}
			if n, err = sc.succ(n); err != nil {
				return false, err
			}
			if n == nil { // cannot happen: the chain was resolved through head
				return false, errAt(ErrCorrupt, lr.offset+uint64(tail.e.pos), "log entry", "active sequence changed during replay")
			}
		}
	}
	// §2.3.3: "expand the file size to be at least as large as the
	// LastFileOffset field of the head entry".
	if err := ap.extend(head.e.last); err != nil {
		return false, err
	}
	if err := s.Sync(); err != nil {
		return false, fmt.Errorf("log replay: sync: %w", err)
	}
	return true, nil
}

// logApplier writes updates to their final offsets, tracking the file size
// so that zeroing past the end of the file extends it instead of writing.
type logApplier struct {
	s    Storage
	lr   logRegion
	size uint64
}

// checkTarget refuses an update that overflows, touches the file identifier
// or the headers, or overlaps the log (§2.2.3.2: the log overlaps no other
// structure; writing into it would also corrupt the entries being replayed).
// It returns the end offset of the update.
func checkTarget(lr logRegion, off, n uint64) (uint64, string) {
	if off > math.MaxInt64 || n > math.MaxInt64-off {
		return 0, "range is beyond any possible file"
	}
	end := off + n
	if off < logMinTarget {
		return 0, "range overlaps the file identifier or the headers, which are never written through the log (§2.2.1, §2.2.2)"
	}
	if off < lr.offset+uint64(lr.length) && end > lr.offset {
		return 0, "range overlaps the log itself"
	}
	return end, ""
}

// writeSector writes whole sectors at off (already checked).
func (ap *logApplier) writeSector(b []byte, off uint64) error {
	if _, err := ap.s.WriteAt(b, int64(off)); err != nil {
		return fmt.Errorf("log: write sector at offset %#x: %w", off, err)
	}
	ap.size = max(ap.size, off+uint64(len(b)))
	return nil
}

// zeroRange zeroes [off, off+n) (already checked). Only the part inside the
// current file is zeroed; the rest is created by extending the file, which
// reads as zeros. A Storage that can zero a range in one step (a hole punch
// in the file, one record in the in-memory overlay) does so: a zero
// descriptor may span the whole of a huge sparse file, and writing zeros
// over it would fill the disk. Otherwise zeros are written in bounded chunks.
func (ap *logApplier) zeroRange(off, n uint64) error {
	end := off + n
	if off < ap.size {
		stop := min(end, ap.size)
		var err error
		if z, ok := ap.s.(rangeZeroer); ok {
			err = z.zeroRange(int64(off), int64(stop-off))
		} else {
			err = writeZeroChunks(ap.s, int64(off), int64(stop-off))
		}
		if err != nil {
			return fmt.Errorf("log: zero at offset %#x: %w", off, err)
		}
	}
	return ap.extend(end)
}

// zeroChunk is a shared, never written, buffer of zeros.
var zeroChunk [logZeroChunk]byte

// writeZeroChunks writes zeros over [off, off+n) in logZeroChunk pieces.
func writeZeroChunks(s Storage, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroChunk)))
		if _, err := s.WriteAt(zeroChunk[:c], off); err != nil {
			return fmt.Errorf("write zeros at %#x: %w", off, err)
		}
		off, n = off+c, n-c
	}
	return nil
}

// rangeZeroer is a Storage that zeroes a range in one step without being
// handed the zeros (the in-memory overlay): a zero descriptor may span the
// whole of a large sparse file, and one record per 64 KiB chunk would cost
// memory in proportion to the file's apparent size.
type rangeZeroer interface {
	zeroRange(off, n int64) error
}

// extend grows the file to at least size bytes.
func (ap *logApplier) extend(size uint64) error {
	if size <= ap.size {
		return nil
	}
	if err := ap.s.Truncate(int64(size)); err != nil {
		return fmt.Errorf("log: extend file to %#x: %w", size, err)
	}
	ap.size = size
	return nil
}

// replayEntry applies every descriptor of e in order (§2.3.3), restoring
// each data sector's leading and trailing bytes from its descriptor
// (§2.3.1.3, §2.3.1.4). Sectors are re-read and re-checked, so a log that
// changed since the scan fails instead of replaying garbage. With dry set it
// only checks the descriptors' targets and writes nothing.
func (ap *logApplier) replayEntry(r *logReader, e logEntry, dry bool) error {
	le := binary.LittleEndian
	b, dat := r.sec[:], r.dat[:]
	changed := func(off uint64, what string) error {
		return errAt(ErrCorrupt, off, "log entry", "%s changed during replay", what)
	}
	var idx, dataIdx uint32
	for s := uint32(0); s < e.descSectors; s++ {
		secOff, err := r.readSector(b, e.pos, s)
		if err != nil {
			return err
		}
		first := 0
		if s == 0 {
			first = logHeaderDescSlots
			if le.Uint64(b[logHdrOffSequence:]) != e.seq {
				return changed(secOff, "entry header")
			}
		}
		for slot := first; slot < logDescsPerSector && idx < e.descCount; slot++ {
			d := b[slot*logDescriptorSize : (slot+1)*logDescriptorSize]
			dOff := secOff + uint64(slot*logDescriptorSize)
			if le.Uint64(d[logDescOffSequence:]) != e.seq {
				return changed(dOff, "descriptor")
			}
			fileOff := le.Uint64(d[logDescOffFileOff:])
			switch string(d[logDescOffSignature : logDescOffSignature+4]) {
			case logSigDesc:
				if _, why := checkTarget(ap.lr, fileOff, logSectorSize); why != "" {
					return errAt(ErrCorrupt, dOff, "log data descriptor", "target %#x: %s", fileOff, why)
				}
				ds := e.descSectors + dataIdx
				if uint64(ds) >= uint64(e.length/logSectorSize) {
					return changed(dOff, "data descriptor count")
				}
				dataIdx++
				if dry {
					break
				}
				datOff, err := r.readSector(dat, e.pos, ds)
				if err != nil {
					return err
				}
				if checkDataSector(dat, e.seq) != nil {
					return changed(datOff, "data sector")
				}
				copy(dat[:logLeadingLen], d[logDescOffLeading:logDescOffLeading+logLeadingLen])
				copy(dat[logDataTrailingOff:], d[logDescOffTrailing:logDescOffTrailing+logTrailingLen])
				if err := ap.writeSector(dat, fileOff); err != nil {
					return err
				}
			case logSigZero:
				zl := le.Uint64(d[logDescOffZeroLen:])
				if _, why := checkTarget(ap.lr, fileOff, zl); why != "" {
					return errAt(ErrCorrupt, dOff, "log zero descriptor", "target [%#x, +%#x): %s", fileOff, zl, why)
				}
				if dry {
					break
				}
				if err := ap.zeroRange(fileOff, zl); err != nil {
					return err
				}
			default:
				return changed(dOff, "descriptor")
			}
			idx++
		}
	}
	return nil
}
