package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// The fixtures below encode log entries independently of log.go, straight
// from the field offsets of MS-VHDX §2.3.1, so that parser and writer are
// each checked against the spec rather than against each other.

const (
	tLogOff   = 1 << 20 // the log region of every fixture
	tLogLen   = 1 << 20
	tFileSize = 3 << 20
	tMeta     = 2 << 20 // fixtures' "metadata" targets live in [2 MiB, 3 MiB)
)

var (
	tGUID  = uuid.MustParse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
	tOther = uuid.MustParse("11111111-2222-3333-4444-555555555555")
	tLR    = logRegion{offset: tLogOff, length: tLogLen, guid: tGUID}
)

type tDesc struct {
	zero    bool
	off     uint64
	zeroLen uint64
	data    []byte // 4096 bytes for a data descriptor
}

type tEntry struct {
	guid    uuid.UUID // zero: tGUID
	seq     uint64
	tail    uint32
	flushed uint64 // zero: 1 MiB
	last    uint64 // zero: tFileSize
	descs   []tDesc
}

// encodeTestEntry lays out e per §2.3.1: header + descriptors (126 in the
// first sector, 128 in each further one), then one data sector per data
// descriptor, CRC-32C over the whole entry with the checksum field zeroed.
func encodeTestEntry(e tEntry) []byte {
	le := binary.LittleEndian
	if e.guid == uuid.Nil {
		e.guid = tGUID
	}
	if e.flushed == 0 {
		e.flushed = 1 << 20
	}
	if e.last == 0 {
		e.last = tFileSize
	}
	descSectors := (len(e.descs) + 2 + 127) / 128
	var data [][]byte
	for _, d := range e.descs {
		if !d.zero {
			data = append(data, d.data)
		}
	}
	b := make([]byte, (descSectors+len(data))*4096)
	copy(b[0:], "loge")
	le.PutUint32(b[8:], uint32(len(b)))
	le.PutUint32(b[12:], e.tail)
	le.PutUint64(b[16:], e.seq)
	le.PutUint32(b[24:], uint32(len(e.descs)))
	guidToDisk(b[32:], e.guid)
	le.PutUint64(b[48:], e.flushed)
	le.PutUint64(b[56:], e.last)
	di := 0
	for i, d := range e.descs {
		p := b[(i+2)*32:]
		if d.zero {
			copy(p[0:], "zero")
			le.PutUint64(p[8:], d.zeroLen)
		} else {
			copy(p[0:], "desc")
			copy(p[4:8], d.data[4092:])
			copy(p[8:16], d.data[:8])
			s := b[(descSectors+di)*4096:][:4096]
			copy(s[0:], "data")
			le.PutUint32(s[4:], uint32(e.seq>>32))
			copy(s[8:4092], d.data[8:4092])
			le.PutUint32(s[4092:], uint32(e.seq))
			di++
		}
		le.PutUint64(p[16:], d.off)
		le.PutUint64(p[24:], e.seq)
	}
	fixTestCRC(b)
	return b
}

