package virtqueue_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

// packedFuzzInput encodes a packed ring for FuzzPackedRing: two shape bytes,
// then size raw descriptors (addr, len, id, flags as the ring holds them),
// the 4-byte driver event suppression area and bytes for the data area.
func packedFuzzInput(shape0, shape1 byte, descs []vqt.PackedDesc, event uint32, data []byte) []byte {
	b := []byte{shape0, shape1}
	for _, d := range descs {
		b = binary.LittleEndian.AppendUint64(b, d.Addr)
		b = binary.LittleEndian.AppendUint32(b, d.Len)
		b = binary.LittleEndian.AppendUint16(b, d.ID)
		b = binary.LittleEndian.AppendUint16(b, d.Flags)
	}
	b = binary.LittleEndian.AppendUint32(b, event)
	return append(b, data...)
}

// FuzzPackedRing turns fuzz bytes into a packed descriptor ring (any flags,
// ids, wrap bits) in a mock guest and drains it, completing chains in pop
// or reverse order, optionally through an inflight region with a simulated
// crash and recovery halfway. Properties: no panic; a drain ends within a
// bounded number of calls; ring errors are ErrRingBroken and sticky, chain
// errors ErrInvalidChain; every buffer lies in guest memory; and the device
// writes nothing but the descriptor ring and its own event area.
func FuzzPackedRing(f *testing.F) {
	avail := vqt.AvailFlags(true)
	f.Add(packedFuzzInput(3, 0, []vqt.PackedDesc{
		{Addr: 0x200, Len: 16, ID: 1, Flags: fNext | avail},
		{Addr: 0x300, Len: 512, ID: 1, Flags: fNext | fWrite | avail},
		{Addr: 0x600, Len: 1, ID: 1, Flags: fWrite | avail},
		{Addr: 0x200, Len: 16, ID: 0, Flags: fIndirect | avail},
	}, 0, nil))
	f.Add(packedFuzzInput(1, 8|16, []vqt.PackedDesc{
		{Addr: 0x200, Len: 1, ID: 1, Flags: fWrite | avail},
		{Addr: 0x300, Len: 1, ID: 0, Flags: fWrite | avail},
	}, 2<<16|1<<15|1, nil))
	f.Add(packedFuzzInput(3, 2, []vqt.PackedDesc{
		{Addr: 0x200, Len: 32, ID: 3, Flags: fIndirect | avail},
		{Addr: 0x200, Len: 16, ID: 3, Flags: fNext | avail},
		{Addr: 0x300, Len: 16, ID: 9, Flags: vqt.AvailFlags(false)},
	}, 0, make([]byte, 64)))
	f.Add([]byte{0, 0})

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 2 {
			return
		}
		size := uint16(1 + in[0]%8)
		shape := in[1]
		d, err := vqt.NewPacked(vqt.Config{
			Size:       size,
			Regions:    1 + int(shape&1),
			RegionSize: fuzzRegionSize,
			EventIdx:   shape&2 != 0,
		})
		if err != nil {
			t.Fatal(err)
		}
		memSize := uint64(len(d.Guest))
		in = in[2:]
		fuzzDescs(&in, size, memSize, func(i uint16, addr uint64, n uint32, id, flags uint16) {
			d.SetSlot(i, vqt.PackedDesc{Addr: addr, Len: n, ID: id, Flags: flags})
		})
		ev := binary.LittleEndian.Uint32(takeFuzz(&in, 4))
		d.SetDriverEvent(uint16(ev), uint16(ev>>16))
		start, _ := d.DataArea()
		copy(d.Bytes(start, int(memSize-(start-vqt.GuestPhysBase))), in)

		cfg := d.QueueConfig()
		cfg.NoIndirect = shape&4 != 0
		if shape&8 != 0 {
			cfg.Inflight = make([]byte, virtqueue.InflightPackedMinSize(size))
		}
		q, err := virtqueue.NewPackedQueue(d.Mem, cfg)
		if err != nil {
			t.Fatal(err)
		}
		// Everything but the descriptor ring and the device event area
		// must stay as the driver left it.
		snapshot := bytes.Clone(d.Guest)
		ringLen := 16 * int(size)
		devEvent := func() int { // offset of the device event area in Guest
			for off := ringLen; off+4 <= len(d.Guest); off += 4 {
				if d.Regions[0].UserAddr+uint64(off) == cfg.UsedUserAddr {
					return off
				}
			}
			t.Fatal("device event area not found")
			return 0
		}()

		reverse := shape&16 != 0
		crashAt := -1
		if cfg.Inflight != nil {
			crashAt = int(shape>>5) % (int(size) + 1)
		}
		var c virtqueue.Chain
		var pending []uint16
		popped := 0
		flush := func() {
			for len(pending) > 0 {
				var id uint16
				if reverse {
					id, pending = pending[len(pending)-1], pending[:len(pending)-1]
				} else {
					id, pending = pending[0], pending[1:]
				}
				if err := q.PushUsed(id, 0); err != nil {
					t.Fatalf("PushUsed(%d): %v", id, err)
				}
			}
			q.NeedsNotification()
		}
		for i := 0; i <= 2*int(size)+2; i++ {
			if popped == crashAt {
				// SIGKILL: chains in pending are lost with the queue;
				// the new one must resubmit them from the region.
				crashAt = -1
				cfg.NextAvail, cfg.NextUsed = 1<<15, 1<<15 // stale base, as QEMU sends
				if q, err = virtqueue.NewPackedQueue(d.Mem, cfg); err != nil {
					t.Fatalf("recovery refused its own region: %v", err)
				}
				if q.Resubmits() != len(pending) {
					t.Fatalf("recovered %d chains, %d were in flight", q.Resubmits(), len(pending))
				}
				pending = pending[:0]
			}
			ok, err := q.Next(&c)
			if err != nil {
				brokenForGood(t, q, &c, err)
				if q.NeedsNotification() {
					t.Fatal("broken queue asks for a notification")
				}
				break
			}
			if !ok {
				flush()
				if ok, err := q.Next(&c); ok || err != nil {
					// Completing chains cannot make new ones available.
					t.Fatalf("ring not drained: %v, %v", ok, err)
				}
				break
			}
			popped++
			if c.Head >= size {
				t.Fatalf("buffer id %d, queue size %d", c.Head, size)
			}
			if c.Err != nil && !errors.Is(c.Err, virtqueue.ErrInvalidChain) {
				t.Fatalf("chain error %v is not ErrInvalidChain", c.Err)
			}
			for _, bufs := range [][][]byte{c.Readable, c.Writable} {
				for _, b := range bufs {
					if len(b) == 0 || !d.Contains(b) {
						t.Fatalf("buffer of %d bytes outside guest memory", len(b))
					}
				}
			}
			pending = append(pending, c.Head)
			if len(pending) >= 2 {
				flush()
			}
		}
		if ok, err := q.Next(&c); ok && err == nil {
			t.Fatal("queue not drained within the bound")
		}
		for i := range d.Guest {
			if i < ringLen || (i >= devEvent && i < devEvent+4) {
				continue
			}
			if d.Guest[i] != snapshot[i] {
				t.Fatalf("device wrote guest byte %#x outside the descriptor ring and its event area", i)
			}
		}
	})
}

