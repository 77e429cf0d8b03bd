// Package pattern defines the deterministic data that the QEMU tests write
// from inside the guest and rebuild on the host as the expected disk
// contents. The byte at absolute offset off of a stream depends only on the
// stream's seed and on off, so any sub-range can be produced or checked on
// its own, in any order and by any number of writers.
package pattern

import "encoding/binary"

// word returns the 8 bytes that start at the 8-aligned offset off.
func word(seed uint64, off int64) uint64 {
	// splitmix64 of the seed and the word index: cheap and well mixed, so a
	// block that lands at the wrong offset never matches by accident.
	z := seed*0x9e3779b97f4a7c15 ^ uint64(off/8) + 0x632be59bd9b4e5cb
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// Fill fills buf with the bytes of stream seed that lie at absolute offsets
// off .. off+len(buf)-1.
func Fill(buf []byte, seed uint64, off int64) {
	var w [8]byte
	for i := 0; i < len(buf); {
		abs := off + int64(i)
		base := abs &^ 7
		binary.LittleEndian.PutUint64(w[:], word(seed, base))
		n := copy(buf[i:], w[abs-base:])
		i += n
	}
}

// Mismatch returns the index of the first byte of buf that differs from
// stream seed at offset off, or -1 when buf matches.
func Mismatch(buf []byte, seed uint64, off int64) int {
	want := make([]byte, 64<<10)
	for i := 0; i < len(buf); i += len(want) {
		chunk := buf[i:min(i+len(want), len(buf))]
		Fill(want[:len(chunk)], seed, off+int64(i))
		for j := range chunk {
			if chunk[j] != want[j] {
				return i + j
			}
		}
	}
	return -1
}