// fixTestCRC recomputes the entry checksum over all of b.
func fixTestCRC(b []byte) {
	binary.LittleEndian.PutUint32(b[4:], 0)
	binary.LittleEndian.PutUint32(b[4:], crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
}

// sectorOf returns a 4 KiB sector filled with a pattern derived from seed,
// with distinct first 8 and last 4 bytes so that a lost leading/trailing
// restore shows.
func sectorOf(seed byte) []byte {
	b := bytes.Repeat([]byte{seed}, 4096)
	copy(b, "LEAD"+string([]byte{seed, seed ^ 1, seed ^ 2, seed ^ 3}))
	copy(b[4092:], "TRL"+string([]byte{seed}))
	return b
}

// newLogFixture returns a 3 MiB file whose log region (1 MiB at 1 MiB) is
// empty and whose "metadata" area [2 MiB, 3 MiB) is filled with 0xEE.
func newLogFixture() *faultStorage {
	img := make([]byte, tFileSize)
	copy(img, "vhdxfile")
	for i := tMeta; i < tMeta+(1<<20); i++ {
		img[i] = 0xEE
	}
	return newFaultStorage(img)
}

// putTestEntry writes b into the log at pos, wrapping at the end of the log
// as a ring.
func putTestEntry(t *testing.T, s Storage, pos uint32, b []byte) {
	t.Helper()
	for i := 0; i < len(b); i += 4096 {
		off := tLogOff + (uint64(pos)+uint64(i))%tLogLen
		if _, err := s.WriteAt(b[i:i+4096], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

func oneDataEntry(seq uint64, tail uint32) tEntry {
	return tEntry{seq: seq, tail: tail, descs: []tDesc{
		{off: tMeta, data: sectorOf(byte(seq))},
		{zero: true, off: tMeta + 8192, zeroLen: 8192},
	}}
}

func TestParseEntryRejectsEachBrokenRule(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name   string
		mutate func(b []byte) // applied to the encoded one-data, one-zero entry
		refix  bool           // recompute the checksum so only the named rule is broken
		want   string
	}{
		{"checksum does not match", func(b []byte) { b[4096+100] ^= 1 }, false, "checksum"},
		{"signature is not loge", func(b []byte) { copy(b, "logf") }, true, "signature"},
		{"EntryLength beyond the log", func(b []byte) { le.PutUint32(b[8:], tLogLen+4096) }, true, "EntryLength"},
		{"EntryLength not a 4 KiB multiple", func(b []byte) { le.PutUint32(b[8:], 8192+512) }, true, "EntryLength"},
		{"EntryLength zero", func(b []byte) { le.PutUint32(b[8:], 0) }, true, "EntryLength"},
		{"Tail outside the log", func(b []byte) { le.PutUint32(b[12:], tLogLen) }, true, "Tail"},
		{"Tail not a 4 KiB multiple", func(b []byte) { le.PutUint32(b[12:], 512) }, true, "Tail"},
		{"SequenceNumber zero", func(b []byte) { le.PutUint64(b[16:], 0) }, true, "SequenceNumber is 0"},
		{"LogGuid of another log", func(b []byte) { guidToDisk(b[32:], tOther) }, true, "LogGuid"},
		{"FlushedFileOffset not 1 MiB aligned", func(b []byte) { le.PutUint64(b[48:], 4096) }, true, "FlushedFileOffset"},
		{"LastFileOffset not 1 MiB aligned", func(b []byte) { le.PutUint64(b[56:], tFileSize+4096) }, true, "LastFileOffset"},
		{"DescriptorCount needs more sectors than EntryLength", func(b []byte) { le.PutUint32(b[24:], 1000) }, true, "DescriptorCount"},
		{"DescriptorCount huge", func(b []byte) { le.PutUint32(b[24:], math.MaxUint32) }, true, "DescriptorCount"},
		{"more data descriptors than data sectors", func(b []byte) { copy(b[96:], "desc") }, true, "data descriptors"},
		{"descriptor SequenceNumber mismatch", func(b []byte) { le.PutUint64(b[64+24:], 2) }, true, "descriptor 0 SequenceNumber"},
		{"zero descriptor SequenceNumber mismatch", func(b []byte) { le.PutUint64(b[96+24:], 2) }, true, "descriptor 1 SequenceNumber"},
		{"descriptor signature unknown", func(b []byte) { copy(b[64:], "dexc") }, true, "neither"},
		{"data descriptor FileOffset unaligned", func(b []byte) { le.PutUint64(b[64+16:], tMeta+512) }, true, "FileOffset"},
		{"zero descriptor ZeroLength unaligned", func(b []byte) { le.PutUint64(b[96+8:], 100) }, true, "ZeroLength"},
		{"data sector signature", func(b []byte) { copy(b[4096:], "date") }, true, "data sector 0: signature"},
		{"data sector SequenceHigh mismatch", func(b []byte) { le.PutUint32(b[4096+4:], 1) }, true, "SequenceHigh"},
		{"data sector SequenceLow mismatch", func(b []byte) { le.PutUint32(b[8192-4:], 2) }, true, "SequenceHigh/Low"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := encodeTestEntry(oneDataEntry(1, 0))
			tt.mutate(b)
			if tt.refix {
				fixTestCRC(b)
			}
			s := newLogFixture()
			putTestEntry(t, s, 0, b)
			r := logReader{s: s, lr: tLR}
			_, err := r.parseEntry(0)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("parseEntry = %v, want ErrCorrupt mentioning %q", err, tt.want)
			}
			if active, err := hasActiveLog(s, tLR); active || err != nil {
				t.Errorf("hasActiveLog = %v, %v; want false, nil: the only entry is invalid", active, err)
			}
			before := s.current()
			if replayed, err := replayLog(s, tLR); replayed || err != nil {
				t.Errorf("replayLog = %v, %v; want false, nil", replayed, err)
			}
			if !bytes.Equal(before, s.current()) {
				t.Error("replayLog changed the file although nothing was valid")
			}
		})
	}
}

func TestParseEntryAcceptsWellFormedEntries(t *testing.T) {
	many := tEntry{seq: 9, tail: 0}
	for i := range 300 { // three descriptor sectors: 126 + 128 + 46
		if i%3 == 0 {
			many.descs = append(many.descs, tDesc{off: tMeta + uint64(i)*4096, data: sectorOf(byte(i))})
		} else {
			many.descs = append(many.descs, tDesc{zero: true, off: tMeta + uint64(i)*4096, zeroLen: 4096})
		}
	}
	tests := []struct {
		name        string
		e           tEntry
		descSectors uint32
	}{
		{"no descriptors", tEntry{seq: 1}, 1},
		{"one data one zero", oneDataEntry(1, 0), 1},
		{"126 descriptors fill the first sector", tEntry{seq: 3, descs: make([]tDesc, 126)}, 1},
		{"127 descriptors need a second sector", tEntry{seq: 3, descs: make([]tDesc, 127)}, 2},
		{"300 mixed descriptors", many, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i := range tt.e.descs {
				if tt.e.descs[i].data == nil && !tt.e.descs[i].zero {
					tt.e.descs[i] = tDesc{zero: true, off: tMeta, zeroLen: 4096}
				}
			}
			b := encodeTestEntry(tt.e)
			s := newLogFixture()
			putTestEntry(t, s, 0, b)
			r := logReader{s: s, lr: tLR}
			e, err := r.parseEntry(0)
			if err != nil {
				t.Fatalf("parseEntry: %v", err)
			}
			if e.seq != tt.e.seq || e.length != uint32(len(b)) || e.descCount != uint32(len(tt.e.descs)) || e.descSectors != tt.descSectors {
				t.Errorf("parsed %+v; want seq %d, length %d, %d descriptors in %d sectors",
					e, tt.e.seq, len(b), len(tt.e.descs), tt.descSectors)
			}
		})
	}
}

// placed is an entry at a position in the log.
type placed struct {
	pos   uint32
	entry tEntry
	raw   []byte // used instead of encoding entry when set
}

