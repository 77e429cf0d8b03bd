package blk

import (
	"bytes"
	"testing"
)

// cacheDisk is a memDisk that is a CachedReader: sectors listed in cold
// are "not in memory". It records which read each request used.
type cacheDisk struct {
	*memDisk
	cold  map[int64]bool // byte offset → not cached
	calls []string       // "plain", "cached", "cold" per read
}

func newCacheDisk() *cacheDisk {
	d := &cacheDisk{memDisk: newMemDisk(testDiskSize, 512), cold: map[int64]bool{}}
	for i := range d.data {
		d.data[i] = byte(i*7 + i>>9)
	}
	return d
}

func (d *cacheDisk) ReadVec(bufs [][]byte, off int64) error {
	d.calls = append(d.calls, "plain")
	return d.memDisk.ReadVec(bufs, off)
}

func (d *cacheDisk) ReadVecCached(bufs [][]byte, off int64) (bool, error) {
	d.calls = append(d.calls, "cached")
	if d.cold[off] {
		for _, b := range bufs {
			for i := range b {
				b[i] = 0xee // "anything": a miss may leave garbage
			}
		}
		return false, nil
	}
	return true, d.memDisk.ReadVec(bufs, off)
}

func (d *cacheDisk) ReadVecCold(bufs [][]byte, off int64) error {
	d.calls = append(d.calls, "cold")
	return d.memDisk.ReadVec(bufs, off)
}

// inRequest is a 4 KiB IN at sector: header, data, status byte (0xff
// until written).
func inRequest(sector uint64) (readable, writable [][]byte) {
	status := []byte{0xff}
	return [][]byte{hdr(TypeIn, sector)}, [][]byte{make([]byte, 4096), status}
}

func TestAnInlineReadOfUncachedDataIsLeftUndoneWithNoStatusAndNothingCounted(t *testing.T) {
	d := newCacheDisk()
	d.cold[8*512] = true
	stats := NewStats(1)
	h := NewHandler(NewDiskRef(d), Options{})
	h.CountInto(stats.Queue(0))

	r, w := inRequest(8)
	written, done := h.TryHandle(r, w)
	if done || written != 0 {
		t.Fatalf("TryHandle of a cold read = (%d, %v), want (0, false)", written, done)
	}
	if w[1][0] != 0xff {
		t.Fatalf("status byte %#x written for a read left undone", w[1][0])
	}
	if h.Err() != nil {
		t.Fatalf("Err() = %v for a read left undone", h.Err())
	}
	if _, tot := stats.Snapshot(); tot.Ops[OpRead.String()].Ops != 0 {
		t.Fatalf("a read left undone was counted: %+v", tot.Ops[OpRead.String()])
	}

	// The executor's turn: the same request, read the cold way.
	if written := h.HandleCold(r, w); written != 4097 || w[1][0] != StatusOK {
		t.Fatalf("HandleCold = %d, status %#x", written, w[1][0])
	}
	if !bytes.Equal(w[0], d.data[8*512:8*512+4096]) {
		t.Fatal("HandleCold's data differs from the disk's")
	}
	if _, tot := stats.Snapshot(); tot.Ops[OpRead.String()].Ops != 1 {
		t.Fatalf("reads counted = %d, want 1", tot.Ops[OpRead.String()].Ops)
	}
	if got := d.calls; len(got) != 2 || got[0] != "cached" || got[1] != "cold" {
		t.Fatalf("disk calls %q, want [cached cold]", got)
	}
}

// Which inline reads ask whether their data is cached: the first, then one
// in probeEvery; after a miss, every read until probeSpan in a row hit.
func TestInlineReadsAskForCachedDataAtTheStartEveryNthAndAfterAMiss(t *testing.T) {
	d := newCacheDisk()
	h := NewHandler(NewDiskRef(d), Options{})
	asked := func(n int) []int {
		t.Helper()
		var got []int
		for i := range n {
			d.calls = d.calls[:0]
			r, w := inRequest(0)
			if _, done := h.TryHandle(r, w); !done || w[1][0] != StatusOK {
				t.Fatalf("read %d: done %v status %#x", i, done, w[1][0])
			}
			if d.calls[0] == "cached" {
				got = append(got, i)
			}
		}
		return got
	}
	if got := asked(2 * probeEvery); len(got) != 2 || got[0] != 0 || got[1] != probeEvery {
		t.Fatalf("reads that asked: %v, want [0 %d]", got, probeEvery)
	}
	// A miss (sector 16 is cold): every read asks for probeSpan reads.
	d.cold[16*512] = true
	for {
		r, w := inRequest(16)
		if _, done := h.TryHandle(r, w); !done {
			break
		}
	}
	delete(d.cold, 16*512)
	if got := asked(probeSpan); len(got) != probeSpan {
		t.Fatalf("%d of the %d reads after a miss asked, want all", len(got), probeSpan)
	}
	if got := asked(probeEvery); len(got) != 1 {
		t.Fatalf("after %d hits in a row, %d of %d reads asked, want 1", probeSpan, len(got), probeEvery)
	}
}

func TestHandleAndWritesNeverAskWhetherDataIsCached(t *testing.T) {
	d := newCacheDisk()
	d.cold[0] = true
	h := NewHandler(NewDiskRef(d), Options{})
	r, w := inRequest(0)
	if written := h.Handle(r, w); written != 4097 || w[1][0] != StatusOK {
		t.Fatalf("Handle of a cold read = %d, status %#x: Handle must read it, cold or not", written, w[1][0])
	}
	out := [][]byte{hdr(TypeOut, 0), bytes.Repeat([]byte{1}, 512)}
	status := [][]byte{{0xff}}
	if written, done := h.TryHandle(out, status); !done || written != 1 || status[0][0] != StatusOK {
		t.Fatalf("TryHandle of a write = (%d, %v), status %#x", written, done, status[0][0])
	}
	if got := d.calls; len(got) != 1 || got[0] != "plain" {
		t.Fatalf("disk reads %q, want [plain]", got)
	}
}

// A Disk that is not a CachedReader behind a DiskRef: inline reads always
// complete.
func TestInlineReadsOfADiskThatCannotTellAlwaysComplete(t *testing.T) {
	d := newMemDisk(testDiskSize, 512)
	h := NewHandler(NewDiskRef(d), Options{})
	for i := range 3 {
		r, w := inRequest(uint64(8 * i))
		if written, done := h.TryHandle(r, w); !done || written != 4097 || w[1][0] != StatusOK {
			t.Fatalf("read %d: (%d, %v) status %#x", i, written, done, w[1][0])
		}
	}
}
