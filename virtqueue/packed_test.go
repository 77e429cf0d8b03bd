package virtqueue_test

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

func newPacked(t testing.TB, cfg vqt.Config) (*vqt.PackedDriver, *virtqueue.PackedQueue) {
	t.Helper()
	d, err := vqt.NewPacked(cfg)
	return withQueue(t, d, err)
}

// mustNext takes one chain and fails the test unless there is one.
func takeChain(t *testing.T, q virtqueue.Queue, c *virtqueue.Chain) {
	t.Helper()
	ok, err := q.Next(c)
	if err != nil || !ok {
		t.Fatalf("Next = %v, %v; want a chain", ok, err)
	}
}

func TestPackedQueueRejectsInvalidConfig(t *testing.T) {
	d, err := vqt.NewPacked(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	good := d.QueueConfig()
	rejectsEachConfig(t, "NewPackedQueue", d.Mem, good, virtqueue.NewPackedQueue, []configEdit{
		{"size zero", func(c *virtqueue.QueueConfig) { c.Size = 0 }, "packed size"},
		{"size too large", func(c *virtqueue.QueueConfig) { c.Size = 40000 }, "packed size"},
		{"descriptor ring misaligned", func(c *virtqueue.QueueConfig) { c.DescUserAddr += 8 }, "not 16-aligned"},
		{"driver area misaligned", func(c *virtqueue.QueueConfig) { c.AvailUserAddr += 2 }, "not 4-aligned"},
		{"device area misaligned", func(c *virtqueue.QueueConfig) { c.UsedUserAddr += 2 }, "not 4-aligned"},
		{"ring unmapped", func(c *virtqueue.QueueConfig) { c.DescUserAddr = 0x1000 }, "descriptor ring"},
		{"avail index out of range", func(c *virtqueue.QueueConfig) { c.NextAvail = 1<<15 | 16 }, "not below the queue size"},
		{"used index out of range", func(c *virtqueue.QueueConfig) { c.NextUsed = 17 }, "not below the queue size"},
		{"chains in flight without inflight region", func(c *virtqueue.QueueConfig) { c.NextAvail = 1<<15 | 3 }, "no inflight region"},
		{"wrap counters differ at the same index", func(c *virtqueue.QueueConfig) { c.NextUsed = 0 }, "no inflight region"},
	})
	if _, err := virtqueue.NewQueue(d.Mem, good); err != nil {
		t.Fatalf("good config refused: %v", err)
	}
}

func TestPackedBaseEncoding(t *testing.T) {
	tests := []struct {
		avail     uint16
		availWrap bool
		used      uint16
		usedWrap  bool
		want      uint32
	}{
		{0, true, 0, true, 0x8000_8000},
		{5, false, 3, true, 0x8003_0005},
		{0x7fff, true, 1, false, 0x0001_ffff},
	}
	for _, tc := range tests {
		if got := virtqueue.PackedBase(tc.avail, tc.availWrap, tc.used, tc.usedWrap); got != tc.want {
			t.Errorf("PackedBase(%d,%t,%d,%t) = %#x, want %#x", tc.avail, tc.availWrap, tc.used, tc.usedWrap, got, tc.want)
		}
	}
}

// TestPackedChainWalk checks the chain rules on the packed ring: good
// chains become the right host slices, malformed ones set Chain.Err and the
// next chain is still served.
func TestPackedChainWalk(t *testing.T) {
	type tc struct {
		name       string
		noIndirect bool
		add        func(t *testing.T, d *vqt.PackedDriver)
		readable   []int
		writable   []int
		chainErr   string
	}
	cases := []tc{
		{name: "blk request", add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 512, Write: true}, vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
		}, readable: []int{16}, writable: []int{512, 1}},
		{name: "indirect", add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddIndirectChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 8}, vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
		}, readable: []int{16, 8}, writable: []int{1}},
		{name: "zero-length descriptor adds no slice", add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 0}, vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
		}, readable: []int{16}, writable: []int{1}},
		{name: "readable after writable", add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddChain(vqt.Buffer{Len: 1, Write: true}, vqt.Buffer{Len: 16}); err != nil {
				t.Fatal(err)
			}
		}, chainErr: "follows a device-writable"},
		{name: "buffer outside guest memory", add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddChain(vqt.Buffer{Addr: 0x10, Len: 16}); err != nil {
				t.Fatal(err)
			}
		}, chainErr: "not mapped"},
		{name: "indirect with NEXT", add: func(t *testing.T, d *vqt.PackedDriver) {
			table := alloc(t, d, 16)
			d.PutDescs([]vqt.PackedDesc{{Addr: table, Len: 16, Flags: fIndirect}, {Addr: alloc(t, d, 1), Len: 1, ID: 0, Flags: fWrite}})
		}, chainErr: "both INDIRECT and NEXT"},
		{name: "nested indirect", add: func(t *testing.T, d *vqt.PackedDriver) {
			table := alloc(t, d, 16)
			d.WritePackedTable(table, []vqt.PackedDesc{{Addr: table, Len: 16, Flags: fIndirect}})
			d.PutDescs([]vqt.PackedDesc{{Addr: table, Len: 16, Flags: fIndirect}})
		}, chainErr: "forbids nesting"},
		{name: "indirect table length not a multiple of 16", add: func(t *testing.T, d *vqt.PackedDriver) {
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 24), Len: 24, Flags: fIndirect}})
		}, chainErr: "indirect table length"},
		{name: "indirect without the feature", noIndirect: true, add: func(t *testing.T, d *vqt.PackedDriver) {
			if _, err := d.AddIndirectChain(vqt.Buffer{Len: 16}); err != nil {
				t.Fatal(err)
			}
		}, chainErr: "INDIRECT_DESC was not negotiated"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := vqt.NewPacked(vqt.Config{Size: 8})
			if err != nil {
				t.Fatal(err)
			}
			cfg := d.QueueConfig()
			cfg.NoIndirect = c.noIndirect
			q, err := virtqueue.NewPackedQueue(d.Mem, cfg)
			if err != nil {
				t.Fatal(err)
			}
			c.add(t, d)
			next, err := d.AddChain(vqt.Buffer{Len: 7, Write: true})
			if err != nil {
				t.Fatal(err)
			}
			var ch virtqueue.Chain
			takeChain(t, q, &ch)
			if c.chainErr != "" {
				if !errors.Is(ch.Err, virtqueue.ErrInvalidChain) || !strings.Contains(ch.Err.Error(), c.chainErr) {
					t.Fatalf("Chain.Err = %v, want ErrInvalidChain mentioning %q", ch.Err, c.chainErr)
				}
				if len(ch.Readable)+len(ch.Writable) != 0 {
					t.Fatalf("malformed chain still hands out buffers")
				}
			} else {
				if ch.Err != nil {
					t.Fatalf("Chain.Err = %v", ch.Err)
				}
				if !slices.Equal(lens(ch.Readable), c.readable) || !slices.Equal(lens(ch.Writable), c.writable) {
					t.Fatalf("buffers %v / %v, want %v / %v", lens(ch.Readable), lens(ch.Writable), c.readable, c.writable)
				}
			}
			if err := q.PushUsed(ch.Head, 0); err != nil {
				t.Fatal(err)
			}
			takeChain(t, q, &ch)
			if ch.Err != nil || ch.Head != next || !slices.Equal(lens(ch.Writable), []int{7}) {
				t.Fatalf("chain after it: head %d (want %d), err %v, writable %v", ch.Head, next, ch.Err, lens(ch.Writable))
			}
		})
	}
}