func TestActiveSequenceSearch(t *testing.T) {
	const L = tLogLen
	e := func(seq uint64, tail uint32) tEntry { return oneDataEntry(seq, tail) } // 8 KiB each
	tests := []struct {
		name     string
		log      []placed
		wantHead uint64 // sequence number of the active head; 0: none
		wantTail uint32
	}{
		{"empty log", nil, 0, 0},
		{"single self-tailed entry", []placed{{pos: 0x3000, entry: e(5, 0x3000)}}, 5, 0x3000},
		{"two chained entries, tail at the first",
			[]placed{{pos: 0, entry: e(1, 0)}, {pos: 8192, entry: e(2, 0)}}, 2, 0},
		{"chain whose head's tail is its own entry replays only the head",
			[]placed{{pos: 0, entry: e(1, 0)}, {pos: 8192, entry: e(2, 8192)}}, 2, 8192},
		{"sequence gap: the later entry is not chained, its tail is not in its sequence",
			[]placed{{pos: 0, entry: e(1, 0)}, {pos: 8192, entry: e(3, 0)}}, 1, 0},
		{"tail outside the sequence invalidates the whole chain",
			[]placed{{pos: 0, entry: e(1, 0)}, {pos: 8192, entry: e(2, 0x10000)}}, 0, 0},
		{"the sequence with the higher head wins",
			[]placed{{pos: 0, entry: e(7, 0)}, {pos: 0x40000, entry: e(3, 0x40000)}, {pos: 0x42000, entry: e(4, 0x40000)}}, 7, 0},
		{"stale entry of another log is ignored",
			[]placed{{pos: 0, entry: tEntry{guid: tOther, seq: 99, descs: oneDataEntry(99, 0).descs}}, {pos: 0x8000, entry: e(2, 0x8000)}}, 2, 0x8000},
		{"sequence wraps around the end of the log",
			[]placed{{pos: L - 8192, entry: e(10, L-8192)}, {pos: 0, entry: e(11, L-8192)}}, 11, L - 8192},
		{"entry straddles the end of the log",
			[]placed{{pos: L - 0x3000, entry: e(20, L-0x3000)}, {pos: L - 0x1000, entry: e(21, L-0x3000)}, {pos: 0x1000, entry: e(22, L-0x3000)}}, 22, L - 0x3000},
		{"whole-log entry does not chain to itself",
			[]placed{{pos: 0, entry: tEntry{seq: 4, descs: wholeLogDescs()}}}, 4, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newLogFixture()
			for _, p := range tt.log {
				b := p.raw
				if b == nil {
					b = encodeTestEntry(p.entry)
				}
				putTestEntry(t, s, p.pos, b)
			}
			sc, err := newLogScan(s, tLR)
			if err != nil {
				t.Fatal(err)
			}
			tail, head, err := sc.findActive()
			if err != nil {
				t.Fatal(err)
			}
			var gotHead uint64
			var gotTail uint32
			if head != nil {
				gotHead, gotTail = head.e.seq, tail.e.pos
			}
			if gotHead != tt.wantHead || gotTail != tt.wantTail {
				t.Errorf("active sequence head seq %d tail %#x; want %d, %#x", gotHead, gotTail, tt.wantHead, tt.wantTail)
			}
			active, err := hasActiveLog(s, tLR)
			if err != nil || active != (tt.wantHead != 0) {
				t.Errorf("hasActiveLog = %v, %v; want %v", active, err, tt.wantHead != 0)
			}
		})
	}
}

// wholeLogDescs makes an entry exactly as long as the log.
func wholeLogDescs() []tDesc {
	d := make([]tDesc, tLogLen/4096-2) // two descriptor sectors + 254 data sectors
	for i := range d {
		d[i] = tDesc{off: tMeta + uint64(i)*4096, data: sectorOf(byte(i))}
	}
	return d
}

func TestReplayAppliesEntriesInOrderFromTheTail(t *testing.T) {
	const L = tLogLen
	s := newLogFixture()
	// Three entries, the middle one straddling the end of the log. Later
	// entries overwrite the same sector, so order matters; each entry also
	// writes a sector of its own.
	entries := []placed{
		{pos: L - 0x5000, entry: tEntry{seq: 20, tail: L - 0x5000, descs: []tDesc{
			{off: tMeta, data: sectorOf(1)}}}},
		{pos: L - 0x3000, entry: tEntry{seq: 21, tail: L - 0x5000, descs: []tDesc{
			{off: tMeta, data: sectorOf(3)}, {off: tMeta + 0x1000, data: sectorOf(2)},
			{zero: true, off: tMeta + 0x4000, zeroLen: 0x2000}, {off: tMeta + 0x3000, data: sectorOf(6)}}}},
		{pos: 0x1000, entry: tEntry{seq: 22, tail: L - 0x5000, last: 6 << 20, descs: []tDesc{
			{off: tMeta + 0x2000, data: sectorOf(4)}, {off: 5<<20 + 0x1000, data: sectorOf(5)}}}},
	}
	for _, p := range entries {
		putTestEntry(t, s, p.pos, encodeTestEntry(p.entry))
	}
	want := s.current()
	copy(want[tMeta:], sectorOf(3))
	copy(want[tMeta+0x1000:], sectorOf(2))
	copy(want[tMeta+0x2000:], sectorOf(4))
	copy(want[tMeta+0x3000:], sectorOf(6))
	clear(want[tMeta+0x4000 : tMeta+0x6000])
	want = append(want, make([]byte, 6<<20-len(want))...) // LastFileOffset of the head
	copy(want[5<<20+0x1000:], sectorOf(5))                // beyond the old end of file

	replayed, err := replayLog(s, tLR)
	if err != nil || !replayed {
		t.Fatalf("replayLog = %v, %v; want true, nil", replayed, err)
	}
	got := s.current()
	if len(got) != len(want) {
		t.Fatalf("file size %#x after replay, want %#x", len(got), len(want))
	}
	if i := vhdxtest.FirstDiff(got, want); i >= 0 {
		t.Fatalf("replayed image differs at offset %#x: got %#x want %#x", i, got[i], want[i])
	}
	// Replay is idempotent: a crash during replay is repaired by replaying
	// again on the next open.
	if _, err := replayLog(s, tLR); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.current(), want) {
		t.Error("second replay changed the image")
	}
}

