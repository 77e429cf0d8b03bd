package virtqueue_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

// Offsets of the packed inflight region (packed_inflight.go).
const (
	pifVersion    = 8
	pifDescNum    = 10
	pifOldFree    = 14
	pifUsedIdx    = 16
	pifOldUsedIdx = 18
	pifUsedWrap   = 20
	pifOldWrap    = 21
	pifEnt        = 32 // first entry
	pifEntSize    = 32
	pifeInflight  = 0
	pifeNext      = 2
	pifeNum       = 6
	pifeCounter   = 8
	pifeID        = 16
)

func packedWithRegion(t *testing.T, d *vqt.PackedDriver, region []byte, base uint32) *virtqueue.PackedQueue {
	t.Helper()
	cfg := d.QueueConfig()
	cfg.Inflight = region
	cfg.NextAvail, cfg.NextUsed = uint16(base), uint16(base>>16)
	q, err := virtqueue.NewPackedQueue(d.Mem, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// pifFirstEntry finds the first region entry of the chain popped
// counter-th (in flight).
func pifFirstEntry(t *testing.T, region []byte, size int, counter uint64) int {
	t.Helper()
	for i := 0; i < size; i++ {
		e := region[pifEnt+i*pifEntSize:]
		if e[pifeInflight] == 1 && binary.LittleEndian.Uint64(e[pifeCounter:]) == counter {
			return i
		}
	}
	t.Fatalf("no chain with counter %d in flight", counter)
	return 0
}

type chainShape struct {
	readable, writable []int
}

func shapeOf(c *virtqueue.Chain) chainShape {
	return chainShape{lens(c.Readable), lens(c.Writable)}
}

func (s chainShape) equal(o chainShape) bool {
	return slices.Equal(s.readable, o.readable) && slices.Equal(s.writable, o.writable)
}

func TestPackedInflightFreshRegionIsInitialised(t *testing.T) {
	d, err := vqt.NewPacked(vqt.Config{Size: 8})
	if err != nil {
		t.Fatal(err)
	}
	region := make([]byte, virtqueue.InflightPackedMinSize(8))
	q := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
	if q.Resubmits() != 0 {
		t.Fatalf("fresh region resubmits %d", q.Resubmits())
	}
	le := binary.LittleEndian
	if le.Uint16(region[pifVersion:]) != 1 || le.Uint16(region[pifDescNum:]) != 8 || region[pifUsedWrap] != 1 || region[pifOldWrap] != 1 {
		t.Fatalf("header after init: % x", region[:32])
	}
	if got := virtqueue.InflightPackedRegionSize(8); got != 320 {
		t.Fatalf("InflightPackedRegionSize(8) = %d, want 32+32*8 rounded to 64 = 320", got)
	}
}

// TestPackedInflightResubmitsAfterCrash: a back-end pops three chains,
// completes the middle one (whose used descriptor overwrites the first
// chain's head slot) and dies. Its replacement, given a stale base as QEMU
// sends after a crash, resubmits the other two from the region's copies,
// in pop order, with the same buffers, and carries on at the right ring
// position; the driver sees each buffer id exactly once.
func TestPackedInflightResubmitsAfterCrash(t *testing.T) {
	d, err := vqt.NewPacked(vqt.Config{Size: 8})
	if err != nil {
		t.Fatal(err)
	}
	region := make([]byte, virtqueue.InflightPackedMinSize(8))
	q := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
	idA, _ := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 512, Write: true}, vqt.Buffer{Len: 1, Write: true})
	idB, _ := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 1, Write: true})
	idC, err := d.AddIndirectChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 4096, Write: true}, vqt.Buffer{Len: 1, Write: true})
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	shapes := map[uint16]chainShape{}
	addrs := map[uint16][]byte{}
	for range 3 {
		takeChain(t, q, &c)
		if c.Err != nil {
			t.Fatal(c.Err)
		}
		shapes[c.Head] = shapeOf(&c)
		addrs[c.Head] = c.Writable[0]
	}
	if err := q.PushUsed(idB, 1); err != nil {
		t.Fatal(err)
	}
	// SIGKILL: the queue object is gone; the region and guest memory stay.
	q2 := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
	if q2.Resubmits() != 2 {
		t.Fatalf("Resubmits = %d, want 2", q2.Resubmits())
	}
	for _, want := range []uint16{idA, idC} {
		takeChain(t, q2, &c)
		if c.Err != nil || c.Head != want {
			t.Fatalf("resubmitted head %d err %v, want %d", c.Head, c.Err, want)
		}
		if !shapeOf(&c).equal(shapes[want]) || &c.Writable[0][0] != &addrs[want][0] {
			t.Fatalf("resubmitted chain %d: %v, want %v at the same guest buffers", want, shapeOf(&c), shapes[want])
		}
		if err := q2.PushUsed(c.Head, 7); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := q2.Next(&c); ok || err != nil {
		t.Fatalf("after the resubmits Next = %v, %v; want an empty ring", ok, err)
	}
	idD, err := d.AddChain(vqt.Buffer{Len: 2, Write: true})
	if err != nil {
		t.Fatal(err)
	}
	takeChain(t, q2, &c)
	if c.Head != idD || c.Err != nil {
		t.Fatalf("new chain after recovery: head %d err %v, want %d", c.Head, c.Err, idD)
	}
	if err := q2.PushUsed(idD, 2); err != nil {
		t.Fatal(err)
	}
	var got []uint16
	for {
		id, _, ok := d.PopUsed()
		if !ok {
			break
		}
		got = append(got, id)
	}
	want := []uint16{idB, idA, idC, idD}
	if len(got) != len(want) {
		t.Fatalf("driver saw used ids %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("driver saw used ids %v, want %v", got, want)
		}
	}
}

