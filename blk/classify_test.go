package blk

import (
	"encoding/binary"
	"testing"
)

// Only IN and GET_ID count as reads (they change nothing on the disk); a
// header too short to hold the type is left to Handle.
func TestIsReadTellsReadsFromRequestsThatChangeTheDisk(t *testing.T) {
	tests := []struct {
		name     string
		readable [][]byte
		want     bool
	}{
		{"IN", [][]byte{hdr(TypeIn, 8)}, true},
		{"GET_ID", [][]byte{hdr(TypeGetID, 0)}, true},
		{"OUT", [][]byte{hdr(TypeOut, 8), make([]byte, 512)}, false},
		{"FLUSH", [][]byte{hdr(TypeFlush, 0)}, false},
		{"DISCARD", [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}, false},
		{"WRITE_ZEROES", [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 8, 0)}, false},
		{"unknown type", [][]byte{hdr(99, 0)}, false},
		{"header split after 2 bytes", [][]byte{hdr(TypeIn, 0)[:2], hdr(TypeIn, 0)[2:]}, false},
		{"type alone in the first buffer", [][]byte{hdr(TypeIn, 0)[:4], hdr(TypeIn, 0)[4:]}, true},
		{"no readable buffer", nil, false},
	}
	for _, tc := range tests {
		if got := IsRead(tc.readable); got != tc.want {
			t.Errorf("%s: IsRead = %t, want %t", tc.name, got, tc.want)
		}
	}
}

// FuzzIsRead: any buffer list is classified without a panic, and a read is
// always a request whose first four bytes say IN or GET_ID.
func FuzzIsRead(f *testing.F) {
	f.Add(hdr(TypeIn, 0), 16)
	f.Add(hdr(TypeOut, 0), 3)
	f.Add([]byte{}, 0)
	f.Fuzz(func(t *testing.T, b []byte, cut int) {
		var bufs [][]byte
		if cut >= 0 && cut <= len(b) {
			bufs = [][]byte{b[:cut], b[cut:]}
		} else {
			bufs = [][]byte{b}
		}
		if IsRead(bufs) {
			typ := binary.LittleEndian.Uint32(bufs[0])
			if typ != TypeIn && typ != TypeGetID {
				t.Fatalf("type %d classified as a read", typ)
			}
		}
	})
}

// quickDisk is a memory-less Disk whose QuickWrite answers what it is told
// and records the range it was asked about.
type quickDisk struct {
	answer bool
	off, n int64
}

func (d *quickDisk) ReadVec([][]byte, int64) error  { return nil }
func (d *quickDisk) WriteVec([][]byte, int64) error { return nil }
func (d *quickDisk) Flush() error                   { return nil }
func (d *quickDisk) Size() int64                    { return 1 << 30 }
func (d *quickDisk) LogicalSectorSize() uint32      { return 512 }
func (d *quickDisk) PhysicalSectorSize() uint32     { return 512 }
func (d *quickDisk) QuickWrite(off, n int64) bool   { d.off, d.n = off, n; return d.answer }

// Reads are quick; an OUT is quick only in write-back mode on a writable
// device whose disk says its range is allocated; FLUSH and friends never.
func TestQuickRunsReadsAndOverwritesOfAllocatedBlocksInline(t *testing.T) {
	wt := new(WriteCache)
	wt.SetWriteThrough(true)
	tests := []struct {
		name     string
		diskSays bool
		opts     Options
		readable [][]byte
		want     bool
	}{
		{"read", false, Options{}, [][]byte{hdr(TypeIn, 8)}, true},
		{"overwrite", true, Options{}, [][]byte{hdr(TypeOut, 8), make([]byte, 4096)}, true},
		{"write the disk would allocate", false, Options{}, [][]byte{hdr(TypeOut, 8), make([]byte, 4096)}, false},
		{"overwrite in write-through mode", true, Options{Cache: wt}, [][]byte{hdr(TypeOut, 8), make([]byte, 4096)}, false},
		{"overwrite on a read-only device", true, Options{ReadOnly: true}, [][]byte{hdr(TypeOut, 8), make([]byte, 4096)}, false},
		{"flush", true, Options{}, [][]byte{hdr(TypeFlush, 0)}, false},
		{"discard", true, Options{}, [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}, false},
		{"write without data", true, Options{}, [][]byte{hdr(TypeOut, 8)}, false},
		{"header cut short", true, Options{}, [][]byte{hdr(TypeOut, 8)[:12], make([]byte, 516)}, false},
		{"sector past 2^54", true, Options{}, [][]byte{hdr(TypeOut, 1<<54), make([]byte, 512)}, false},
	}
	for _, tc := range tests {
		d := &quickDisk{answer: tc.diskSays}
		if got := Quick(d, tc.opts, tc.readable); got != tc.want {
			t.Errorf("%s: Quick = %t, want %t", tc.name, got, tc.want)
		}
	}
	d := &quickDisk{answer: true}
	Quick(d, Options{}, [][]byte{hdr(TypeOut, 8), make([]byte, 1000), make([]byte, 3096)})
	if d.off != 8*512 || d.n != 4096 {
		t.Errorf("asked the disk about %d bytes at %d, want 4096 at 4096", d.n, d.off)
	}
}