func TestPackedBuffersAliasGuestMemory(t *testing.T) {
	d, q := newPacked(t, vqt.Config{Size: 4})
	data := alloc(t, d, 8)
	if _, err := d.AddChain(vqt.Buffer{Addr: data, Len: 8, Write: true}); err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	takeChain(t, q, &c)
	copy(c.Writable[0], "zerocopy")
	if got := d.Bytes(data, 8); !bytes.Equal(got, []byte("zerocopy")) {
		t.Fatalf("guest memory holds %q after the device wrote its slice", got)
	}
}

// TestPackedRingWrapsAround runs many chains of varying length through a
// small ring, completing them out of order, so both wrap counters flip many
// times; the driver must see every buffer id exactly once with its length.
func TestPackedRingWrapsAround(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		d, q := newPacked(t, vqt.Config{Size: 5, EventIdx: eventIdx})
		var c virtqueue.Chain
		for round := 0; round < 40; round++ {
			d.ResetAlloc()
			// Two chains in flight: lengths 1..2 and 1..3.
			n1, n2 := 1+round%2, 1+round%3
			var ids [2]uint16
			for k, n := range []int{n1, n2} {
				bufs := make([]vqt.Buffer, n)
				for i := range bufs {
					bufs[i] = vqt.Buffer{Len: uint32(10*k + i + 1), Write: true}
				}
				id, err := d.AddChain(bufs...)
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				ids[k] = id
			}
			var heads [2]uint16
			for k := range heads {
				takeChain(t, q, &c)
				if c.Err != nil {
					t.Fatalf("round %d: %v", round, c.Err)
				}
				heads[k] = c.Head
			}
			if heads != ids {
				t.Fatalf("round %d: Next returned ids %v, driver added %v", round, heads, ids)
			}
			// Complete in reverse order.
			for k := 1; k >= 0; k-- {
				if err := q.PushUsed(heads[k], uint32(100+k)); err != nil {
					t.Fatal(err)
				}
			}
			for k := 1; k >= 0; k-- {
				id, n, ok := d.PopUsed()
				if !ok || id != ids[k] || n != uint32(100+k) {
					t.Fatalf("round %d: driver popped {%d, %d, %t}, want {%d, %d}", round, id, n, ok, ids[k], 100+k)
				}
			}
			if _, _, ok := d.PopUsed(); ok {
				t.Fatalf("round %d: extra used descriptor", round)
			}
		}
		// The queue's base matches the driver's avail position and, with
		// nothing in flight, the used position.
		ai, aw := d.AvailPos()
		if got, want := q.Base(), virtqueue.PackedBase(ai, aw, ai, aw); got != want {
			t.Fatalf("Base = %#x, want %#x", got, want)
		}
		// A queue re-created from that base carries on.
		cfg := d.QueueConfig()
		cfg.NextAvail, cfg.NextUsed = uint16(q.Base()), uint16(q.Base()>>16)
		q2, err := virtqueue.NewPackedQueue(d.Mem, cfg)
		if err != nil {
			t.Fatal(err)
		}
		id, err := d.AddChain(vqt.Buffer{Len: 3, Write: true})
		if err != nil {
			t.Fatal(err)
		}
		takeChain(t, q2, &c)
		if c.Head != id || c.Err != nil {
			t.Fatalf("re-created queue: head %d err %v, want %d", c.Head, c.Err, id)
		}
	}
}