func TestReplayZeroDescriptorPastEndOfFileExtendsIt(t *testing.T) {
	s := newLogFixture()
	putTestEntry(t, s, 0, encodeTestEntry(tEntry{seq: 1, descs: []tDesc{
		{zero: true, off: tFileSize - 0x1000, zeroLen: 0x3000}}}))
	if _, err := replayLog(s, tLR); err != nil {
		t.Fatal(err)
	}
	got := s.current()
	if len(got) != tFileSize+0x2000 {
		t.Fatalf("size %#x, want %#x", len(got), tFileSize+0x2000)
	}
	if !bytes.Equal(got[tFileSize-0x1000:], make([]byte, 0x3000)) {
		t.Error("zeroed range is not zero")
	}
}

func TestReplayRefusesUnsafeOrImpossibleLogs(t *testing.T) {
	tests := []struct {
		name string
		e    tEntry
		want string
	}{
		{"data descriptor over the file identifier", tEntry{seq: 1, descs: []tDesc{{off: 0, data: sectorOf(1)}}}, "identifier or the headers"},
		{"data descriptor over header 2", tEntry{seq: 1, descs: []tDesc{{off: 128 << 10, data: sectorOf(1)}}}, "identifier or the headers"},
		{"zero descriptor reaching into the headers", tEntry{seq: 1, descs: []tDesc{{zero: true, off: 0, zeroLen: 1 << 20}}}, "identifier or the headers"},
		{"data descriptor into the log", tEntry{seq: 1, descs: []tDesc{{off: tLogOff + 0x8000, data: sectorOf(1)}}}, "overlaps the log"},
		{"zero descriptor covering the log", tEntry{seq: 1, descs: []tDesc{{zero: true, off: 1 << 20, zeroLen: 2 << 20}}}, "overlaps the log"},
		{"zero descriptor whose end overflows", tEntry{seq: 1, descs: []tDesc{{zero: true, off: tMeta, zeroLen: math.MaxUint64 - 4095}}}, "beyond any possible file"},
		{"file shorter than FlushedFileOffset", tEntry{seq: 1, flushed: 8 << 20, descs: oneDataEntry(1, 0).descs}, "truncated"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newLogFixture()
			putTestEntry(t, s, 0, encodeTestEntry(tt.e))
			if active, err := hasActiveLog(s, tLR); !active || err != nil {
				t.Fatalf("hasActiveLog = %v, %v; the entry itself is well-formed", active, err)
			}
			before := s.current()
			_, err := replayLog(s, tLR)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("replayLog = %v, want ErrCorrupt mentioning %q", err, tt.want)
			}
			if !bytes.Equal(before[:tLogOff+tLogLen], s.current()[:tLogOff+tLogLen]) {
				t.Error("refused replay wrote to the header section or the log")
			}
		})
	}
}

func TestReplayAllowsRegionTableUpdates(t *testing.T) {
	// §2.2.3: region table updates go through the log; 192 KiB is the lowest
	// offset a descriptor may target.
	s := newLogFixture()
	putTestEntry(t, s, 0, encodeTestEntry(tEntry{seq: 1, descs: []tDesc{{off: 192 << 10, data: sectorOf(9)}}}))
	if _, err := replayLog(s, tLR); err != nil {
		t.Fatal(err)
	}
	if got := s.current()[192<<10:][:4096]; !bytes.Equal(got, sectorOf(9)) {
		t.Error("region table sector not replayed")
	}
}

func TestLogWithZeroGUIDOrLengthIsEmpty(t *testing.T) {
	s := newLogFixture()
	putTestEntry(t, s, 0, encodeTestEntry(oneDataEntry(1, 0)))
	for _, lr := range []logRegion{{offset: tLogOff, length: tLogLen}, {offset: tLogOff, guid: tGUID}} {
		if active, err := hasActiveLog(s, lr); active || err != nil {
			t.Errorf("hasActiveLog(%+v) = %v, %v; want false, nil", lr, active, err)
		}
		if replayed, err := replayLog(s, lr); replayed || err != nil {
			t.Errorf("replayLog(%+v) = %v, %v; want false, nil", lr, replayed, err)
		}
	}
}

func TestLogRegionOutsideTheFileIsCorrupt(t *testing.T) {
	s := newLogFixture()
	for _, lr := range []logRegion{
		{offset: tFileSize - tLogLen/2, length: tLogLen, guid: tGUID},        // not 1 MiB aligned
		{offset: tFileSize, length: tLogLen, guid: tGUID},                    // past the end
		{offset: 0, length: tLogLen, guid: tGUID},                            // in the header section
		{offset: tLogOff, length: tLogLen + 4096, guid: tGUID},               // length not 1 MiB multiple
		{offset: math.MaxUint64 - tLogLen + 1, length: tLogLen, guid: tGUID}, // overflow
	} {
		if _, err := hasActiveLog(s, lr); !errors.Is(err, ErrCorrupt) {
			t.Errorf("hasActiveLog(%+v) = %v, want ErrCorrupt", lr, err)
		}
	}
}

