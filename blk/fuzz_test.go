package blk

import (
	"bytes"
	"testing"
)

const guard = 0x5A

// FuzzHandle feeds arbitrary bytes, cut into arbitrary readable and writable
// buffer lists, to Handle. It must not panic, must not write outside the
// writable buffers or into the readable ones, must not hand the disk an
// unchecked range, and must report a used length no larger than what it was
// given.
func FuzzHandle(f *testing.F) {
	f.Add(cat(hdr(TypeIn, 0)), []byte{16, 0, 255, 255, 1}, false, false, false)
	f.Add(cat(hdr(TypeOut, 1), pattern(512, 1)), []byte{10, 100, 255, 0, 1}, false, false, false)
	f.Add(cat(hdr(TypeGetID, 0)), []byte{16, 0, 5, 16}, true, false, false)
	f.Add(cat(hdr(TypeDiscard, 8), seg(8, 8, 0)), []byte{20, 12, 0, 1}, false, true, false)
	f.Add(cat(hdr(TypeWriteZeroes, 8), seg(8, 8, 1)), []byte{32, 0, 1}, true, true, true)
	f.Add(cat(hdr(TypeFlush, 0)), []byte{16, 0, 1}, false, false, true)
	f.Fuzz(func(t *testing.T, req, layout []byte, logical4k, trim, ro bool) {
		logical := uint32(512)
		if logical4k {
			logical = 4096
		}
		d := newMemDisk(64<<10, logical)
		var disk Disk = d
		if trim {
			disk = &trimDisk{memDisk: d}
		}
		// layout: readable buffer lengths cut from req until a 0 byte,
		// then writable buffer lengths (each byte times 17, so that a
		// whole 4096-byte sector fits in a few buffers).
		var readable [][]byte
		rest, i := req, 0
		for ; i < len(layout) && layout[i] != 0 && len(rest) > 0; i++ {
			n := min(int(layout[i]), len(rest))
			readable = append(readable, bytes.Clone(rest[:n]))
			rest = rest[n:]
		}
		if len(rest) > 0 {
			readable = append(readable, bytes.Clone(rest))
		}
		var sizes []int
		total := 0
		for i++; i < len(layout) && len(sizes) < 64; i++ {
			sizes = append(sizes, int(layout[i])*17%4200)
			total += sizes[len(sizes)-1]
		}
		// One arena with 8 guard bytes around every writable buffer; each
		// buffer is capped so an append could not reach a guard either.
		arena := bytes.Repeat([]byte{guard}, total+8*(len(sizes)+1))
		writable := make([][]byte, len(sizes))
		off := 8
		for k, n := range sizes {
			writable[k] = arena[off : off+n : off+n]
			clear(writable[k])
			off += n + 8
		}
		origReadable := make([][]byte, len(readable))
		for k := range readable {
			origReadable[k] = bytes.Clone(readable[k])
		}

		h := NewHandler(disk, Options{ReadOnly: ro, Serial: "fuzz"})
		written := h.Handle(readable, writable)

		if int(written) > total {
			t.Fatalf("written %d > %d writable bytes", written, total)
		}
		if written > 0 {
			all := cat(writable...)
			if got, want := all[len(all)-1], Status(h.Err()); got != want || got > StatusUnsupp {
				t.Fatalf("status byte %d, Status(Err()) = %d", got, want)
			}
		}
		if total > 0 && written == 0 {
			t.Fatalf("writable bytes present but no status written")
		}
		off = 0
		for k, n := range sizes {
			if !bytes.Equal(arena[off:off+8], bytes.Repeat([]byte{guard}, 8)) {
				t.Fatalf("guard before writable buffer %d overwritten", k)
			}
			off += 8 + n
		}
		if !bytes.Equal(arena[off:], bytes.Repeat([]byte{guard}, 8)) {
			t.Fatal("guard after the last writable buffer overwritten")
		}
		for k := range readable {
			if !bytes.Equal(readable[k], origReadable[k]) {
				t.Fatalf("device-readable buffer %d modified", k)
			}
		}
		if d.violations != 0 {
			t.Fatalf("handler passed %d unchecked accesses to the disk", d.violations)
		}
		if ro && !bytes.Equal(d.data, newMemDisk(64<<10, logical).data) {
			t.Fatal("read-only disk modified")
		}
	})
}
