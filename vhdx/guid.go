package vhdx

import "github.com/google/uuid"

// VHDX stores GUIDs in the Microsoft mixed-endian layout: Data1 (4 bytes),
// Data2 (2 bytes) and Data3 (2 bytes) little-endian, Data4 (8 bytes) as is.
// google/uuid keeps the RFC 4122 (big-endian) byte order, so every GUID that
// crosses the file boundary goes through exactly these two functions.

// guidFromDisk converts 16 on-disk MS-GUID bytes to a uuid.UUID.
// Precondition: len(b) >= 16 (callers slice fixed-size structures).
func guidFromDisk(b []byte) uuid.UUID {
	var u uuid.UUID
	u[0], u[1], u[2], u[3] = b[3], b[2], b[1], b[0]
	u[4], u[5] = b[5], b[4]
	u[6], u[7] = b[7], b[6]
	copy(u[8:], b[8:16])
	return u
}

// guidToDisk writes u into b[0:16] in the on-disk MS-GUID layout.
// Precondition: len(b) >= 16.
func guidToDisk(b []byte, u uuid.UUID) {
	b[0], b[1], b[2], b[3] = u[3], u[2], u[1], u[0]
	b[4], b[5] = u[5], u[4]
	b[6], b[7] = u[7], u[6]
	copy(b[8:16], u[8:])
}

// Well-known GUIDs (MS-VHDX §2.2.3.2 known regions, §2.6.2 known metadata
// items, §2.6.2.6.3 VHDX parent locator type).
var (
	RegionBAT      = uuid.MustParse("2DC27766-F623-4200-9D64-115E9BFD4A08")
	RegionMetadata = uuid.MustParse("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	MetaFileParameters     = uuid.MustParse("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	MetaVirtualDiskSize    = uuid.MustParse("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	MetaVirtualDiskID      = uuid.MustParse("BECA12AB-B2E6-4523-93EF-C309E000C746")
	MetaLogicalSectorSize  = uuid.MustParse("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	MetaPhysicalSectorSize = uuid.MustParse("CDA348C7-445D-4471-9CC9-E9885251C556")
	MetaParentLocator      = uuid.MustParse("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

	ParentLocatorVHDX = uuid.MustParse("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)
