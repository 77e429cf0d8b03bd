package blk

import (
	"encoding/binary"
	"testing"
)

func TestFeaturesOfferOnlyWhatTheDiskAndOptionsSupport(t *testing.T) {
	const base = 1<<FeatureSizeMax | 1<<FeatureSegMax | 1<<FeatureBlkSize | 1<<FeatureFlush | 1<<FeatureTopology
	plain := newMemDisk(4096, 512)
	trim := &trimDisk{memDisk: plain}
	for _, tc := range []struct {
		name string
		disk Disk
		opts Options
		want uint64
	}{
		{"plain disk, one queue", plain, Options{}, base},
		{"one explicit queue does not offer MQ", plain, Options{NumQueues: 1}, base},
		{"several queues offer MQ", plain, Options{NumQueues: 4}, base | 1<<FeatureMQ},
		{"read-only offers RO", plain, Options{ReadOnly: true}, base | 1<<FeatureRO},
		{"disk with Discard and WriteZeroes offers both", trim, Options{}, base | 1<<FeatureDiscard | 1<<FeatureWriteZeroes},
		{"read-only disk with Discard offers neither", trim, Options{ReadOnly: true}, base | 1<<FeatureRO},
	} {
		if got := Features(tc.disk, tc.opts); got != tc.want {
			t.Errorf("%s: Features = %#x, want %#x", tc.name, got, tc.want)
		}
		if got := Features(tc.disk, tc.opts); got>>24 != 0 {
			t.Errorf("%s: Features has transport bits %#x", tc.name, got)
		}
	}
}

func TestConfigLaysOutVirtioBlkConfig(t *testing.T) {
	le := binary.LittleEndian
	type fields struct {
		capacity                 uint64
		sizeMax, segMax, blkSize uint32
		physExp                  uint8
		minIO                    uint16
		optIO                    uint32
		numQueues                uint16
		maxDiscard, discardSeg   uint32
		discardAlign             uint32
		maxWZ, wzSeg             uint32
		wzMayUnmap               uint8
	}
	read := func(c []byte) fields {
		return fields{
			capacity: le.Uint64(c[0:]), sizeMax: le.Uint32(c[8:]), segMax: le.Uint32(c[12:]),
			blkSize: le.Uint32(c[20:]), physExp: c[24], minIO: le.Uint16(c[26:]), optIO: le.Uint32(c[28:]),
			numQueues: le.Uint16(c[34:]), maxDiscard: le.Uint32(c[36:]), discardSeg: le.Uint32(c[40:]),
			discardAlign: le.Uint32(c[44:]), maxWZ: le.Uint32(c[48:]), wzSeg: le.Uint32(c[52:]), wzMayUnmap: c[56],
		}
	}
	d512 := newMemDisk(1<<20, 512) // physical 4096
	d4k := newMemDisk(1<<20, 4096)
	same := newMemDisk(1<<20, 512)
	same.physical = 512
	for _, tc := range []struct {
		name string
		disk Disk
		opts Options
		want fields
	}{
		{"512e disk with defaults", d512, Options{},
			fields{capacity: 2048, sizeMax: DefaultSizeMax, segMax: DefaultSegMax, blkSize: 512, physExp: 3, minIO: 8, optIO: 8, numQueues: 1}},
		{"4Kn disk: capacity still in 512-byte sectors", d4k, Options{NumQueues: 2, SegMax: 254, SizeMax: 65536},
			fields{capacity: 2048, sizeMax: 65536, segMax: 254, blkSize: 4096, physExp: 0, minIO: 1, optIO: 1, numQueues: 2}},
		{"512n disk", same, Options{},
			fields{capacity: 2048, sizeMax: DefaultSizeMax, segMax: DefaultSegMax, blkSize: 512, physExp: 0, minIO: 1, optIO: 1, numQueues: 1}},
		{"discard limits only with the upgrades", &trimDisk{memDisk: d4k}, Options{},
			fields{capacity: 2048, sizeMax: DefaultSizeMax, segMax: DefaultSegMax, blkSize: 4096, minIO: 1, optIO: 1, numQueues: 1,
				maxDiscard: 4 << 20, discardSeg: 256, discardAlign: 8, maxWZ: 4 << 20, wzSeg: 256, wzMayUnmap: 1}},
	} {
		c := Config(tc.disk, tc.opts)
		if len(c) != ConfigSize {
			t.Fatalf("%s: len(Config) = %d, want %d", tc.name, len(c), ConfigSize)
		}
		if got := read(c); got != tc.want {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, got, tc.want)
		}
		// Geometry, alignment_offset, writeback, padding and everything
		// past write_zeroes_may_unmap stay zero (VIRTIO 1.2 §5.2.4).
		for _, off := range []int{16, 17, 18, 19, 25, 32, 33, 57, 58, 59} {
			if c[off] != 0 {
				t.Errorf("%s: byte %d = %#x, want 0", tc.name, off, c[off])
			}
		}
		for i, b := range c[60:] {
			if b != 0 {
				t.Errorf("%s: byte %d = %#x, want 0", tc.name, 60+i, b)
			}
		}
	}
}