// logTargets lists the [offset, end) ranges the active sequence writes.
func logTargets(t *testing.T, s Storage, lr logRegion) [][2]uint64 {
	t.Helper()
	sc, err := newLogScan(s, lr)
	if err != nil {
		t.Fatal(err)
	}
	tail, head, err := sc.findActive()
	if err != nil || head == nil {
		t.Fatalf("no active sequence: %v", err)
	}
	var out [][2]uint64
	b := make([]byte, 4096)
	for n := tail; ; {
		for i := uint32(0); i < n.e.descCount; i++ {
			slot := i + 2
			if _, err := sc.r.readSector(b, n.e.pos, slot/128); err != nil {
				t.Fatal(err)
			}
			d := b[(slot%128)*32:]
			off, length := binary.LittleEndian.Uint64(d[16:]), uint64(4096)
			if string(d[:4]) == "zero" {
				length = binary.LittleEndian.Uint64(d[8:])
			}
			out = append(out, [2]uint64{off, off + length})
		}
		if n == head {
			return out
		}
		if n, err = sc.succ(n); err != nil || n == nil {
			t.Fatalf("chain broken: %v", err)
		}
	}
}

// TestReplayLogOnDirtySampleMatchesQEMU replays the dirty sample with
// replayLog alone and compares the result with QEMU's replay (qemu-img
// check -r all): every byte the log wrote, and in fact every byte outside
// the two headers (QEMU rewrites them to clear LogGuid), must agree.
func TestReplayLogOnDirtySampleMatchesQEMU(t *testing.T) {
	ours := sample(t, "iotest-dirtylog-10G-4M.vhdx")
	orig, err := os.ReadFile(ours)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(ours, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := osStorage{f}
	h, _, err := readHeaders(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	lr := logRegion{offset: h.logOffset, length: h.logLength, guid: h.logGUID}
	if active, err := hasActiveLog(s, lr); !active || err != nil {
		t.Fatalf("hasActiveLog = %v, %v; want true", active, err)
	}
	targets := logTargets(t, s, lr)
	if replayed, err := replayLog(s, lr); !replayed || err != nil {
		t.Fatalf("replayLog = %v, %v; want true, nil", replayed, err)
	}
	got, err := os.ReadFile(ours)
	if err != nil {
		t.Fatal(err)
	}
	changed := 0
	for _, r := range targets {
		if r[1] > uint64(len(got)) {
			t.Fatalf("target %#x beyond the replayed file", r)
		}
		if !bytes.Equal(orig[r[0]:r[1]], got[r[0]:r[1]]) {
			changed++
		}
	}
	if changed == 0 {
		t.Fatalf("replay changed none of the %d targets %#x; the sample's log should matter", len(targets), targets)
	}

	vhdxtest.NeedQEMU(t)
	theirs := filepath.Join(t.TempDir(), "theirs.vhdx")
	if err := os.WriteFile(theirs, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", theirs)
	want, err := os.ReadFile(theirs)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range targets {
		if !bytes.Equal(got[r[0]:r[1]], want[r[0]:r[1]]) {
			t.Errorf("log target [%#x, %#x) differs from QEMU's replay", r[0], r[1])
		}
	}
	if len(got) != len(want) {
		t.Fatalf("file size %#x, QEMU's %#x", len(got), len(want))
	}
	const hdrStart, hdrEnd = 64 << 10, 192 << 10
	if i := vhdxtest.FirstDiff(got[:hdrStart], want[:hdrStart]); i >= 0 {
		t.Errorf("differs from QEMU's replay at %#x", i)
	}
	if i := vhdxtest.FirstDiff(got[hdrEnd:], want[hdrEnd:]); i >= 0 {
		t.Errorf("differs from QEMU's replay at %#x", hdrEnd+i)
	}
}

// applyUpdates is the reference meaning of a commit: each update written in
// order onto img.
func applyUpdates(img []byte, updates []logUpdate) []byte {
	img = bytes.Clone(img)
	for _, u := range updates {
		if u.data != nil {
			copy(img[u.offset:], u.data)
		} else {
			clear(img[u.offset : u.offset+u.zeroLength])
		}
	}
	return img
}

// randomCommit returns n data updates at random sectors of the metadata
// area, plus one zero update when withZero is set.
func randomCommit(rng *rand.Rand, n int, withZero bool) []logUpdate {
	var us []logUpdate
	for range n {
		d := make([]byte, 4096)
		rng.Read(d)
		us = append(us, logUpdate{offset: tMeta + uint64(rng.Intn(256))*4096, data: d})
	}
	if withZero {
		us = append(us, logUpdate{offset: tMeta + uint64(rng.Intn(240))*4096, zeroLength: uint64(1+rng.Intn(16)) * 4096})
	}
	return us
}

// TestJournalRoundTrip commits a run of entries of varied sizes (small ones
// that wrap around the ring, large ones that need bridge entries) and checks
// after each commit that (1) the file holds exactly the updates, (2) the
// log's active sequence is this commit's single self-tailed entry, and (3)
// replaying the log onto the image as it was before the commit reproduces
// the committed image byte for byte, as recovery after a crash between
// "entry flushed" and "updates applied" would.
func TestJournalRoundTrip(t *testing.T) {
	parallelSweep(t)
	rng := rand.New(rand.NewSource(1))
	s := newLogFixture()
	j := newJournal(s, tLR)
	sizes := []int{1, 3, 0, 130, 131, 20, 200, 1, 5, 126, 127}
	for range 25 {
		sizes = append(sizes, rng.Intn(40))
	}
	sizes = append(sizes, 140, 141, 142)
	var wraps, bridges int
	var lastPos uint32
	for i, n := range sizes {
		updates := randomCommit(rng, n, i%2 == 0)
		pre := s.current()
		seqBefore, prevPos, prevLen := j.seq, j.prevPos, j.prevLen
		if err := j.commit(updates, 1<<20, tFileSize); err != nil {
			t.Fatalf("commit %d (%d updates): %v", i, n, err)
		}
		post := s.current()
		if j.seq > seqBefore+1 {
			bridges++
		} else if seqBefore > 0 && prevPos < j.prevPos+j.prevLen && j.prevPos < prevPos+prevLen {
			// Without a bridge in between, overwriting the previous entry
			// could let a torn write resurrect an older one.
			t.Fatalf("commit %d: entry [%#x, +%#x) overlaps the previous entry [%#x, +%#x)", i, j.prevPos, j.prevLen, prevPos, prevLen)
		}
		if j.prevPos < lastPos {
			wraps++
		}
		lastPos = j.prevPos
		want := applyUpdates(pre, updates)
		copy(want[tLogOff:tLogOff+tLogLen], post[tLogOff:tLogOff+tLogLen])
		if k := vhdxtest.FirstDiff(post, want); k >= 0 {
			t.Fatalf("commit %d: image differs from the updates at %#x", i, k)
		}

		sc, err := newLogScan(s, tLR)
		if err != nil {
			t.Fatal(err)
		}
		tail, head, err := sc.findActive()
		if err != nil || head == nil || head != tail || head.e.seq != j.seq || head.e.pos != j.prevPos {
			t.Fatalf("commit %d: active sequence %+v..%+v (%v); want the single entry seq %d at %#x", i, tail, head, err, j.seq, j.prevPos)
		}

		fresh := bytes.Clone(pre)
		copy(fresh[tLogOff:tLogOff+tLogLen], post[tLogOff:tLogOff+tLogLen])
		fs := newFaultStorage(fresh)
		if replayed, err := replayLog(fs, tLR); !replayed || err != nil {
			t.Fatalf("commit %d: replayLog = %v, %v", i, replayed, err)
		}
		if k := vhdxtest.FirstDiff(fs.current(), post); k >= 0 {
			t.Fatalf("commit %d: replay onto the pre-commit image differs at %#x", i, k)
		}
	}
	if wraps == 0 || bridges == 0 {
		t.Errorf("run saw %d wraps and %d bridge entries; the test must exercise both", wraps, bridges)
	}
}

func TestJournalRefusesBadCommitsWithoutBreaking(t *testing.T) {
	sec := sectorOf(1)
	tests := []struct {
		name          string
		updates       []logUpdate
		flushed, last uint64
		lr            *logRegion
	}{
		{name: "unaligned offset", updates: []logUpdate{{offset: tMeta + 512, data: sec}}},
		{name: "short data", updates: []logUpdate{{offset: tMeta, data: sec[:512]}}},
		{name: "zero update of length 0", updates: []logUpdate{{offset: tMeta}}},
		{name: "zero update not 4 KiB", updates: []logUpdate{{offset: tMeta, zeroLength: 100}}},
		{name: "data and zero length both set", updates: []logUpdate{{offset: tMeta, data: sec, zeroLength: 4096}}},
		{name: "target in a header", updates: []logUpdate{{offset: 64 << 10, data: sec}}},
		{name: "target in the log", updates: []logUpdate{{offset: tLogOff, data: sec}}},
		{name: "entry larger than the log", updates: make([]logUpdate, 300)},
		{name: "FlushedFileOffset beyond the file", flushed: 8 << 20},
		{name: "LastFileOffset not 1 MiB aligned", last: tFileSize + 4096},
		{name: "zero log GUID", lr: &logRegion{offset: tLogOff, length: tLogLen}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newLogFixture()
			lr := tLR
			if tt.lr != nil {
				lr = *tt.lr
			}
			if tt.name == "entry larger than the log" {
				for i := range tt.updates {
					tt.updates[i] = logUpdate{offset: tMeta + uint64(i%200)*4096, data: sec}
				}
			}
			if tt.flushed == 0 {
				tt.flushed = 1 << 20
			}
			if tt.last == 0 {
				tt.last = tFileSize
			}
			j := newJournal(s, lr)
			before := s.current()
			if err := j.commit(tt.updates, tt.flushed, tt.last); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("commit = %v, want ErrInvalidArgument", err)
			}
			if !bytes.Equal(before, s.current()) || s.opCount() != 0 {
				t.Fatal("refused commit touched the file")
			}
			if tt.lr == nil {
				if err := j.commit([]logUpdate{{offset: tMeta, data: sec}}, 1<<20, tFileSize); err != nil {
					t.Errorf("valid commit after a refused one: %v", err)
				}
			}
		})
	}
}

// TestJournalRecoversAfterAFailedCommitWithTheOldMetadata: after an I/O
// error at any step of a commit (sync, write entry, sync, apply, sync) the
// next commit succeeds without a reopen, and the failed commit's target
// holds its contents from before it, now and after a power loss: the
// caller kept its in-memory state, and the file agrees with it.
func TestJournalRecoversAfterAFailedCommitWithTheOldMetadata(t *testing.T) {
	for op := 1; op <= 5; op++ {
		s := newLogFixture()
		old := bytes.Clone(s.current()[tMeta : tMeta+4096])
		j := newJournal(s, tLR)
		s.failAfter(op)
		err := j.commit([]logUpdate{{offset: tMeta, data: sectorOf(1)}}, 1<<20, tFileSize)
		if !errors.Is(err, errFault) {
			t.Fatalf("op %d: commit = %v, want the injected error", op, err)
		}
		if err := j.commit([]logUpdate{{offset: tMeta + 0x1000, data: sectorOf(2)}}, 1<<20, tFileSize); err != nil {
			t.Fatalf("op %d: next commit = %v, want recovery and success", op, err)
		}
		if j.err != nil || j.dead != nil {
			t.Fatalf("op %d: journal still pending (%v) or dead (%v)", op, j.err, j.dead)
		}
		for _, img := range [][]byte{s.current(), s.crashImage(crashDrop)} {
			rs := newMemStorage(bytes.Clone(img))
			if _, err := replayLog(rs, tLR); err != nil {
				t.Fatalf("op %d: replay: %v", op, err)
			}
			if got := rs.data[tMeta : tMeta+4096]; !bytes.Equal(got, old) {
				t.Errorf("op %d: the failed commit's target does not hold its old contents", op)
			}
			if got := rs.data[tMeta+0x1000 : tMeta+0x2000]; !bytes.Equal(got, sectorOf(2)) {
				t.Errorf("op %d: the commit after recovery is not in the file", op)
			}
		}
	}
}

// TestJournalGoesOfflineWhenTheLogDoesNotReadBack: recovery builds on the
// log as the journal left it. When the log reads back otherwise (here the
// last good entry was overwritten behind the journal's back), recovering
// would be a guess: the journal refuses every commit with an error that
// wraps ErrCorrupt and tells the operator to run check --repair.
func TestJournalGoesOfflineWhenTheLogDoesNotReadBack(t *testing.T) {
	s := newLogFixture()
	j := newJournal(s, tLR)
	if err := j.commit([]logUpdate{{offset: tMeta, data: sectorOf(1)}}, 1<<20, tFileSize); err != nil {
		t.Fatal(err)
	}
	s.failAfter(4) // sync, write entry, sync, apply: the apply fails
	if err := j.commit([]logUpdate{{offset: tMeta, data: sectorOf(2)}}, 1<<20, tFileSize); !errors.Is(err, errFault) {
		t.Fatalf("commit = %v, want the injected error", err)
	}
	if _, err := s.WriteAt(make([]byte, logSectorSize), int64(tLR.offset)+int64(j.prevPos)); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		err := j.commit([]logUpdate{{offset: tMeta + 0x1000, data: sectorOf(3)}}, 1<<20, tFileSize)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "check --repair") {
			t.Fatalf("commit %d after the log changed = %v, want ErrCorrupt naming check --repair", i, err)
		}
	}
}

