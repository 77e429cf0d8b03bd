package vhostuser_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// TestPackedRingServesRequestsAcrossManyWraps negotiates
// VIRTIO_F_RING_PACKED and pushes writes and reads through a 16-entry
// packed ring (three descriptors per request, several in flight, so the
// wrap counters flip dozens of times), checking every byte on the disk and
// on the way back.
func TestPackedRingServesRequestsAcrossManyWraps(t *testing.T) {
	for _, tc := range []struct {
		name  string
		feats uint64
	}{
		{"event_idx", 0},
		{"no event_idx", ^uint64(vhostuser.FeatureEventIdx)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, 1)
			f := s.connect(t, frontend.Options{Packed: true, QueueSize: 16, MaxInflight: 4, MaxIO: 8192, Features: tc.feats})
			if f.Features&vhostuser.FeatureRingPacked == 0 || !f.Queues[0].Packed() {
				t.Fatalf("packed ring not negotiated: features %#x", f.Features)
			}
			q := f.Queues[0]
			ctx := context.Background()
			const rounds = 60
			for i := range rounds {
				// Odd sizes and offsets: a sector-aligned but not
				// block-aligned spread.
				sector := uint64(i*13) % (testDiskSize/512 - 16)
				n := 512 * (1 + i%16)
				data := pattern(byte(i), n)
				// Two requests in flight at once, completed in any order.
				h1, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: sector, Data: data})
				if err != nil {
					t.Fatal(err)
				}
				h2, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTGetID, InLen: frontend.BlkIDLen})
				if err != nil {
					t.Fatal(err)
				}
				seen := map[uint16]bool{}
				for range 2 {
					r, err := q.Reap(ctx, 0)
					mustOK(t, fmt.Sprintf("round %d", i), r, err)
					seen[r.Head] = true
				}
				if !seen[h1] || !seen[h2] {
					t.Fatalf("round %d: completions %v, want ids %d and %d", i, seen, h1, h2)
				}
				if got := s.disk.bytes(int(sector)*512, n); !bytes.Equal(got, data) {
					t.Fatalf("round %d: disk does not hold the write at sector %d", i, sector)
				}
				r, err := q.Read(ctx, sector, n)
				mustOK(t, "read", r, err)
				if !bytes.Equal(r.Data, data) || r.Written != uint32(n)+1 {
					t.Fatalf("round %d: read back %d bytes (used len %d) differ", i, n, r.Written)
				}
			}
		})
	}
}

// TestPackedVringBaseCarriesBothPositionsAndWrapCounters: GET_VRING_BASE
// of a packed ring reports avail and used positions with their wrap
// counters (vhost-user "Vring descriptor indices for packed virtqueues"),
// and a ring restarted from that base goes on where it stopped.
func TestPackedVringBaseCarriesBothPositionsAndWrapCounters(t *testing.T) {
	s := startServer(t, 1)
	o := frontend.Options{Packed: true, QueueSize: 16, MaxInflight: 4, MaxIO: 4096}
	f := s.connect(t, o)
	q := f.Queues[0]
	ctx := context.Background()
	// 7 requests of 3 descriptors: 21 slots, one wrap, position 5.
	for i := range 7 {
		r, err := q.Write(ctx, uint64(i), pattern(byte(i), 512))
		mustOK(t, "write", r, err)
	}
	base, err := f.GetVringBase(0)
	if err != nil {
		t.Fatal(err)
	}
	if want := virtqueue.PackedBase(5, false, 5, false); base != want {
		t.Fatalf("GET_VRING_BASE = %#x, want %#x (avail 5 wrap 0, used 5 wrap 0)", base, want)
	}
	if err := f.StartQueue(q); err != nil {
		t.Fatalf("restarting the ring from its base: %v", err)
	}
	if q.StartBase() != base {
		t.Fatalf("front-end restarted with %#x, back-end stopped at %#x", q.StartBase(), base)
	}
	for i := range 7 {
		r, err := q.Read(ctx, uint64(i), 512)
		mustOK(t, "read after restart", r, err)
		if !bytes.Equal(r.Data, pattern(byte(i), 512)) {
			t.Fatalf("sector %d differs after the restart", i)
		}
	}
}

// TestPackedSetVringBaseOutOfRangeIsRefusedAtStart: a base whose index is
// not below the ring size does not start the ring.
func TestPackedSetVringBaseOutOfRangeIsRefusedAtStart(t *testing.T) {
	s := startServer(t, 1)
	f := s.dial(t)
	o := frontend.Options{Packed: true, QueueSize: 16, MemSize: 1 << 20}
	if err := f.Setup(o); err != nil {
		t.Fatal(err)
	}
	if _, err := f.GetVringBase(0); err != nil {
		t.Fatal(err)
	}
	q := f.Queues[0]
	if err := f.SetVringBase(0, virtqueue.PackedBase(16, true, 0, true)); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringAddr(q.Addr()); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringFD(vhostuser.ReqSetVringKick, 0, q.KickFD()); err == nil {
		t.Fatal("a packed ring started with avail index 16 in a 16-entry ring")
	}
}

