package virtqueue_test

import (
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

// BenchmarkChainWalk measures the per-request ring cost of a virtio-blk
// request: a 3-descriptor chain (16-byte header, 4 KiB data, status byte)
// taken with Next and completed with PushUsed. The driver side only
// re-publishes the same head, so the loop measures the device side. The
// steady state must not allocate.
func BenchmarkChainWalk(b *testing.B) {
	for _, tc := range []struct {
		name     string
		eventIdx bool
	}{{"plain", false}, {"event_idx", true}} {
		b.Run(tc.name, func(b *testing.B) {
			d, q := newDriver(b, vqt.Config{Size: 128, RegionSize: 1 << 20, EventIdx: tc.eventIdx})
			head, err := d.AddChain(
				vqt.Buffer{Len: 16},
				vqt.Buffer{Len: 4096, Write: true},
				vqt.Buffer{Len: 1, Write: true},
			)
			if err != nil {
				b.Fatal(err)
			}
			var c virtqueue.Chain
			b.ReportAllocs()
			for b.Loop() {
				ok, err := q.Next(&c)
				if !ok || err != nil || c.Err != nil {
					b.Fatalf("Next = %v, %v, %v", ok, err, c.Err)
				}
				if err := q.PushUsed(c.Head, 4097); err != nil {
					b.Fatal(err)
				}
				q.NeedsNotification()
				d.PublishHead(head)
			}
		})
	}
}

func TestChainWalkDoesNotAllocateInSteadyState(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 16, Regions: 2})
	start, _ := d.DataArea()
	regionEnd := uint64(vqt.GuestPhysBase + 64<<10)
	head, err := d.AddChain(
		vqt.Buffer{Len: 16},
		vqt.Buffer{Addr: regionEnd - 100, Len: 200, Write: true}, // two slices
		vqt.Buffer{Addr: start, Len: 1, Write: true},
	)
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	round := func() {
		if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil {
			t.Fatalf("Next = %v, %v, %v", ok, err, c.Err)
		}
		if err := q.PushUsed(c.Head, 0); err != nil {
			t.Fatal(err)
		}
		d.PublishHead(head)
	}
	round() // grows c's slices once
	if allocs := testing.AllocsPerRun(100, round); allocs != 0 {
		t.Errorf("Next+PushUsed allocated %v times per chain", allocs)
	}
}

// BenchmarkRingPopPush compares the device-side cost of one virtio-blk
// request (3 descriptors: header, 4 KiB data, status) on a split and a
// packed ring: Next, PushUsed, NeedsNotification, with the driver side
// re-publishing the chain (and, for packed, reaping the used descriptor).
func BenchmarkRingPopPush(b *testing.B) {
	bufs := []vqt.Buffer{{Len: 16}, {Len: 4096, Write: true}, {Len: 1, Write: true}}
	b.Run("split", func(b *testing.B) {
		d, q := newDriver(b, vqt.Config{Size: 128, RegionSize: 1 << 20, EventIdx: true})
		head, err := d.AddChain(bufs...)
		if err != nil {
			b.Fatal(err)
		}
		var c virtqueue.Chain
		b.ReportAllocs()
		for b.Loop() {
			if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil {
				b.Fatalf("Next = %v, %v, %v", ok, err, c.Err)
			}
			if err := q.PushUsed(c.Head, 4097); err != nil {
				b.Fatal(err)
			}
			q.NeedsNotification()
			d.PublishHead(head)
		}
	})
	b.Run("packed", func(b *testing.B) {
		d, q := newPacked(b, vqt.Config{Size: 128, RegionSize: 1 << 20, EventIdx: true})
		// The same three buffers every time, at fixed addresses.
		var descs []vqt.PackedDesc
		for _, bf := range bufs {
			gpa, err := d.Alloc(int(bf.Len))
			if err != nil {
				b.Fatal(err)
			}
			fl := uint16(0)
			if bf.Write {
				fl = virtqueue.DescFlagWrite
			}
			descs = append(descs, vqt.PackedDesc{Addr: gpa, Len: bf.Len, Flags: fl})
		}
		if _, err := d.AddDescs(descs); err != nil {
			b.Fatal(err)
		}
		var c virtqueue.Chain
		b.ReportAllocs()
		for b.Loop() {
			if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil {
				b.Fatalf("Next = %v, %v, %v", ok, err, c.Err)
			}
			if err := q.PushUsed(c.Head, 4097); err != nil {
				b.Fatal(err)
			}
			q.NeedsNotification()
			if _, _, ok := d.PopUsed(); !ok {
				b.Fatal("no used descriptor")
			}
			if _, err := d.AddDescs(descs); err != nil {
				b.Fatal(err)
			}
		}
	})
}