// FuzzPackedInflightRegion hands NewPackedQueue an arbitrary packed
// inflight region (the front-end keeps it and could have written anything)
// over a ring with arbitrary descriptors. Properties: no panic; a refused
// region is ErrInvalidInflight and left unchanged; an accepted one yields
// resubmitted chains whose buffers lie in guest memory and which complete
// exactly once.
func FuzzPackedInflightRegion(f *testing.F) {
	// A valid region: one chain of two entries in flight (entries 3, 5),
	// buffer id 2, used position 1 with wrap 1.
	size := 8
	valid := make([]byte, virtqueue.InflightPackedMinSize(uint16(size)))
	le := binary.LittleEndian
	le.PutUint16(valid[8:], 1)
	le.PutUint16(valid[10:], uint16(size))
	le.PutUint16(valid[16:], 1)
	le.PutUint16(valid[18:], 1)
	valid[20], valid[21] = 1, 1
	e3, e5 := valid[32+3*32:], valid[32+5*32:]
	e3[0] = 1
	le.PutUint16(e3[2:], 5)
	le.PutUint16(e3[4:], 5)
	le.PutUint16(e3[6:], 2)
	le.PutUint64(e3[24:], vqt.GuestPhysBase+0x300)
	le.PutUint32(e3[20:], 16)
	le.PutUint16(e3[18:], fNext)
	le.PutUint64(e5[24:], vqt.GuestPhysBase+0x400)
	le.PutUint32(e5[20:], 1)
	le.PutUint16(e5[18:], fWrite)
	le.PutUint16(e5[16:], 2)
	f.Add(valid, []byte{})
	f.Add(make([]byte, len(valid)), []byte{1})

	f.Fuzz(func(t *testing.T, region, ring []byte) {
		d, err := vqt.NewPacked(vqt.Config{Size: uint16(size), RegionSize: fuzzRegionSize})
		if err != nil {
			t.Fatal(err)
		}
		copy(d.DescRing(), ring)
		cfg := d.QueueConfig()
		cfg.Inflight = region
		before := bytes.Clone(region)
		q, err := virtqueue.NewPackedQueue(d.Mem, cfg)
		if err != nil {
			if !errors.Is(err, virtqueue.ErrInvalidInflight) && !errors.Is(err, virtqueue.ErrInvalidQueue) {
				t.Fatalf("refused with %v", err)
			}
			if !bytes.Equal(before, region) {
				t.Fatal("a refused region was modified")
			}
			return
		}
		n := q.Resubmits()
		var c virtqueue.Chain
		for i := 0; i < n; i++ {
			ok, err := q.Next(&c)
			if !ok || err != nil {
				t.Fatalf("resubmit %d of %d: %v, %v", i, n, ok, err)
			}
			for _, bufs := range [][][]byte{c.Readable, c.Writable} {
				for _, b := range bufs {
					if len(b) == 0 || !d.Contains(b) {
						t.Fatalf("resubmitted buffer of %d bytes outside guest memory", len(b))
					}
				}
			}
			if err := q.PushUsed(c.Head, 0); err != nil {
				t.Fatalf("completing resubmitted id %d: %v", c.Head, err)
			}
			if err := q.PushUsed(c.Head, 0); !errors.Is(err, virtqueue.ErrInvalidUsed) {
				t.Fatalf("completing id %d twice: %v", c.Head, err)
			}
		}
		// Whatever the ring holds, the walk stays bounded.
		for i := 0; i <= 2*size; i++ {
			ok, err := q.Next(&c)
			if err != nil || !ok {
				return
			}
			if err := q.PushUsed(c.Head, 0); err != nil {
				t.Fatal(err)
			}
		}
		if ok, err := q.Next(&c); ok && err == nil {
			t.Fatal("ring yields chains without end")
		}
	})
}
