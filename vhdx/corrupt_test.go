package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// Layout of the base image built by corruptBase (see CreateStorage).
const (
	imgLogOff  = 1 * mib
	imgMetaOff = 2 * mib
	imgBATOff  = 3 * mib
	imgData    = 4 * mib
	// Metadata entries in creation order.
	imgMDFileParams = 0
	imgMDSize       = 1
	imgMDLogical    = 3
	imgMDPhysical   = 4
	// Region table entries in creation order.
	imgRTMeta = 0
	imgRTBAT  = 1
)

var le = binary.LittleEndian // shorthand for the corruption tables

// corruptBase returns a valid 64 MiB dynamic image with 1 MiB blocks in which
// payload blocks 0 and 1 are allocated at 4 MiB and 5 MiB.
func corruptBase(t *testing.T, o CreateOptions) []byte {
	t.Helper()
	if o.Size == 0 {
		o.Size, o.BlockSize = 64*mib, 1*mib
	}
	s := createMem(t, o)
	im, err := OpenStorage(s, OpenOptions{})
	if err != nil {
		t.Fatalf("open base image: %v", err)
	}
	if _, err := im.WriteAt(pattern(1, 2*mib), 0); err != nil {
		t.Fatalf("write base image: %v", err)
	}
	if err := im.Close(); err != nil {
		t.Fatalf("close base image: %v", err)
	}
	return s.bytes()
}

// Mutators that keep every checksum valid, so that exactly one rule breaks.
func editHeaders(b []byte, f func(h []byte)) {
	for _, off := range []int{header1Offset, header2Offset} {
		h := b[off : off+headerSize]
		f(h)
		putChecksum(h, hdrOffChecksum)
	}
}

func editRegionTables(b []byte, f func(rt []byte)) {
	for _, off := range []int{regionTable1Off, regionTable2Off} {
		rt := b[off : off+regionTableSize]
		f(rt)
		putChecksum(rt, rtOffChecksum)
	}
}

func rtEntry(rt []byte, i int) []byte { return rt[rtHeaderSize+i*rtEntrySize:] }
func mdEntry(b []byte, i int) []byte  { return b[imgMetaOff+mdHeaderSize+i*mdEntrySize:] }
func mdItem(b []byte, i int) []byte {
	return b[imgMetaOff+int(le.Uint32(mdEntry(b, i)[mdeOffOffset:])):]
}
func batEntryAt(b []byte, i int) []byte { return b[imgBATOff+8*i:] }

