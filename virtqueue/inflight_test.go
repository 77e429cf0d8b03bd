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

// Offsets of the split inflight layout, written out again here so the test
// checks the layout rather than trusting the package's constants.
const (
	ifVersion   = 8
	ifDescNum   = 10
	ifLastBatch = 12
	ifUsedIdx   = 14
	ifDesc0     = 16
)

func ifFlag(r []byte, i uint16) byte { return r[ifDesc0+16*int(i)] }
func ifNext(r []byte, i uint16) uint16 {
	return binary.LittleEndian.Uint16(r[ifDesc0+16*int(i)+6:])
}
func ifCounter(r []byte, i uint16) uint64 {
	return binary.LittleEndian.Uint64(r[ifDesc0+16*int(i)+8:])
}
func hdr16(r []byte, off int) uint16 { return binary.LittleEndian.Uint16(r[off:]) }

func TestInflightRegionSizeMatchesLibvhostUserAndDPDK(t *testing.T) {
	for qs := 1; qs <= virtqueue.MaxQueueSize; qs++ {
		lib := (uint64(16*qs+2) + 63) &^ 63   // libvhost-user vu_inflight_queue_size
		dpdk := (uint64(16*qs+16) + 63) &^ 63 // DPDK get_pervq_shm_size_split
		got := virtqueue.InflightRegionSize(uint16(qs))
		if got != lib || got != dpdk {
			t.Fatalf("queue size %d: region %d bytes, libvhost-user %d, DPDK %d", qs, got, lib, dpdk)
		}
		if got < virtqueue.InflightMinSize(uint16(qs)) {
			t.Fatalf("queue size %d: region %d bytes smaller than its contents", qs, got)
		}
	}
}

// publishAt writes a one-buffer chain at descriptor head and publishes it;
// the buffer holds tag so the test can tell chains apart.
func publishAt(t *testing.T, d *vqt.Driver, head uint16, tag byte) {
	t.Helper()
	gpa := alloc(t, d, 16)
	copy(d.Bytes(gpa, 16), bytes.Repeat([]byte{tag}, 16))
	d.SetDesc(head, vqt.Desc{Addr: gpa, Len: 16})
	d.PublishHead(head)
}

func inflightQueue(t *testing.T, d *vqt.Driver, region []byte, nextAvail uint16) (*virtqueue.SplitQueue, error) {
	t.Helper()
	cfg := d.QueueConfig()
	cfg.Inflight = region
	cfg.NextAvail = nextAvail
	return virtqueue.NewSplitQueue(d.Mem, cfg)
}

func mustNext(t *testing.T, q *virtqueue.SplitQueue, c *virtqueue.Chain) uint16 {
	t.Helper()
	ok, err := q.Next(c)
	if err != nil || !ok || c.Err != nil {
		t.Fatalf("Next: ok %t, err %v, chain err %v", ok, err, c.Err)
	}
	return c.Head
}

func TestInflightFreshRegionIsInitialisedAndBaseKept(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16, Start: 300})
	if err != nil {
		t.Fatal(err)
	}
	region := make([]byte, virtqueue.InflightRegionSize(16))
	q, err := inflightQueue(t, d, region, 300)
	if err != nil {
		t.Fatal(err)
	}
	if q.NextAvail() != 300 {
		t.Errorf("NextAvail %d, want the SET_VRING_BASE value 300", q.NextAvail())
	}
	if v, n, u := hdr16(region, ifVersion), hdr16(region, ifDescNum), hdr16(region, ifUsedIdx); v != 1 || n != 16 || u != 300 {
		t.Errorf("header version %d desc_num %d used_idx %d, want 1 16 300", v, n, u)
	}
}

func TestInflightPopMarksAndCompletionClearsWithBatchList(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	region := make([]byte, virtqueue.InflightRegionSize(16))
	q, err := inflightQueue(t, d, region, 0)
	if err != nil {
		t.Fatal(err)
	}
	publishAt(t, d, 9, 'a')
	publishAt(t, d, 2, 'b')
	var c virtqueue.Chain
	mustNext(t, q, &c)
	mustNext(t, q, &c)
	for i, h := range []uint16{9, 2} {
		if ifFlag(region, h) != 1 || ifCounter(region, h) != uint64(i) {
			t.Errorf("after pop: desc[%d] inflight %d counter %d, want 1 %d", h, ifFlag(region, h), ifCounter(region, h), i)
		}
	}
	// Out of order, as a batch of two: both linked from last_batch_head.
	if err := q.AddUsed(2, 0); err != nil {
		t.Fatal(err)
	}
	if err := q.AddUsed(9, 0); err != nil {
		t.Fatal(err)
	}
	if ifFlag(region, 2) != 1 || hdr16(region, ifUsedIdx) != 0 {
		t.Error("an unpublished completion already cleared its inflight flag or moved used_idx")
	}
	q.Publish()
	if ifFlag(region, 2) != 0 || ifFlag(region, 9) != 0 {
		t.Errorf("after publish: inflight flags %d %d, want 0 0", ifFlag(region, 2), ifFlag(region, 9))
	}
	if lb, u := hdr16(region, ifLastBatch), hdr16(region, ifUsedIdx); lb != 9 || u != 2 || ifNext(region, 9) != 2 {
		t.Errorf("last_batch_head %d used_idx %d desc[9].next %d, want 9 2 2", lb, u, ifNext(region, 9))
	}
}

