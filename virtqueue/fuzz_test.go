package virtqueue_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

const fuzzRegionSize = 4096

// brokenForGood fails t unless err, returned by q.Next, is ErrRingBroken
// and the next Next returns the same error again (a broken ring is sticky).
func brokenForGood(t *testing.T, q virtqueue.Queue, c *virtqueue.Chain, err error) {
	t.Helper()
	if !errors.Is(err, virtqueue.ErrRingBroken) {
		t.Fatalf("Next error %v is not ErrRingBroken", err)
	}
	if ok2, err2 := q.Next(c); ok2 || err2 != err {
		t.Fatalf("broken queue recovered: %v, %v", ok2, err2)
	}
}

// takeFuzz takes the next n bytes of the fuzz input *in, padded with zeros
// once the input runs out.
func takeFuzz(in *[]byte, n int) []byte {
	b := make([]byte, n)
	k := copy(b, *in)
	*in = (*in)[k:]
	return b
}

// fuzzDescs takes size raw 16-byte descriptors from the fuzz input *in and
// hands each to set: its address and length, and its last two 16-bit words
// as fuzzed (split: flags, next; packed: id, flags). Most addresses and
// lengths are kept near the mock guest memory (memSize bytes) so the walk
// gets past translation; a set top bit keeps the fuzzed value raw.
func fuzzDescs(in *[]byte, size uint16, memSize uint64, set func(i uint16, addr uint64, n uint32, w12, w14 uint16)) {
	for i := uint16(0); i < size; i++ {
		raw := takeFuzz(in, 16)
		addr, n := binary.LittleEndian.Uint64(raw[0:]), binary.LittleEndian.Uint32(raw[8:])
		if addr>>63 == 0 {
			addr = vqt.GuestPhysBase + addr%(memSize+64)
		}
		if n>>31 == 0 {
			n %= 2 * fuzzRegionSize
		}
		set(i, addr, n, binary.LittleEndian.Uint16(raw[12:]), binary.LittleEndian.Uint16(raw[14:]))
	}
}

// fuzzInput encodes a queue for FuzzChain: two shape bytes, then size
// descriptors of 16 bytes, size avail ring entries, the avail index, and
// bytes for the data area (where indirect tables can point).
func fuzzInput(shape0, shape1 byte, descs []vqt.Desc, ring []uint16, idx uint16, data []byte) []byte {
	b := []byte{shape0, shape1}
	for _, d := range descs {
		var e [16]byte
		binary.LittleEndian.PutUint64(e[0:], d.Addr)
		binary.LittleEndian.PutUint32(e[8:], d.Len)
		binary.LittleEndian.PutUint16(e[12:], d.Flags)
		binary.LittleEndian.PutUint16(e[14:], d.Next)
		b = append(b, e[:]...)
	}
	for _, h := range ring {
		b = binary.LittleEndian.AppendUint16(b, h)
	}
	b = binary.LittleEndian.AppendUint16(b, idx)
	return append(b, data...)
}

// FuzzChain turns fuzz bytes into a descriptor table and avail ring in a
// mock guest and drains the queue. Invariants: no panic, the drain ends
// within a bounded number of calls, a broken queue stays broken, chain errors
// are ErrInvalidChain and keep the head completable, and every buffer
// handed out lies inside guest memory.
func FuzzChain(f *testing.F) {
	// Addresses below 2^63 are folded into the fake memory; the offset is
	// relative to GuestPhysBase. The data area of a size-4 queue starts at
	// 0x100 in the default layout.
	f.Add(fuzzInput(2, 0, []vqt.Desc{
		{Addr: 0x100, Len: 16, Flags: fNext, Next: 1},
		{Addr: 0x200, Len: 512, Flags: fNext | fWrite, Next: 2},
		{Addr: 0x400, Len: 1, Flags: fWrite},
		{},
	}, []uint16{0, 0, 0, 0}, 1, nil))
	f.Add(fuzzInput(2, 1, []vqt.Desc{
		{Addr: 0x1000 - 8, Len: 32, Flags: fIndirect}, {}, {}, {},
	}, []uint16{0, 1, 2, 3}, 2, nil))
	f.Add(fuzzInput(4, 6, []vqt.Desc{
		{Addr: 0x180, Len: 48, Flags: fIndirect},
		{Addr: 0x100, Len: 4, Flags: fNext, Next: 1},
	}, []uint16{0, 1}, 2, make([]byte, 64)))
	f.Add([]byte{0, 0})

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 2 {
			return
		}
		size := uint16(1) << (in[0] % 5) // 1..16
		cfg := vqt.Config{
			Size:            size,
			Regions:         1 + int(in[1]&1),
			RegionSize:      fuzzRegionSize,
			EventIdx:        in[1]&2 != 0,
			AvailMisaligned: in[1]&4 != 0,
			Start:           uint16(in[0]) << 8,
		}
		d, err := vqt.New(cfg)
		d, q := withQueue(t, d, err)
		memSize := uint64(len(d.Guest))
		in = in[2:]
		fuzzDescs(&in, size, memSize, func(i uint16, addr uint64, n uint32, flags, next uint16) {
			d.SetDesc(i, vqt.Desc{Addr: addr, Len: n, Flags: flags, Next: next})
		})
		ring := d.AvailRing()
		for i := 0; i < int(size); i++ {
			copy(ring[4+2*i:], takeFuzz(&in, 2))
		}
		idx := binary.LittleEndian.Uint16(takeFuzz(&in, 2))
		if idx>>15 == 0 {
			idx = cfg.Start + idx%(size+1)
		}
		d.SetAvailIdx(idx)
		start, _ := d.DataArea()
		copy(d.Bytes(start, int(memSize-(start-vqt.GuestPhysBase))), in)

		var c virtqueue.Chain
		for i := 0; i <= int(size)+1; i++ {
			ok, err := q.Next(&c)
			if err != nil {
				brokenForGood(t, q, &c, err)
				return
			}
			if !ok {
				break
			}
			if c.Head >= size {
				t.Fatalf("head %d, queue size %d", c.Head, size)
			}
			if c.Err != nil && !errors.Is(c.Err, virtqueue.ErrInvalidChain) {
				t.Fatalf("chain error %v is not ErrInvalidChain", c.Err)
			}
			var total uint64
			for _, bufs := range [][][]byte{c.Readable, c.Writable} {
				for _, b := range bufs {
					if len(b) == 0 || !d.Contains(b) {
						t.Fatalf("buffer of %d bytes outside guest memory", len(b))
					}
					total += uint64(len(b))
				}
			}
			if total > 1<<32-1 {
				t.Fatalf("chain of %d bytes", total)
			}
			if err := q.PushUsed(c.Head, 0); err != nil {
				t.Fatalf("PushUsed(%d): %v", c.Head, err)
			}
			q.NeedsNotification()
		}
		if ok, err := q.Next(&c); ok || err != nil {
			t.Fatalf("queue not drained after %d chains: %v, %v", size, ok, err)
		}
		if _, err := q.EnableNotifications(); err != nil {
			t.Fatalf("EnableNotifications: %v", err)
		}
	})
}