func TestPackedPushUsedRejectsBadCompletions(t *testing.T) {
	d, q := newPacked(t, vqt.Config{Size: 4})
	if _, err := d.AddChain(vqt.Buffer{Len: 1, Write: true}); err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	takeChain(t, q, &c)
	for _, id := range []uint16{4, 0xffff, c.Head + 1} {
		if err := q.PushUsed(id, 0); !errors.Is(err, virtqueue.ErrInvalidUsed) {
			t.Errorf("PushUsed(%d) = %v, want ErrInvalidUsed", id, err)
		}
	}
	if err := q.PushUsed(c.Head, 1); err != nil {
		t.Fatal(err)
	}
	if err := q.PushUsed(c.Head, 1); !errors.Is(err, virtqueue.ErrInvalidUsed) {
		t.Errorf("completing id %d twice = %v, want ErrInvalidUsed", c.Head, err)
	}
	if q.Err() != nil {
		t.Fatalf("a bad completion broke the queue: %v", q.Err())
	}
}

// TestHostilePackedDriverBreaksOnlyThatQueue drives ring-level violations:
// each stops the queue with ErrRingBroken, sticky, and from then on the
// queue writes nothing to guest memory.
func TestHostilePackedDriverBreaksOnlyThatQueue(t *testing.T) {
	const size = 4
	tests := []struct {
		name string
		bad  func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue)
		want string
	}{
		{"buffer id out of range", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 1), Len: 1, ID: size, Flags: fWrite}})
		}, "buffer id 4"},
		{"buffer id reused while in flight", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 1), Len: 1, ID: 2, Flags: fWrite}})
			var c virtqueue.Chain
			takeChain(t, q, &c)
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 1), Len: 1, ID: 2, Flags: fWrite}})
		}, "reuses buffer id 2"},
		{"flags of a chain's second descriptor not available (changed under us)", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 16), Len: 16}, {Addr: alloc(t, d, 1), Len: 1, Flags: fWrite}})
			// The driver takes the second descriptor back after
			// publishing the head.
			d.SetSlot(1, vqt.PackedDesc{Flags: fWrite | vqt.AvailFlags(false)})
		}, "not available"},
		{"wrap counter misuse inside a chain", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			// The continuation claims the next lap's wrap counter.
			d.SetSlot(1, vqt.PackedDesc{Addr: alloc(t, d, 1), Len: 1, Flags: fWrite | vqt.AvailFlags(false)})
			d.SetSlot(0, vqt.PackedDesc{Addr: alloc(t, d, 16), Len: 16, Flags: fNext | vqt.AvailFlags(true)})
		}, "wrap counter"},
		{"chain longer than the queue", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			// Every slot says NEXT; after the last one the walk comes back
			// to slot 0, whose flags are for the previous lap.
			for i := size - 1; i >= 0; i-- {
				d.SetSlot(uint16(i), vqt.PackedDesc{Addr: alloc(t, d, 1), Len: 1, Flags: fNext | fWrite | vqt.AvailFlags(true)})
			}
		}, "not available"},
		{"more descriptors in flight than the ring holds", func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue) {
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 1), Len: 1, ID: 0}, {Addr: alloc(t, d, 1), Len: 1, ID: 0}, {Addr: alloc(t, d, 1), Len: 1, ID: 0, Flags: fWrite}})
			var c virtqueue.Chain
			takeChain(t, q, &c)
			// Slots 3 and 0 (next lap) while slot 0's chain is in flight.
			d.PutDescs([]vqt.PackedDesc{{Addr: alloc(t, d, 1), Len: 1, ID: 1}, {Addr: alloc(t, d, 1), Len: 1, ID: 1, Flags: fWrite}})
		}, "more than the ring's"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, q := newPacked(t, vqt.Config{Size: size})
			tc.bad(t, d, q)
			var c virtqueue.Chain
			ok, err := q.Next(&c)
			if ok || !errors.Is(err, virtqueue.ErrRingBroken) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Next = %v, %v; want ErrRingBroken mentioning %q", ok, err, tc.want)
			}
			before := bytes.Clone(d.Guest)
			if _, err2 := q.Next(&c); !errors.Is(err2, virtqueue.ErrRingBroken) {
				t.Fatalf("second Next = %v, want the sticky error", err2)
			}
			if err := q.PushUsed(0, 1); !errors.Is(err, virtqueue.ErrRingBroken) {
				t.Fatalf("PushUsed on a broken queue = %v", err)
			}
			if _, err := q.EnableNotifications(); !errors.Is(err, virtqueue.ErrRingBroken) {
				t.Fatalf("EnableNotifications on a broken queue = %v", err)
			}
			q.DisableNotifications()
			if q.NeedsNotification() {
				t.Fatal("a broken queue asks for a notification")
			}
			if !bytes.Equal(before, d.Guest) {
				t.Fatal("a broken queue wrote guest memory")
			}
		})
	}
}

