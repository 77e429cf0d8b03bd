package blk

import (
	"encoding/binary"
	"math/bits"
)

// Offsets in struct virtio_blk_config (VIRTIO 1.2 §5.2.4; verified against
// <linux/virtio_blk.h>, see docs/vhost-user.md §4.3).
const (
	cfgCapacity               = 0  // le64, 512-byte sectors
	cfgSizeMax                = 8  // le32
	cfgSegMax                 = 12 // le32
	cfgGeometry               = 16 // cylinders le16, heads u8, sectors u8: left zero
	cfgBlkSize                = 20 // le32
	cfgPhysicalBlockExp       = 24 // u8
	cfgAlignmentOffset        = 25 // u8
	cfgMinIOSize              = 26 // le16, logical blocks
	cfgOptIOSize              = 28 // le32, logical blocks
	cfgWriteback              = 32 // u8
	cfgNumQueues              = 34 // le16
	cfgMaxDiscardSectors      = 36 // le32
	cfgMaxDiscardSeg          = 40 // le32
	cfgDiscardSectorAlignment = 44 // le32, 512-byte sectors
	cfgMaxWriteZeroesSectors  = 48 // le32
	cfgMaxWriteZeroesSeg      = 52 // le32
	cfgWriteZeroesMayUnmap    = 56 // u8

	// ConfigSize is the whole struct up to and including the zoned fields.
	// QEMU reads at most 57 bytes from a vhost-user-blk back-end (it never
	// passes SECURE_ERASE or ZONED through, docs/vhost-user.md §1.11); the
	// rest is zero padding so any in-struct GET_CONFIG range can be served.
	ConfigSize = 96
)

// ConfigWriteback is the offset of `writeback`, the only field a driver may
// write (VIRTIO 1.2 §5.2.4, with CONFIG_WCE).
const ConfigWriteback = cfgWriteback

// Discard and write-zeroes limits.
//
// Segments: Linux merges the discards of an fstrim into requests of up to
// max_discard_seg ranges (its own cap is 256, MAX_DISCARD_SEGMENTS); every
// range still costs one Discard call, but one request carries many, so fewer
// round trips through the ring. 256 segments are one 4 KiB buffer, parsed
// in place (no allocation). Write-zeroes requests carry one range in Linux;
// we accept as many as for discard.
//
// Sectors per range: the disk changes the BAT entries of whole blocks in
// memory and group-commits them at the next flush (vhdx discard.go), so a
// range costs one hole punch per run of freed blocks plus the in-memory
// work, growing with the number of blocks it covers. vhdx's
// BenchmarkDiscardFstrim on ext4 (8 GiB, every block allocated, flush
// included; a loaded 2-core machine): 1 MiB ranges of 1 MiB blocks 0.36 ms
// each; 1 GiB ranges about 8 ms each with 1 MiB blocks and 2-4 ms with 8
// or 32 MiB blocks. 2 GiB (a multiple of any block size) keeps the time a
// queue worker spends on one range to tens of milliseconds at worst,
// where Linux's default for 0 (UINT_MAX sectors, 2 TiB) could hold the
// queue for seconds, and still makes an fstrim of a large file system a
// few hundred requests per TiB at most.
//
// Alignment: discard_sector_alignment becomes Linux's discard_granularity.
// Whole blocks are released by the BAT, but partial ranges are punched
// inside payload blocks, which frees host space at the host page size: the
// physical sector (4 KiB by default) lets a file system's free extents of
// any 4 KiB multiple be given back, where a block-sized granularity would
// make Linux drop every free extent smaller than a block.
const (
	maxTrimBytes = 2 << 30
	maxSegments  = 256
)

// maxTrimSectors is the per-range limit in 512-byte sectors (see above).
const maxTrimSectors = maxTrimBytes >> sectorShift

// Features returns the virtio-blk device feature bits to offer for d.
// VIRTIO_F_VERSION_1 and ring features are transport bits and are added by
// the vhost-user layer.
func Features(d Disk, o Options) uint64 {
	o = o.withDefaults()
	f := uint64(1)<<FeatureSizeMax |
		uint64(1)<<FeatureSegMax |
		uint64(1)<<FeatureBlkSize |
		uint64(1)<<FeatureFlush | // VIRTIO 1.2 §5.2.5: without FLUSH no write is guaranteed stable
		uint64(1)<<FeatureTopology
	if o.NumQueues > 1 {
		f |= 1 << FeatureMQ
	}
	if o.ReadOnly {
		f |= 1 << FeatureRO
	} else {
		// FLUSH is offered too, as CONFIG_WCE requires (VIRTIO 1.2 §5.2.5).
		if o.Cache != nil {
			f |= 1 << FeatureConfigWCE
		}
		// Discard and write-zeroes modify the disk, so a read-only device
		// does not offer them.
		if discarderOf(d) != nil {
			f |= 1 << FeatureDiscard
		}
		if writeZeroerOf(d) != nil {
			f |= 1 << FeatureWriteZeroes
		}
	}
	return f
}

// Config returns struct virtio_blk_config for d, little-endian, ConfigSize
// bytes. Fields of features not offered by Features stay zero
// (VIRTIO 1.2 §5.2.4: padding and unused fields are zero).
func Config(d Disk, o Options) []byte {
	o = o.withDefaults()
	c := make([]byte, ConfigSize)
	le := binary.LittleEndian
	logical := sectorSizeOf(d)
	physical := physicalSizeOf(d, logical)
	perPhysical := physical / logical // power of two, >= 1

	le.PutUint64(c[cfgCapacity:], capacitySectors(d))
	le.PutUint32(c[cfgSizeMax:], o.SizeMax)
	le.PutUint32(c[cfgSegMax:], o.SegMax)
	le.PutUint32(c[cfgBlkSize:], uint32(logical))
	// Topology is in logical blocks (VIRTIO 1.2 §5.2.4). I/O smaller than a
	// physical sector costs a read-modify-write in the image, so the
	// physical sector is both the minimum and the optimal I/O size, as QEMU
	// derives them from the physical block size.
	c[cfgPhysicalBlockExp] = uint8(bits.TrailingZeros64(perPhysical))
	c[cfgAlignmentOffset] = 0
	le.PutUint16(c[cfgMinIOSize:], uint16(perPhysical))
	le.PutUint32(c[cfgOptIOSize:], uint32(perPhysical))
	le.PutUint16(c[cfgNumQueues:], o.NumQueues)

	f := Features(d, o)
	// Without CONFIG_WCE the field is unused and stays 0.
	if f&(1<<FeatureConfigWCE) != 0 {
		c[cfgWriteback] = o.Cache.Writeback()
	}
	if f&(1<<FeatureDiscard) != 0 {
		le.PutUint32(c[cfgMaxDiscardSectors:], maxTrimSectors)
		le.PutUint32(c[cfgMaxDiscardSeg:], maxSegments)
		le.PutUint32(c[cfgDiscardSectorAlignment:], uint32(physical>>sectorShift))
	}
	if f&(1<<FeatureWriteZeroes) != 0 {
		le.PutUint32(c[cfgMaxWriteZeroesSectors:], maxTrimSectors)
		le.PutUint32(c[cfgMaxWriteZeroesSeg:], maxSegments)
		c[cfgWriteZeroesMayUnmap] = 1
	}
	return c
}