// TestPackedBackendKilledMidWriteIsReplacedWithoutLosingRequests is the
// SIGKILL test with packed rings: the back-end dies while executing the
// 2nd and 4th of 5 writes per queue; the front-end, like QEMU, reconnects to a new
// back-end with the stale vring base of the last start (neither packed
// index is in guest memory) and the kept inflight buffer; every write
// completes exactly once and lands on the disk.
func TestPackedBackendKilledMidWriteIsReplacedWithoutLosingRequests(t *testing.T) {
	if testing.Short() {
		t.Skip("starts back-end processes")
	}
	o := inflightSetup
	o.Packed = true
	// The parked writes' used descriptors go out of order: the others
	// complete around them before the back-end dies.
	k := startKilledMidWrite(t, o)
	if !k.f.Queues[0].Packed() {
		t.Fatal("packed ring not negotiated")
	}
	regionSize := virtqueue.InflightPackedRegionSize(k.o.QueueSize)
	if k.in.Msg.MmapSize != 2*regionSize {
		t.Fatalf("GET_INFLIGHT_FD mmap_size %d, want 2 packed regions of %d", k.in.Msg.MmapSize, regionSize)
	}
	k.submitAndKill(t)
	// In each queue's region exactly the chains being executed are in
	// flight (their entries carry their buffer ids).
	inFlight := func(qi int) []uint16 {
		region := k.in.QueueRegion(qi, regionSize)
		var ids []uint16
		for e := 0; e < int(k.o.QueueSize); e++ {
			ent := region[32+32*e:]
			if ent[0] == 1 {
				ids = append(ids, le.Uint16(ent[16:]))
			}
		}
		return ids
	}
	for qi := range k.f.Queues {
		ids := inFlight(qi)
		slices.Sort(ids)
		if !slices.Equal(ids, k.parked[qi]) {
			t.Errorf("queue %d: chains in flight after the kill %v, want exactly %v", qi, ids, k.parked[qi])
		}
	}
	k.restart(t)
	for qi, q := range k.f.Queues {
		k.reapResubmitted(t, qi)
		// The ring goes on after the recovery.
		r, err := q.Read(context.Background(), killSector(qi, 0), 4096)
		mustOK(t, "read after the restart", r, err)
		if !bytes.Equal(r.Data, k.want[killSector(qi, 0)]) {
			t.Errorf("queue %d: read after the restart differs", qi)
		}
	}
	k.checkDisk(t)
	for qi := range k.f.Queues {
		if ids := inFlight(qi); len(ids) != 0 {
			t.Errorf("queue %d: chains %v still in flight", qi, ids)
		}
	}
}

// TestHostilePackedRingBreaksOnlyItsQueue: on a two-queue packed
// connection the guest makes queue 0 hostile (buffer id out of range, a
// chain whose second descriptor is not available for the wrap counter;
// the id-reuse and other ring-level cases are driven in the virtqueue
// package, where a chain can be kept in flight); the
// back-end reports queue 0 broken once, writes nothing more to that ring,
// and queue 1 keeps serving.
func TestHostilePackedRingBreaksOnlyItsQueue(t *testing.T) {
	const avail = virtqueue.PackedDescFlagAvail // driver wrap counter 1
	used := uint16(virtqueue.PackedDescFlagUsed)
	cases := []struct {
		name string
		bad  func(q *frontend.Queue, r *guestReq)
		want string
	}{
		{"buffer id out of range", func(q *frontend.Queue, r *guestReq) {
			q.PutPackedDesc(1, r.statusGPA, 1, 16, fWrite|avail)
			q.PutPackedDesc(0, r.hdrGPA, 16, 16, fNext|avail)
		}, "buffer id 16"},
		{"flags of the second descriptor for the other wrap counter", func(q *frontend.Queue, r *guestReq) {
			q.PutPackedDesc(1, r.statusGPA, 1, 3, fWrite|used)
			q.PutPackedDesc(0, r.hdrGPA, 16, 3, fNext|avail)
		}, "not available"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, 2)
			f := s.connect(t, frontend.Options{Packed: true, NumQueues: 2, QueueSize: 16, MaxInflight: 2, MaxIO: 4096})
			q0, q1 := f.Queues[0], f.Queues[1]
			r := newGuestReq(t, f, frontend.BlkTFlush, 0, 0)
			tc.bad(q0, r)
			q0.Kick()
			b := <-s.ev.broken
			if b.queue != 0 || !strings.Contains(b.err.Error(), tc.want) {
				t.Fatalf("broken event queue %d: %v; want queue 0 mentioning %q", b.queue, b.err, tc.want)
			}
			ctx := context.Background()
			data := pattern(9, 4096)
			res, err := q1.Write(ctx, 64, data)
			mustOK(t, "write on the healthy queue", res, err)
			res, err = q1.Read(ctx, 64, 4096)
			mustOK(t, "read on the healthy queue", res, err)
			if !bytes.Equal(res.Data, data) {
				t.Fatal("healthy queue read back different data")
			}
			select {
			case b := <-s.ev.broken:
				t.Fatalf("a second broken event: %+v", b)
			default:
			}
		})
	}
}

// TestPackedMemTableSwapWhileQueuesRun: SET_MEM_TABLE while two packed
// rings serve I/O re-creates the queues from their base (and, with an
// inflight buffer, from their inflight regions) without losing their
// positions or wrap counters.
func TestPackedMemTableSwapWhileQueuesRun(t *testing.T) {
	for _, withInflight := range []bool{false, true} {
		t.Run(fmt.Sprintf("inflight=%t", withInflight), func(t *testing.T) {
			s := startServer(t, 2)
			o := frontend.Options{Packed: true, NumQueues: 2, QueueSize: 16, MaxInflight: 2, MaxIO: 4096, MemSize: 1 << 20}
			var f *frontend.Frontend
			if withInflight {
				f = s.dial(t)
				in, err := f.SetupInflight(o, true)
				if err != nil {
					t.Fatal(err)
				}
				defer in.Close()
			} else {
				f = s.connect(t, o)
			}
			writeReadBackDuringMemTableSwaps(t, f)
		})
	}
}