// TestJournalGoesOfflineAfterAFailedZeroing: the journal keeps the old
// contents of data targets only (a zero descriptor may span a huge sparse
// range). When a commit with a zero descriptor fails after its apply began,
// the old contents are gone: recovery refuses, naming check --repair, and
// the error still wraps the I/O error that started it.
func TestJournalGoesOfflineAfterAFailedZeroing(t *testing.T) {
	s := newLogFixture()
	j := newJournal(s, tLR)
	s.failAfter(5) // sync, write entry, sync, apply (one zeroing write), sync: the last sync fails
	err := j.commit([]logUpdate{{offset: tMeta, zeroLength: 4096}}, 1<<20, tFileSize)
	if !errors.Is(err, errFault) {
		t.Fatalf("commit = %v, want the injected error", err)
	}
	err = j.commit([]logUpdate{{offset: tMeta + 0x1000, data: sectorOf(3)}}, 1<<20, tFileSize)
	if !errors.Is(err, ErrCorrupt) || !errors.Is(err, errFault) || !strings.Contains(err.Error(), "check --repair") {
		t.Fatalf("commit after the failed zeroing = %v, want ErrCorrupt and the I/O error, naming check --repair", err)
	}
}

// TestJournalContinuesAfterExistingEntries: should the caller reuse a
// LogGuid whose entries are still in the log, the journal numbers its
// entries after the newest one and does not overwrite it, so its own entry
// becomes the active sequence.
func TestJournalContinuesAfterExistingEntries(t *testing.T) {
	s := newLogFixture()
	putTestEntry(t, s, 0x10000, encodeTestEntry(oneDataEntry(50, 0x10000)))
	putTestEntry(t, s, 0x30000, encodeTestEntry(oneDataEntry(40, 0x30000)))
	j := newJournal(s, tLR)
	if err := j.commit([]logUpdate{{offset: tMeta + 0x8000, data: sectorOf(7)}}, 1<<20, tFileSize); err != nil {
		t.Fatal(err)
	}
	sc, _ := newLogScan(s, tLR)
	_, head, err := sc.findActive()
	if err != nil || head == nil || head.e.seq != 51 || head.e.pos != 0x12000 {
		t.Fatalf("active head %+v (%v); want seq 51 right after the seq-50 entry", head, err)
	}
}