// crashAfter runs a first queue ("the back-end that crashes") over chains
// published at heads, pops popN of them and completes the heads in done.
// The returned region is what the crashed back-end left behind.
func crashAfter(t *testing.T, d *vqt.Driver, heads []uint16, popN int, done []uint16) []byte {
	t.Helper()
	region := make([]byte, virtqueue.InflightRegionSize(d.Size()))
	q, err := inflightQueue(t, d, region, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range heads {
		publishAt(t, d, h, byte('a'+i))
	}
	var c virtqueue.Chain
	for i := 0; i < popN; i++ {
		mustNext(t, q, &c)
	}
	for _, h := range done {
		if err := q.PushUsed(h, 0); err != nil {
			t.Fatal(err)
		}
	}
	return region
}

func TestInflightRecoveryResubmitsUncompletedInPopOrderBeforeNewEntries(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	// Popped 9, 2, 14, 5; completed 2 and 14 out of order; 7 never popped.
	region := crashAfter(t, d, []uint16{9, 2, 14, 5, 7}, 4, []uint16{2, 14})
	// QEMU could not GET_VRING_BASE from the dead back-end and rewinds the
	// base to used.idx (vhost-user.md §1.7).
	q, err := inflightQueue(t, d, region, d.UsedIdx())
	if err != nil {
		t.Fatal(err)
	}
	if q.NextAvail() != 4 {
		t.Errorf("recovered NextAvail %d, want used.idx 2 + 2 in flight = 4", q.NextAvail())
	}
	var c virtqueue.Chain
	var got []uint16
	for range 3 {
		got = append(got, mustNext(t, q, &c))
	}
	if want := []uint16{9, 5, 7}; !slices.Equal(got, want) {
		t.Fatalf("order after recovery %v, want %v (in-flight by pop order, then new)", got, want)
	}
	if ifCounter(region, 7) != 4 {
		t.Errorf("new pop counter %d, want 4 (after the largest in-flight counter 3)", ifCounter(region, 7))
	}
	if ok, err := q.Next(&c); ok || err != nil {
		t.Fatalf("a fourth chain: ok %t err %v", ok, err)
	}
	for _, h := range got {
		if err := q.PushUsed(h, 0); err != nil {
			t.Fatalf("completing recovered head %d: %v", h, err)
		}
	}
	if err := q.PushUsed(3, 0); err == nil {
		t.Error("completed more chains than were in flight")
	}
	for h := uint16(0); h < 16; h++ {
		if ifFlag(region, h) != 0 {
			t.Errorf("desc[%d] still in flight after everything completed", h)
		}
	}
}

func TestInflightRecoveryClearsBatchPublishedJustBeforeCrash(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	region := crashAfter(t, d, []uint16{9, 2, 4}, 3, []uint16{4, 9})
	// Die between storing used.idx and clearing the batch's flags: roll
	// the flags and used_idx back as they were before the second Publish.
	region[ifDesc0+16*9] = 1
	binary.LittleEndian.PutUint16(region[ifUsedIdx:], 1)
	q, err := inflightQueue(t, d, region, d.UsedIdx())
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	if h := mustNext(t, q, &c); h != 2 {
		t.Fatalf("resubmitted %d, want only 2 (9 was published in the last batch)", h)
	}
	if ok, _ := q.Next(&c); ok {
		t.Fatalf("resubmitted %d as well", c.Head)
	}
	if hdr16(region, ifUsedIdx) != 2 || ifFlag(region, 9) != 0 {
		t.Errorf("used_idx %d desc[9].inflight %d after recovery, want 2 0", hdr16(region, ifUsedIdx), ifFlag(region, 9))
	}
}

func TestInflightCorruptRegionIsRejectedUnchanged(t *testing.T) {
	put16 := func(off int, v uint16) func([]byte) {
		return func(r []byte) { binary.LittleEndian.PutUint16(r[off:], v) }
	}
	cases := []struct {
		name string
		edit func(r []byte)
		cut  int // bytes to cut off the end of the region
	}{
		{name: "version 2", edit: put16(ifVersion, 2)},
		{name: "desc_num not the queue size", edit: put16(ifDescNum, 8)},
		{name: "inflight flag neither 0 nor 1", edit: func(r []byte) { r[ifDesc0+16*3] = 7 }},
		{name: "last batch larger than the queue", edit: put16(ifUsedIdx, 0xfff0)},
		{name: "last_batch_head out of range", edit: func(r []byte) {
			put16(ifUsedIdx, 0)(r)
			put16(ifLastBatch, 16)(r)
		}},
		{name: "batch list next out of range", edit: func(r []byte) {
			put16(ifUsedIdx, 0)(r)
			binary.LittleEndian.PutUint16(r[ifDesc0+16*2+6:], 40000)
		}},
		{name: "more in flight than the driver published", edit: func(r []byte) {
			for h := 0; h < 16; h++ {
				r[ifDesc0+16*h] = 1
			}
		}},
		{name: "region shorter than the queue", cut: 49}, // 320 bytes, 272 used
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := vqt.New(vqt.Config{Size: 16})
			if err != nil {
				t.Fatal(err)
			}
			// A consistent state to corrupt: 9 and 2 done (batch list
			// 2 -> 9), 4 in flight.
			region := crashAfter(t, d, []uint16{9, 2, 4}, 3, []uint16{9, 2})
			if tc.edit != nil {
				tc.edit(region)
			}
			region = region[:len(region)-tc.cut]
			before := bytes.Clone(region)
			_, err = inflightQueue(t, d, region, d.UsedIdx())
			if !errors.Is(err, virtqueue.ErrInvalidInflight) {
				t.Fatalf("NewSplitQueue: %v, want ErrInvalidInflight", err)
			}
			if tc.name != "more in flight than the driver published" && !bytes.Equal(before, region) {
				t.Error("a rejected region was modified")
			}
		})
	}
}

