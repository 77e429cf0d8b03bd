package virtqueuetest_test

import (
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

func TestLayoutExercisesTheInterestingCases(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 8, Regions: 3, RegionSize: 4096, AvailMisaligned: true})
	if err != nil {
		t.Fatal(err)
	}
	cfg := d.QueueConfig()
	if cfg.AvailUserAddr%4 != 2 {
		t.Errorf("AvailMisaligned: avail ring at %#x is 4-aligned", cfg.AvailUserAddr)
	}
	if cfg.DescUserAddr%16 != 0 || cfg.UsedUserAddr%4 != 0 {
		t.Errorf("desc %#x / used %#x not aligned as VIRTIO 1.2 §2.7 requires", cfg.DescUserAddr, cfg.UsedUserAddr)
	}
	r := d.Regions
	for i := 1; i < len(r); i++ {
		if r[i].GuestPhysAddr != r[i-1].GuestPhysAddr+uint64(len(r[i-1].Data)) {
			t.Errorf("region %d is not guest-contiguous with region %d", i, i-1)
		}
		if r[i].UserAddr >= r[i-1].UserAddr {
			t.Errorf("user addresses are not in reverse order: region %d at %#x, region %d at %#x", i-1, r[i-1].UserAddr, i, r[i].UserAddr)
		}
	}
	if _, err := d.NewQueue(); err != nil {
		t.Fatal(err)
	}
}

func TestAddChainRoundTrip(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 4, Start: 65535})
	if err != nil {
		t.Fatal(err)
	}
	q, err := d.NewQueue()
	if err != nil {
		t.Fatal(err)
	}
	head, err := d.AddIndirectChain(vqt.Buffer{Data: []byte("hdr")}, vqt.Buffer{Len: 2, Write: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.AvailIdx() != 0 {
		t.Errorf("avail.idx = %d, want 0 after wrapping from 65535", d.AvailIdx())
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil || c.Head != head {
		t.Fatalf("Next = %v, %v, %v, head %d", ok, err, c.Err, c.Head)
	}
	if string(c.Readable[0]) != "hdr" || len(c.Writable[0]) != 2 {
		t.Errorf("chain = %q / %d writable bytes", c.Readable[0], len(c.Writable[0]))
	}
	if !d.Contains(c.Readable[0]) || d.Contains(make([]byte, 1)) {
		t.Errorf("Contains does not tell guest buffers from others")
	}
	if _, _, ok := d.PopUsed(); ok {
		t.Errorf("PopUsed found an element before the device completed one")
	}
	if err := q.PushUsed(c.Head, 2); err != nil {
		t.Fatal(err)
	}
	if id, n, ok := d.PopUsed(); !ok || id != uint32(head) || n != 2 {
		t.Errorf("PopUsed = %d, %d, %v", id, n, ok)
	}
}
