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
