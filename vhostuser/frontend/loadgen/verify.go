package loadgen

import (
	"encoding/binary"
	"fmt"
)

// SectorSize is the unit --verify tags: every 512-byte sector carries its
// own LBA and the run seed, so a read that returns the wrong sector, stale
// data or a torn write is caught whatever the request size.
const SectorSize = 512

var le = binary.LittleEndian

// tagWord is the filler of a sector: it depends on the LBA and seed only,
// so concurrent reads and writes of one sector always agree on it.
func tagWord(lba, seed uint64) uint64 {
	z := lba*0x9e3779b97f4a7c15 ^ seed
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// FillTagged writes the tag of each 512-byte sector of b, the first being
// lba: the LBA, the seed, then a word derived from both repeated.
func FillTagged(b []byte, lba, seed uint64) {
	for off := 0; off+SectorSize <= len(b); off += SectorSize {
		s := b[off : off+SectorSize]
		le.PutUint64(s[0:], lba)
		le.PutUint64(s[8:], seed)
		w := tagWord(lba, seed)
		for i := 16; i < SectorSize; i += 8 {
			le.PutUint64(s[i:], w)
		}
		lba++
	}
}

// CheckTagged verifies what FillTagged wrote and describes the first bad
// sector.
func CheckTagged(b []byte, lba, seed uint64) error {
	for off := 0; off+SectorSize <= len(b); off += SectorSize {
		s := b[off : off+SectorSize]
		gotLBA, gotSeed := le.Uint64(s[0:]), le.Uint64(s[8:])
		if gotLBA != lba || gotSeed != seed {
			return fmt.Errorf("%w: sector %d holds the tag of sector %d seed %#x (want seed %#x)", ErrVerify, lba, gotLBA, gotSeed, seed)
		}
		w := tagWord(lba, seed)
		for i := 16; i < SectorSize; i += 8 {
			if le.Uint64(s[i:]) != w {
				return fmt.Errorf("%w: sector %d: body differs at byte %d", ErrVerify, lba, i)
			}
		}
		lba++
	}
	return nil
}