// TestPackedDescriptorWithWrongWrapCounterIsNotConsumed: a head marked with
// the other lap's flags (or as used) is simply not available: the ring
// looks empty and nothing is touched.
func TestPackedDescriptorWithWrongWrapCounterIsNotConsumed(t *testing.T) {
	for _, flags := range []uint16{
		vqt.AvailFlags(false),
		virtqueue.PackedDescFlagAvail | virtqueue.PackedDescFlagUsed,
		0,
	} {
		d, q := newPacked(t, vqt.Config{Size: 4})
		d.SetSlot(0, vqt.PackedDesc{Addr: alloc(t, d, 1), Len: 1, Flags: fWrite | flags})
		before := bytes.Clone(d.Guest)
		var c virtqueue.Chain
		if ok, err := q.Next(&c); ok || err != nil {
			t.Fatalf("flags %#x: Next = %v, %v; want empty", flags, ok, err)
		}
		if !bytes.Equal(before, d.Guest) {
			t.Fatalf("flags %#x: guest memory changed", flags)
		}
	}
}

func TestPackedNotifications(t *testing.T) {
	complete := func(t *testing.T, d *vqt.PackedDriver, q *virtqueue.PackedQueue, n int) {
		t.Helper()
		var c virtqueue.Chain
		for i := 0; i < n; i++ {
			if _, err := d.AddChain(vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
			takeChain(t, q, &c)
			if err := q.PushUsed(c.Head, 1); err != nil {
				t.Fatal(err)
			}
		}
		for i := 0; i < n; i++ {
			if _, _, ok := d.PopUsed(); !ok {
				t.Fatal("used descriptor missing")
			}
		}
	}
	t.Run("driver flags without EVENT_IDX", func(t *testing.T) {
		d, q := newPacked(t, vqt.Config{Size: 8})
		for _, tc := range []struct {
			flags uint16
			want  bool
		}{{virtqueue.EventFlagEnable, true}, {virtqueue.EventFlagDisable, false}, {virtqueue.EventFlagDesc, true}, {3, true}} {
			d.SetDriverEvent(0, tc.flags)
			complete(t, d, q, 1)
			if got := q.NeedsNotification(); got != tc.want {
				t.Errorf("driver flags %d: NeedsNotification = %t, want %t", tc.flags, got, tc.want)
			}
		}
	})
	t.Run("RING_EVENT_FLAGS_DESC with EVENT_IDX", func(t *testing.T) {
		d, q := newPacked(t, vqt.Config{Size: 8, EventIdx: true})
		complete(t, d, q, 1)
		if !q.NeedsNotification() {
			t.Fatal("first NeedsNotification must say yes")
		}
		// Used position is 1 (wrap 1). Ask for slot 3 of this lap.
		d.SetDriverEvent(1<<15|3, virtqueue.EventFlagDesc)
		complete(t, d, q, 2) // slots 1, 2
		if q.NeedsNotification() {
			t.Fatal("notified before the used descriptor at slot 3 was written")
		}
		complete(t, d, q, 1) // slot 3
		if !q.NeedsNotification() {
			t.Fatal("not notified after writing slot 3")
		}
		// Ask for slot 1 of the next lap (wrap 0): 4..7 then 0 do not
		// reach it, 1 does.
		d.SetDriverEvent(1, virtqueue.EventFlagDesc)
		complete(t, d, q, 5)
		if q.NeedsNotification() {
			t.Fatal("notified before reaching slot 1 of the next lap")
		}
		complete(t, d, q, 1)
		if !q.NeedsNotification() {
			t.Fatal("not notified at slot 1 of the next lap")
		}
	})
	t.Run("device event area", func(t *testing.T) {
		for _, eventIdx := range []bool{false, true} {
			d, q := newPacked(t, vqt.Config{Size: 8, EventIdx: eventIdx})
			q.DisableNotifications()
			if _, fl := d.DeviceEvent(); fl != virtqueue.EventFlagDisable {
				t.Fatalf("after DisableNotifications flags = %d", fl)
			}
			pending, err := q.EnableNotifications()
			if err != nil || pending {
				t.Fatalf("EnableNotifications on an empty ring = %v, %v", pending, err)
			}
			ow, fl := d.DeviceEvent()
			if eventIdx && (fl != virtqueue.EventFlagDesc || ow != 1<<15) {
				t.Fatalf("EVENT_IDX: device event = %#x/%d, want off_wrap %#x DESC", ow, fl, 1<<15)
			}
			if !eventIdx && fl != virtqueue.EventFlagEnable {
				t.Fatalf("device event flags = %d, want ENABLE", fl)
			}
			if _, err := d.AddChain(vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
			if pending, err := q.EnableNotifications(); err != nil || !pending {
				t.Fatalf("EnableNotifications with a chain available = %v, %v", pending, err)
			}
		}
	})
}

// TestPackedDriverAndDeviceConcurrently runs the mock driver and the device
// in two goroutines (under -race this checks the flags|id publication
// order of both sides).
func TestPackedDriverAndDeviceConcurrently(t *testing.T) {
	const total = 3000
	d, q := newPacked(t, vqt.Config{Size: 8})
	bufs := make([]uint64, 8)
	for i := range bufs {
		bufs[i] = alloc(t, d, 4)
	}
	dev := startRacingDevice(q, total)
	sent, got := 0, 0
	for got < total {
		if sent < total && sent-got < 8 {
			if _, err := d.AddChain(vqt.Buffer{Addr: bufs[sent%8], Len: 4, Write: true}); err == nil {
				sent++
				continue
			}
		}
		_, n, ok := d.PopUsed()
		if !ok {
			dev.nothingUsed(t, got)
			continue
		}
		if n != 4 {
			t.Fatalf("used length %d", n)
		}
		got++
	}
	dev.wait(t)
}
