package vhdx

import (
	"encoding/binary"
	"hash/crc32"
)

// castagnoli is the CRC-32C table every VHDX checksum uses (MS-VHDX §2).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksumWithFieldZeroed computes CRC-32C over buf as if the 4-byte checksum
// field at fieldOff were zero, without modifying buf. Headers (§2.2.2), region
// tables (§2.2.3.1) and log entries (§2.3.1.1) all define their checksum so.
// Precondition: fieldOff+4 <= len(buf).
func checksumWithFieldZeroed(buf []byte, fieldOff int) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, buf[:fieldOff])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, buf[fieldOff+4:])
}

// storedChecksum reads the little-endian checksum stored at fieldOff.
func storedChecksum(buf []byte, fieldOff int) uint32 {
	return binary.LittleEndian.Uint32(buf[fieldOff : fieldOff+4])
}

// putChecksum computes and stores the checksum of buf at fieldOff.
func putChecksum(buf []byte, fieldOff int) {
	binary.LittleEndian.PutUint32(buf[fieldOff:fieldOff+4], 0)
	binary.LittleEndian.PutUint32(buf[fieldOff:fieldOff+4], crc32.Checksum(buf, castagnoli))
}