// FuzzInflightRecovery feeds arbitrary region contents, used.idx and
// avail.idx to NewSplitQueue: it must never panic, and a region it accepts
// must only ever hand out in-range heads and let every one of them be
// completed.
func FuzzInflightRecovery(f *testing.F) {
	f.Add(make([]byte, virtqueue.InflightRegionSize(16)), uint16(0), uint16(0))
	ok := make([]byte, virtqueue.InflightRegionSize(16))
	binary.LittleEndian.PutUint16(ok[ifVersion:], 1)
	binary.LittleEndian.PutUint16(ok[ifDescNum:], 16)
	ok[ifDesc0+16*3] = 1
	ok[ifDesc0+16*5] = 1
	f.Add(ok, uint16(0), uint16(2))
	f.Fuzz(func(t *testing.T, region []byte, usedIdx, availIdx uint16) {
		d, err := vqt.New(vqt.Config{Size: 16})
		if err != nil {
			t.Fatal(err)
		}
		gpa := alloc(t, d, 16)
		for h := uint16(0); h < 16; h++ {
			d.SetDesc(h, vqt.Desc{Addr: gpa, Len: 16})
		}
		binary.LittleEndian.PutUint16(d.UsedRing()[2:], usedIdx)
		d.SetAvailIdx(availIdx)
		q, err := inflightQueue(t, d, region, usedIdx)
		if err != nil {
			return
		}
		var c virtqueue.Chain
		for range 64 {
			ok, err := q.Next(&c)
			if err != nil || !ok {
				break
			}
			if c.Head >= 16 {
				t.Fatalf("head %d out of range", c.Head)
			}
			if err := q.PushUsed(c.Head, 0); err != nil {
				t.Fatalf("completing head %d: %v", c.Head, err)
			}
		}
	})
}

func TestInflightResubmittedChainThatIsNowMalformedIsCompletedNotLost(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	region := crashAfter(t, d, []uint16{3, 8}, 2, nil)
	// While no back-end ran, descriptor 3 was rewritten to point outside
	// guest memory.
	d.SetDesc(3, vqt.Desc{Addr: 1 << 50, Len: 16})
	q, err := inflightQueue(t, d, region, d.UsedIdx())
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil || c.Head != 3 || !errors.Is(c.Err, virtqueue.ErrInvalidChain) {
		t.Fatalf("Next: ok %t err %v head %d chain err %v; want head 3 with ErrInvalidChain", ok, err, c.Head, c.Err)
	}
	if err := q.PushUsed(3, 0); err != nil {
		t.Fatal(err)
	}
	if h := mustNext(t, q, &c); h != 8 {
		t.Fatalf("second resubmitted head %d, want 8", h)
	}
	if err := q.PushUsed(8, 0); err != nil {
		t.Fatal(err)
	}
	if ifFlag(region, 3) != 0 || ifFlag(region, 8) != 0 {
		t.Error("completed heads still marked in flight")
	}
}