func TestOpenRefusesEachBrokenRule(t *testing.T) {
	tests := []struct {
		name     string
		base     CreateOptions
		mutate   func(b []byte)
		sentinel error
		want     string // substring naming the structure and rule
	}{
		{"FileIdentifierSignature", CreateOptions{}, func(b []byte) { copy(b, "vhdxfilx") }, ErrNotVHDX, "file identifier"},
		{"BothHeaderChecksums", CreateOptions{}, func(b []byte) {
			b[header1Offset+100] ^= 1
			b[header2Offset+100] ^= 1
		}, ErrCorrupt, "no valid header (header 1: checksum"},
		{"BothHeaderSignatures", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { copy(h, "HEAD") })
		}, ErrCorrupt, `signature "HEAD" is not "head"`},
		{"HeaderVersion", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint16(h[hdrOffVersion:], 2) })
		}, ErrUnsupported, "header 2 at offset 0x20000: version 2 is not 1"},
		{"LogVersionWithLogGUID", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) {
				le.PutUint16(h[hdrOffLogVersion:], 1)
				guidToDisk(h[hdrOffLogGUID:], uuid.New())
			})
		}, ErrUnsupported, "log version 1"},
		{"LogLengthNotMiB", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint32(h[hdrOffLogLength:], mib+4096) })
		}, ErrCorrupt, "log length 0x101000"},
		{"LogLengthZero", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint32(h[hdrOffLogLength:], 0) })
		}, ErrCorrupt, "log length 0x0"},
		{"LogOffsetInHeaderSection", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint64(h[hdrOffLogOffset:], 0) })
		}, ErrCorrupt, "log offset 0x0"},
		{"LogPastEndOfFile", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint64(h[hdrOffLogOffset:], 1<<40) })
		}, ErrCorrupt, "log [0x10000000000"},
		{"LogOffsetOverflows", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint64(h[hdrOffLogOffset:], ^uint64(mib-1)) })
		}, ErrCorrupt, "extends past the end of the file"},
		{"EqualSequenceNumbersDifferentHeaders", CreateOptions{}, func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint64(h[hdrOffSequence:], 7) })
			b[header1Offset+hdrOffFileWrite] ^= 1
			putChecksum(b[header1Offset:header1Offset+headerSize], hdrOffChecksum)
		}, ErrCorrupt, "same sequence number 7"},
		{"BothRegionTableChecksums", CreateOptions{}, func(b []byte) {
			b[regionTable1Off+1000] ^= 1
			b[regionTable2Off+1000] ^= 1
		}, ErrCorrupt, "region table 1 at offset 0x30000: checksum"},
		{"RegionTableSignature", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { copy(rt, "REGI") })
		}, ErrCorrupt, `region table 1 at offset 0x30000: signature "REGI"`},
		{"RegionEntryCount", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint32(rt[rtOffEntryCount:], 2048) })
		}, ErrCorrupt, "entry count 2048 exceeds 2047"},
		{"RegionOffsetBelow1MiB", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint64(rtEntry(rt, imgRTBAT)[rteOffFileOff:], 64*kib) })
		}, ErrCorrupt, "file offset 0x10000 is not a multiple of 1 MiB"},
		{"RegionOffsetUnaligned", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint64(rtEntry(rt, imgRTBAT)[rteOffFileOff:], imgBATOff+4096) })
		}, ErrCorrupt, "file offset 0x301000"},
		{"RegionLengthUnaligned", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint32(rtEntry(rt, imgRTBAT)[rteOffLength:], 4096) })
		}, ErrCorrupt, "length 0x1000 is not a multiple of 1 MiB"},
		{"RegionOverflows", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint64(rtEntry(rt, imgRTBAT)[rteOffFileOff:], ^uint64(mib-1)) })
		}, ErrCorrupt, "overflows"},
		{"RegionOverlapsLog", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint64(rtEntry(rt, imgRTMeta)[rteOffFileOff:], imgLogOff) })
		}, ErrCorrupt, "metadata region [0x100000, 0x200000) overlaps log"},
		{"RegionsOverlapEachOther", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint32(rtEntry(rt, imgRTMeta)[rteOffLength:], 2*mib) })
		}, ErrCorrupt, "metadata region [0x200000, 0x400000) overlaps BAT region"},
		{"RegionPastEndOfFile", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { le.PutUint64(rtEntry(rt, imgRTBAT)[rteOffFileOff:], 1<<40) })
		}, ErrCorrupt, "BAT region [0x10000000000, 0x10000100000) extends past the end of the file"},
		{"NoBATRegion", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) {
				guidToDisk(rtEntry(rt, imgRTBAT)[rteOffGUID:], uuid.New())
				le.PutUint32(rtEntry(rt, imgRTBAT)[rteOffRequired:], 0)
			})
		}, ErrCorrupt, "no BAT region"},
		{"DuplicateRegion", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) { guidToDisk(rtEntry(rt, imgRTMeta)[rteOffGUID:], RegionBAT) })
		}, ErrCorrupt, "GUID appears more than once"},
		{"UnknownRequiredRegion", CreateOptions{}, func(b []byte) {
			editRegionTables(b, func(rt []byte) {
				le.PutUint32(rt[rtOffEntryCount:], 3)
				e := rtEntry(rt, 2)
				guidToDisk(e[rteOffGUID:], uuid.MustParse("11111111-2222-3333-4444-555555555555"))
				le.PutUint64(e[rteOffFileOff:], 60*mib)
				le.PutUint32(e[rteOffLength:], mib)
				le.PutUint32(e[rteOffRequired:], 1)
			})
		}, ErrUnsupported, "unknown region is marked required"},
		{"MetadataSignature", CreateOptions{}, func(b []byte) { copy(b[imgMetaOff:], "METADATA") }, ErrCorrupt, "metadata table at offset 0x200000: signature"},
		{"MetadataEntryCount", CreateOptions{}, func(b []byte) { le.PutUint16(b[imgMetaOff+mdOffEntryCount:], 2048) }, ErrCorrupt, "entry count 2048 exceeds 2047"},
		{"MetadataItemBelow64KiB", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdEntry(b, imgMDSize)[mdeOffOffset:], 4096)
		}, ErrCorrupt, "offset 0x1000 is below 64 KiB"},
		{"MetadataItemTooLong", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdEntry(b, imgMDSize)[mdeOffLength:], mib+1)
		}, ErrCorrupt, "length 0x100001 exceeds 1 MiB"},
		{"MetadataItemPastRegion", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdEntry(b, imgMDSize)[mdeOffOffset:], mib-4)
		}, ErrCorrupt, "extends past the metadata region"},
		{"MetadataItemsOverlap", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdEntry(b, imgMDSize)[mdeOffOffset:], 64*kib+4)
		}, ErrCorrupt, "overlaps item"},
		{"MetadataZeroLengthWithOffset", CreateOptions{}, func(b []byte) {
			le.PutUint16(b[imgMetaOff+mdOffEntryCount:], 6)
			e := mdEntry(b, 5)
			guidToDisk(e[mdeOffItemID:], uuid.New())
			le.PutUint32(e[mdeOffOffset:], 128*kib)
		}, ErrCorrupt, "length is zero but offset is 0x20000"},
		{"MetadataRequiredItemMissing", CreateOptions{}, func(b []byte) {
			guidToDisk(mdEntry(b, imgMDFileParams)[mdeOffItemID:], uuid.New())
			le.PutUint32(mdEntry(b, imgMDFileParams)[mdeOffFlags:], 0)
		}, ErrCorrupt, "required file parameters item is missing"},
		{"MetadataItemWrongLength", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdEntry(b, imgMDSize)[mdeOffLength:], 4)
		}, ErrCorrupt, "virtual disk size metadata entry at offset 0x200040: length 4 is not 8"},
		{"MetadataDuplicateItem", CreateOptions{}, func(b []byte) {
			guidToDisk(mdEntry(b, imgMDPhysical)[mdeOffItemID:], MetaLogicalSectorSize)
		}, ErrCorrupt, "item ID appears more than once"},
		{"UnknownRequiredMetadata", CreateOptions{}, func(b []byte) {
			le.PutUint16(b[imgMetaOff+mdOffEntryCount:], 6)
			e := mdEntry(b, 5)
			guidToDisk(e[mdeOffItemID:], uuid.New())
			le.PutUint32(e[mdeOffOffset:], 128*kib)
			le.PutUint32(e[mdeOffLength:], 16)
			le.PutUint32(e[mdeOffFlags:], mdFlagIsRequired)
		}, ErrUnsupported, "unknown metadata item is marked required"},
		{"BlockSizeNotPowerOfTwo", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdItem(b, imgMDFileParams), 3*mib)
		}, ErrCorrupt, "block size 0x300000 is not a power of two"},
		{"BlockSizeTooLarge", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdItem(b, imgMDFileParams), 512*mib)
		}, ErrCorrupt, "block size 0x20000000"},
		{"BlockSizeTooSmall", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdItem(b, imgMDFileParams), 512*kib)
		}, ErrCorrupt, "block size 0x80000"},
		{"HasParent", CreateOptions{}, func(b []byte) {
			le.PutUint32(mdItem(b, imgMDFileParams)[4:], fpFlagHasParent)
		}, ErrCorrupt, "HasParent is set but there is no parent locator item"},
		{"LogicalSectorSize", CreateOptions{}, func(b []byte) { le.PutUint32(mdItem(b, imgMDLogical), 1024) }, ErrCorrupt, "logical sector size 1024 is not 512 or 4096"},
		{"PhysicalSectorSize", CreateOptions{}, func(b []byte) { le.PutUint32(mdItem(b, imgMDPhysical), 2048) }, ErrCorrupt, "physical sector size 2048 is not 512 or 4096"},
		{"VirtualSizeZero", CreateOptions{}, func(b []byte) { le.PutUint64(mdItem(b, imgMDSize), 0) }, ErrCorrupt, "virtual disk size 0 is not"},
		{"VirtualSizeNotSectorMultiple", CreateOptions{}, func(b []byte) { le.PutUint64(mdItem(b, imgMDSize), 64*mib-100) }, ErrCorrupt, "virtual disk size 67108764"},
		{"VirtualSizeOver64TiB", CreateOptions{}, func(b []byte) { le.PutUint64(mdItem(b, imgMDSize), 64*tib+512) }, ErrCorrupt, "at most 64 TiB"},
		{"BATRegionTooSmall", CreateOptions{}, func(b []byte) { le.PutUint64(mdItem(b, imgMDSize), 1*tib) }, ErrCorrupt, "BAT region at offset 0x300000: length 0x100000 holds 131072 entries"},
		{"BATReservedBits", CreateOptions{}, func(b []byte) { batEntryAt(b, 0)[1] |= 0x10 }, ErrCorrupt, "BAT entry 0 at offset 0x300000: reserved bits"},
		{"BATBlockInHeaderSection", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, 0))
		}, ErrCorrupt, "BAT entry 1 at offset 0x300008: block offset 0x0 lies in the header section"},
		{"BATBlockPastEndOfFile", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, 6*mib))
		}, ErrCorrupt, "block [0x600000, 0x700000) extends past the end of the file"},
		{"BATBlockOffsetHuge", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, ^uint64(0)))
		}, ErrCorrupt, "extends past the end of the file"},
		{"BATBlockOverlapsLog", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, imgLogOff))
		}, ErrCorrupt, "BAT entry 1 at offset 0x300008: block [0x100000, 0x200000) overlaps log"},
		{"BATBlockOverlapsMetadata", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, imgMetaOff))
		}, ErrCorrupt, "overlaps metadata region"},
		{"BATBlockOverlapsBAT", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, imgBATOff))
		}, ErrCorrupt, "overlaps BAT region"},
		{"BATBlocksShareSpace", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 1), makeBATEntry(stateFullyPresent, imgData))
		}, ErrCorrupt, "overlaps payload block of BAT entry"},
		{"BATPartiallyPresent", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 2), makeBATEntry(statePartiallyPresent, 0))
		}, ErrCorrupt, "BAT entry 2 at offset 0x300010: PARTIALLY_PRESENT is valid only in a differencing image"},
		{"BATReservedState4", CreateOptions{}, func(b []byte) {
			le.PutUint64(batEntryAt(b, 2), 4)
		}, ErrCorrupt, "BAT entry 2 at offset 0x300010: state 4 is reserved"},
		{"SectorBitmapPresent", CreateOptions{Size: 6 * gib, BlockSize: mib}, func(b []byte) {
			// 512-byte sectors, 1 MiB blocks: chunk ratio 4096, so entry
			// 4096 is the first sector bitmap entry.
			le.PutUint64(batEntryAt(b, 4096), makeBATEntry(stateFullyPresent, imgData))
		}, ErrCorrupt, "BAT entry 4096 at offset 0x308000: sector bitmap entry has state 6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := corruptBase(t, tt.base)
			// The unmodified image must open, or the row proves nothing.
			if im, err := OpenStorage(newMemStorage(b), OpenOptions{ReadOnly: true}); err != nil {
				t.Fatalf("base image does not open: %v", err)
			} else {
				im.Close()
			}
			tt.mutate(b)
			im, err := OpenStorage(newMemStorage(b), OpenOptions{ReadOnly: true})
			if err == nil {
				im.Close()
				t.Fatalf("OpenStorage succeeded, want %v", tt.sentinel)
			}
			if !errors.Is(err, tt.sentinel) {
				t.Fatalf("error %q does not wrap %v", err, tt.sentinel)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
			// A read-write open is refused the same way and writes
			// nothing to the refused file.
			before := append([]byte(nil), b...)
			ms := newMemStorage(b)
			if im, err := OpenStorage(ms, OpenOptions{}); err == nil {
				im.Close()
				t.Fatalf("read-write OpenStorage succeeded, want %v", tt.sentinel)
			} else if !errors.Is(err, tt.sentinel) {
				t.Fatalf("read-write open: error %q does not wrap %v", err, tt.sentinel)
			}
			if !bytes.Equal(ms.bytes(), before) {
				t.Fatal("a refused read-write open modified the file")
			}
		})
	}
}

