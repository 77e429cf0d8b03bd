package blk

import (
	"errors"
	"testing"
)

// orderDisk records, at each Flush, whether the request's status byte had
// already been written (the handler pre-fills it with 0xff here).
type orderDisk struct {
	*trimDisk
	status            *byte
	flushAfterStatus  int
	flushBeforeStatus int
}

func (d *orderDisk) Flush() error {
	if *d.status == 0xff {
		d.flushBeforeStatus++
	} else {
		d.flushAfterStatus++
	}
	return d.memDisk.Flush()
}

// In write-through mode every write-type request is flushed before its
// status byte (and so its completion) exists; reads, GET_ID and write-back
// mode never flush.
func TestWriteThroughFlushesEveryWriteBeforeItsStatus(t *testing.T) {
	data := pattern(1024, 3)
	for _, tc := range []struct {
		name         string
		writeThrough bool
		readable     []byte
		writable     int // bytes of the writable buffer, status included
		wantFlushes  int
	}{
		{"OUT, write-through", true, cat(hdr(TypeOut, 2), data), 1, 1},
		{"OUT, write-back", false, cat(hdr(TypeOut, 2), data), 1, 0},
		{"WRITE_ZEROES, write-through", true, cat(hdr(TypeWriteZeroes, 0), seg(4, 2, 0)), 1, 1},
		{"DISCARD, write-through", true, cat(hdr(TypeDiscard, 0), seg(4, 2, 0)), 1, 1},
		{"IN, write-through", true, hdr(TypeIn, 2), 513, 0},
		{"GET_ID, write-through", true, hdr(TypeGetID, 0), 21, 0},
		{"OUT of zero bytes, write-through", true, hdr(TypeOut, 2), 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := make([]byte, tc.writable)
			w[len(w)-1] = 0xff
			d := &orderDisk{trimDisk: &trimDisk{memDisk: newMemDisk(testDiskSize, 512)}, status: &w[len(w)-1]}
			c := new(WriteCache)
			c.SetWriteThrough(tc.writeThrough)
			h := NewHandler(d, Options{Cache: c})
			h.Handle([][]byte{tc.readable}, [][]byte{w})
			if got := w[len(w)-1]; got != StatusOK {
				t.Fatalf("status %d (%v), want OK", got, h.Err())
			}
			if d.flushBeforeStatus != tc.wantFlushes || d.flushAfterStatus != 0 {
				t.Fatalf("flushes before the status %d, after %d; want %d before, 0 after",
					d.flushBeforeStatus, d.flushAfterStatus, tc.wantFlushes)
			}
		})
	}
}

// A write whose write-through flush fails completes with IOERR: the guest
// must not believe it durable.
func TestWriteThroughFlushFailureIsAnIOError(t *testing.T) {
	d := &failFlushDisk{memDisk: newMemDisk(testDiskSize, 512)}
	c := new(WriteCache)
	c.SetWriteThrough(true)
	h := NewHandler(d, Options{Cache: c})
	w := []byte{0xff}
	h.Handle([][]byte{cat(hdr(TypeOut, 0), pattern(512, 1))}, [][]byte{w})
	if w[0] != StatusIOErr || !errors.Is(h.Err(), errFlush) {
		t.Fatalf("status %d, err %v; want IOERR wrapping the flush error", w[0], h.Err())
	}
}

var errFlush = errors.New("flush failed")

type failFlushDisk struct{ *memDisk }

func (d *failFlushDisk) Flush() error { return errFlush }

// CONFIG_WCE is offered only with a WriteCache on a writable device, and
// `writeback` reports the cache's mode (1 write-back, 0 write-through);
// without CONFIG_WCE the field stays 0.
func TestConfigWritebackFollowsTheWriteCache(t *testing.T) {
	d := newMemDisk(testDiskSize, 512)
	c := new(WriteCache)
	for _, tc := range []struct {
		name          string
		opts          Options
		writeThrough  bool
		wantWCE       bool
		wantWriteback uint8
	}{
		{"no cache", Options{}, false, false, 0},
		{"cache, write-back", Options{Cache: c}, false, true, 1},
		{"cache, write-through", Options{Cache: c}, true, true, 0},
		{"read-only with cache", Options{Cache: c, ReadOnly: true}, false, false, 0},
	} {
		c.SetWriteThrough(tc.writeThrough)
		if got := Features(d, tc.opts)&(1<<FeatureConfigWCE) != 0; got != tc.wantWCE {
			t.Errorf("%s: CONFIG_WCE offered %v, want %v", tc.name, got, tc.wantWCE)
		}
		if got := Config(d, tc.opts)[ConfigWriteback]; got != tc.wantWriteback {
			t.Errorf("%s: writeback = %d, want %d", tc.name, got, tc.wantWriteback)
		}
	}
}