// fixLogCRCs recomputes the checksum of every plausible entry header in a
// log image, reading entries around the ring, so that fuzzing gets past the
// CRC and reaches the descriptor, sequence and replay logic.
func fixLogCRCs(log []byte) {
	le := binary.LittleEndian
	L := uint32(len(log))
	tab := crc32.MakeTable(crc32.Castagnoli)
	for pos := uint32(0); pos < L; pos += 4096 {
		h := log[pos:]
		n := le.Uint32(h[8:])
		if string(h[:4]) != "loge" || n < 4096 || n%4096 != 0 || n > L {
			continue
		}
		le.PutUint32(h[4:], 0)
		var c uint32
		for i := uint32(0); i < n; i += 4096 {
			p := (pos + i) % L
			c = crc32.Update(c, tab, log[p:p+4096])
		}
		le.PutUint32(h[4:], c)
	}
}

// fuzzBufs are reused across fuzz executions (which run one at a time per
// worker process): allocating a fresh 3 MiB image per run made each run
// slow enough that minimising a new input took the whole fuzz time.
var fuzzBufs struct {
	sync.Mutex
	img, orig []byte
}

// FuzzReplayLog feeds arbitrary bytes as the log region of a fixed file.
// Search and replay must terminate without panicking, agree with each
// other, and never write to the header section or the log.
func FuzzReplayLog(f *testing.F) {
	f.Add(byte(0), []byte{})
	f.Add(byte(0), encodeTestEntry(oneDataEntry(1, 0)))
	f.Add(byte(3), encodeTestEntry(tEntry{seq: 1, tail: tLogLen - 8192, descs: []tDesc{{zero: true, off: tMeta, zeroLen: 8192}}}))
	f.Add(byte(1), encodeTestEntry(tEntry{seq: 5, descs: []tDesc{{zero: true, off: tMeta, zeroLen: 1 << 40}}}))
	f.Add(byte(1), encodeTestEntry(tEntry{seq: 1<<32 + 1, last: 1 << 50, descs: []tDesc{{zero: true, off: 1 << 45, zeroLen: 4096}}}))
	// The journal's own output, kept small: the fuzzer minimises every new
	// input, which takes long for large ones.
	s := newLogFixture()
	j := newJournal(s, tLR)
	if err := j.commit(randomCommit(rand.New(rand.NewSource(1)), 1, true), 1<<20, tFileSize); err != nil {
		f.Fatal(err)
	}
	f.Add(byte(0), s.current()[tLogOff:tLogOff+0x2000])

	f.Fuzz(func(t *testing.T, mode byte, data []byte) {
		fuzzBufs.Lock()
		defer fuzzBufs.Unlock()
		if fuzzBufs.img == nil {
			fuzzBufs.img = make([]byte, tFileSize)
			fuzzBufs.orig = make([]byte, tLogOff+tLogLen)
		}
		img := fuzzBufs.img[:tFileSize]
		clear(img)
		log := img[tLogOff : tLogOff+tLogLen]
		start := 0
		if mode&2 != 0 {
			start = tLogLen - 8192 // make the entries wrap around the ring
		}
		data = data[:min(len(data), tLogLen)]
		n := copy(log[start:], data)
		copy(log, data[n:])
		if mode&1 != 0 {
			fixLogCRCs(log)
		}
		orig := fuzzBufs.orig
		copy(orig, img)
		fs := newVolatileStorage(img, 16<<20) // a hostile LastFileOffset fails to extend
		active, aerr := hasActiveLog(fs, tLR)
		replayed, rerr := replayLog(fs, tLR)
		if aerr != nil || (rerr != nil && !errors.Is(rerr, ErrCorrupt) && !strings.Contains(rerr.Error(), "faultstorage")) {
			t.Fatalf("unexpected errors: hasActiveLog %v, replayLog %v", aerr, rerr)
		}
		if rerr == nil && replayed != active {
			t.Fatalf("hasActiveLog = %v but replayLog replayed = %v", active, replayed)
		}
		if got := fs.cur[:tLogOff+tLogLen]; !bytes.Equal(got, orig) {
			t.Fatalf("replay wrote to the header section or the log (first difference at %#x)", vhdxtest.FirstDiff(got, orig))
		}
	})
}