func TestOpenToleratesOneBadCopy(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(b []byte)
	}{
		{"Header1Checksum", func(b []byte) { b[header1Offset+200] ^= 1 }},
		{"Header2Checksum", func(b []byte) { b[header2Offset+200] ^= 1 }},
		{"RegionTable1Checksum", func(b []byte) { b[regionTable1Off+200] ^= 1 }},
		{"RegionTable1Signature", func(b []byte) {
			copy(b[regionTable1Off:], "xxxx")
			putChecksum(b[regionTable1Off:regionTable1Off+regionTableSize], rtOffChecksum)
		}},
		{"RegionTable2Checksum", func(b []byte) { b[regionTable2Off+200] ^= 1 }},
		{"IdenticalHeadersWithEqualSequence", func(b []byte) {
			editHeaders(b, func(h []byte) { le.PutUint64(h[hdrOffSequence:], 9) })
		}},
		{"UnknownOptionalRegion", func(b []byte) {
			editRegionTables(b, func(rt []byte) {
				le.PutUint32(rt[rtOffEntryCount:], 3)
				e := rtEntry(rt, 2)
				guidToDisk(e[rteOffGUID:], uuid.New())
				le.PutUint64(e[rteOffFileOff:], 60*mib)
				le.PutUint32(e[rteOffLength:], mib)
			})
		}},
		{"UnmappedAndUndefinedStates", func(b []byte) {
			le.PutUint64(batEntryAt(b, 2), makeBATEntry(stateUnmapped, 5*mib))
			le.PutUint64(batEntryAt(b, 3), stateUndefined)
			le.PutUint64(batEntryAt(b, 4), stateUnmappedV095)
			le.PutUint64(batEntryAt(b, 5), stateZero)
		}},
	}
	want := pattern(1, 2*mib)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := corruptBase(t, CreateOptions{})
			tt.mutate(b)
			im, err := OpenStorage(newMemStorage(b), OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("OpenStorage: %v", err)
			}
			defer im.Close()
			got := make([]byte, 6*mib)
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if string(got[:2*mib]) != string(want) {
				t.Fatal("allocated blocks do not read back")
			}
			for i, c := range got[2*mib:] {
				if c != 0 {
					t.Fatalf("byte %#x of unallocated blocks is %#x, want 0", 2*mib+i, c)
				}
			}
		})
	}
}

func TestOpenPicksHeaderWithHigherSequenceNumber(t *testing.T) {
	b := corruptBase(t, CreateOptions{})
	g1, g2 := uuid.New(), uuid.New()
	for _, tc := range []struct {
		seq1, seq2 uint64
		want       uuid.UUID
	}{{10, 11, g2}, {12, 11, g1}} {
		h1 := b[header1Offset : header1Offset+headerSize]
		h2 := b[header2Offset : header2Offset+headerSize]
		le.PutUint64(h1[hdrOffSequence:], tc.seq1)
		le.PutUint64(h2[hdrOffSequence:], tc.seq2)
		guidToDisk(h1[hdrOffDataWrite:], g1)
		guidToDisk(h2[hdrOffDataWrite:], g2)
		putChecksum(h1, hdrOffChecksum)
		putChecksum(h2, hdrOffChecksum)
		im, err := OpenStorage(newMemStorage(b), OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := im.Info().DataWriteGUID; got != tc.want {
			t.Errorf("seq %d/%d: current header has DataWriteGuid %v, want %v", tc.seq1, tc.seq2, got, tc.want)
		}
		im.Close()
	}
}