// TestPackedInflightCrashDuringCompletion kills the back-end between the
// steps of a completion. If the used descriptor reached the ring the chain
// is complete (not resubmitted: the driver would see its id twice);
// otherwise the used position rolls back and the chain is resubmitted.
func TestPackedInflightCrashDuringCompletion(t *testing.T) {
	for _, landed := range []bool{true, false} {
		d, err := vqt.NewPacked(vqt.Config{Size: 8})
		if err != nil {
			t.Fatal(err)
		}
		region := make([]byte, virtqueue.InflightPackedMinSize(8))
		q := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
		idA, _ := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 1, Write: true})
		idB, _ := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 1, Write: true})
		var c virtqueue.Chain
		takeChain(t, q, &c)
		takeChain(t, q, &c)
		eB := pifFirstEntry(t, region, 8, 1)
		before := bytes.Clone(region)
		if landed {
			if err := q.PushUsed(idB, 1); err != nil {
				t.Fatal(err)
			}
			// Undo the steps after the ring write: inflight still set,
			// old_used_* still the position before.
			region[pifEnt+eB*pifEntSize+pifeInflight] = 1
			binary.LittleEndian.PutUint16(region[pifOldUsedIdx:], 0)
			region[pifOldWrap] = 1
		} else {
			// Only the first step happened: the region announces the
			// completion, the ring does not have it.
			copy(region, before)
			binary.LittleEndian.PutUint16(region[pifOldFree:], uint16(eB))
			binary.LittleEndian.PutUint16(region[pifUsedIdx:], 2)
		}
		binary.LittleEndian.PutUint16(region[pifOldFree:], uint16(eB))
		q2 := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
		want := []uint16{idA}
		if !landed {
			want = []uint16{idA, idB}
		}
		if q2.Resubmits() != len(want) {
			t.Fatalf("landed %t: Resubmits = %d, want %d", landed, q2.Resubmits(), len(want))
		}
		for _, id := range want {
			takeChain(t, q2, &c)
			if c.Head != id {
				t.Fatalf("landed %t: resubmitted %d, want %d", landed, c.Head, id)
			}
			if err := q2.PushUsed(c.Head, 1); err != nil {
				t.Fatal(err)
			}
		}
		seen := map[uint16]int{}
		for {
			id, _, ok := d.PopUsed()
			if !ok {
				break
			}
			seen[id]++
		}
		if seen[idA] != 1 || seen[idB] != 1 || len(seen) != 2 {
			t.Fatalf("landed %t: driver saw used ids %v, want %d and %d once each", landed, seen, idA, idB)
		}
	}
}

func TestPackedInflightRejectsCorruptRegions(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name string
		edit func(r []byte, e int)
	}{
		{"unknown version", func(r []byte, e int) { le.PutUint16(r[pifVersion:], 2) }},
		{"desc_num is not the queue size", func(r []byte, e int) { le.PutUint16(r[pifDescNum:], 4) }},
		{"used index out of range", func(r []byte, e int) { le.PutUint16(r[pifUsedIdx:], 8) }},
		{"wrap counter not 0 or 1", func(r []byte, e int) { r[pifOldWrap] = 7 }},
		{"inflight flag 2", func(r []byte, e int) { r[pifEnt+5*pifEntSize] = 2 }},
		{"chain of zero entries", func(r []byte, e int) { le.PutUint16(r[pifEnt+e*pifEntSize+pifeNum:], 0) }},
		{"chain longer than the queue", func(r []byte, e int) { le.PutUint16(r[pifEnt+e*pifEntSize+pifeNum:], 9) }},
		{"link out of range", func(r []byte, e int) { le.PutUint16(r[pifEnt+e*pifEntSize+pifeNext:], 99) }},
		{"link loops back", func(r []byte, e int) { le.PutUint16(r[pifEnt+e*pifEntSize+pifeNext:], uint16(e)) }},
		{"buffer id out of range", func(r []byte, e int) {
			for i := 0; i < 8; i++ {
				le.PutUint16(r[pifEnt+i*pifEntSize+pifeID:], 8)
			}
		}},
		{"two chains share an entry", func(r []byte, e int) {
			o := (e + 7) % 8 // some other entry, made a chain head pointing into e's chain
			x := r[pifEnt+o*pifEntSize:]
			x[pifeInflight] = 1
			le.PutUint16(x[pifeNum:], 2)
			le.PutUint16(x[pifeNext:], uint16(e))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := vqt.NewPacked(vqt.Config{Size: 8})
			if err != nil {
				t.Fatal(err)
			}
			region := make([]byte, virtqueue.InflightPackedMinSize(8))
			q := packedWithRegion(t, d, region, virtqueue.PackedBase(0, true, 0, true))
			if _, err := d.AddChain(vqt.Buffer{Len: 16}, vqt.Buffer{Len: 1, Write: true}); err != nil {
				t.Fatal(err)
			}
			var c virtqueue.Chain
			takeChain(t, q, &c)
			e := pifFirstEntry(t, region, 8, 0)
			tc.edit(region, e)
			before := bytes.Clone(region)
			cfg := d.QueueConfig()
			cfg.Inflight = region
			if _, err := virtqueue.NewPackedQueue(d.Mem, cfg); !errors.Is(err, virtqueue.ErrInvalidInflight) {
				t.Fatalf("err = %v, want ErrInvalidInflight", err)
			}
			if !bytes.Equal(before, region) {
				t.Fatal("a rejected region was modified")
			}
		})
	}
}