func TestJournalCommitDoesNotAllocateInSteadyState(t *testing.T) {
	s := newMemStorage(newLogFixture().current())
	j := newJournal(s, tLR)
	run := []logUpdate{{offset: tMeta, data: sectorOf(1)}, {offset: tMeta + 4096, data: sectorOf(2)}, {offset: tMeta + 0x10000, zeroLength: 8192}}
	commit := func() {
		if err := j.commit(run, 1<<20, tFileSize); err != nil {
			t.Fatal(err)
		}
	}
	commit() // first commit scans the log and sizes the buffers
	if n := testing.AllocsPerRun(50, commit); n != 0 {
		t.Errorf("commit allocates %v times per call, want 0", n)
	}
}

// countingStorage counts ReadAt calls.
type countingStorage struct {
	Storage
	reads int
}

func (c *countingStorage) ReadAt(p []byte, off int64) (int, error) {
	c.reads++
	return c.Storage.ReadAt(p, off)
}

// TestActiveSequenceSearchReadsEachSectorOnce: a log packed with 255
// chained entries whose head names a tail outside the chain makes the
// literal §2.3.3 walk re-validate the remaining chain from every one of the
// 255 tails (about 32,000 entry validations). The memoised search reads each
// log sector a bounded number of times and finds no active sequence.
func TestActiveSequenceSearchReadsEachSectorOnce(t *testing.T) {
	s := newLogFixture()
	const n = tLogLen/4096 - 1
	for i := range uint32(n) {
		tail := i * 4096
		if i == n-1 {
			tail = n * 4096 // the empty last sector: never part of the chain
		}
		putTestEntry(t, s, i*4096, encodeTestEntry(tEntry{seq: uint64(i) + 1, tail: tail}))
	}
	cs := &countingStorage{Storage: s}
	active, err := hasActiveLog(cs, tLR)
	if err != nil || active {
		t.Fatalf("hasActiveLog = %v, %v; want false: the only chain's head names a tail outside it", active, err)
	}
	if cs.reads > 2*tLogLen/4096 {
		t.Errorf("search read %d sectors of a %d-sector log; want each read about once", cs.reads, tLogLen/4096)
	}
}
