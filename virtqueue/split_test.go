package virtqueue_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
	vqt "github.com/vhost-vhdx/vhost-vhdx/virtqueue/virtqueuetest"
)

const (
	fNext     = virtqueue.DescFlagNext
	fWrite    = virtqueue.DescFlagWrite
	fIndirect = virtqueue.DescFlagIndirect
)

func newDriver(t testing.TB, cfg vqt.Config) (*vqt.Driver, *virtqueue.SplitQueue) {
	t.Helper()
	d, err := vqt.New(cfg)
	return withQueue(t, d, err)
}

// withQueue fails t unless the mock driver d was made (err) and the device
// queue on its ring starts, for either ring layout.
func withQueue[D interface{ NewQueue() (Q, error) }, Q any](t testing.TB, d D, err error) (D, Q) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	q, err := d.NewQueue()
	if err != nil {
		t.Fatal(err)
	}
	return d, q
}

// alloc takes n bytes of the mock guest's data area of either ring's
// driver.
func alloc[D interface{ Alloc(n int) (uint64, error) }](t testing.TB, d D, n int) uint64 {
	t.Helper()
	gpa, err := d.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	return gpa
}

func lens(bufs [][]byte) []int {
	var out []int
	for _, b := range bufs {
		out = append(out, len(b))
	}
	return out
}

// configEdit spoils a good queue config in one way; want is what the
// error must mention.
type configEdit struct {
	name string
	edit func(c *virtqueue.QueueConfig)
	want string
}

// rejectsEachConfig checks, one subtest per edit, that newQueue (named
// what) on mem refuses good spoiled by the edit with ErrInvalidQueue
// mentioning the edit's want.
func rejectsEachConfig[Q any](t *testing.T, what string, mem *virtqueue.Memory, good virtqueue.QueueConfig, newQueue func(*virtqueue.Memory, virtqueue.QueueConfig) (*Q, error), edits []configEdit) {
	t.Helper()
	for _, tc := range edits {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			q, err := newQueue(mem, cfg)
			if !errors.Is(err, virtqueue.ErrInvalidQueue) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%s = (queue %v), %v; want ErrInvalidQueue mentioning %q", what, q != nil, err, tc.want)
			}
		})
	}
}

func TestNewSplitQueueRejectsInvalidConfig(t *testing.T) {
	d, err := vqt.New(vqt.Config{Size: 16})
	if err != nil {
		t.Fatal(err)
	}
	good := d.QueueConfig()
	rejectsEachConfig(t, "NewSplitQueue", d.Mem, good, virtqueue.NewSplitQueue, []configEdit{
		{"size zero", func(c *virtqueue.QueueConfig) { c.Size = 0 }, "size 0"},
		{"size not a power of two", func(c *virtqueue.QueueConfig) { c.Size = 12 }, "size 12"},
		{"size above 32768", func(c *virtqueue.QueueConfig) { c.Size = 65535 }, "size 65535"},
		{"descriptor table not 16-aligned", func(c *virtqueue.QueueConfig) { c.DescUserAddr += 8 }, "descriptor table address"},
		{"avail ring not 2-aligned", func(c *virtqueue.QueueConfig) { c.AvailUserAddr++ }, "avail ring address"},
		{"used ring not 4-aligned", func(c *virtqueue.QueueConfig) { c.UsedUserAddr += 2 }, "used ring address"},
		{"descriptor table unmapped", func(c *virtqueue.QueueConfig) { c.DescUserAddr = 0x1000 }, "descriptor table"},
		{"avail ring unmapped", func(c *virtqueue.QueueConfig) { c.AvailUserAddr = 0x1000 }, "avail ring"},
		{"used ring runs past its region", func(c *virtqueue.QueueConfig) {
			c.UsedUserAddr = d.Regions[0].UserAddr + uint64(len(d.Regions[0].Data)) - 64
		}, "used ring"},
		{"rings for the larger size do not fit", func(c *virtqueue.QueueConfig) { c.Size = 32768 }, "runs past"},
	})
	if _, err := virtqueue.NewSplitQueue(nil, good); !errors.Is(err, virtqueue.ErrInvalidQueue) {
		t.Errorf("nil memory: err = %v", err)
	}
}

func TestRecreatedQueueCompletesChainsInFlight(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8})
	var c virtqueue.Chain
	var heads []uint16
	for i := 0; i < 3; i++ {
		if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
			t.Fatal(err)
		}
		if ok, err := q.Next(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		heads = append(heads, c.Head)
	}
	if err := q.PushUsed(heads[0], 0); err != nil {
		t.Fatal(err)
	}
	// As after SET_MEM_TABLE: a new queue object resuming at NextAvail.
	cfg := d.QueueConfig()
	cfg.NextAvail = q.NextAvail()
	q2, err := virtqueue.NewSplitQueue(d.Mem, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range heads[1:] {
		if err := q2.PushUsed(h, 0); err != nil {
			t.Fatalf("completing head %d on the new queue: %v", h, err)
		}
	}
	if err := q2.PushUsed(0, 0); !errors.Is(err, virtqueue.ErrInvalidUsed) {
		t.Errorf("a fourth completion was accepted: %v", err)
	}
	if d.UsedIdx() != 3 {
		t.Errorf("used.idx = %d, want 3", d.UsedIdx())
	}

	cfg.NextAvail = d.UsedIdx() + 9 // more than Size chains in flight
	if _, err := virtqueue.NewSplitQueue(d.Mem, cfg); !errors.Is(err, virtqueue.ErrInvalidQueue) {
		t.Errorf("NextAvail 9 past used.idx in a queue of 8: err = %v", err)
	}
}

func TestNewSplitQueueRejectsMisalignedHostMapping(t *testing.T) {
	// The user address is aligned, but the mapping starts one byte into a
	// buffer, so the host address of the used ring is not: atomic 32-bit
	// accesses there would be unaligned.
	buf := make([]byte, 0x2001)
	m, err := virtqueue.NewMemory([]virtqueue.Region{{GuestPhysAddr: 0, UserAddr: 0x10000, Data: buf[1:]}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = virtqueue.NewSplitQueue(m, virtqueue.QueueConfig{
		Size: 4, DescUserAddr: 0x10000, AvailUserAddr: 0x10100, UsedUserAddr: 0x10200,
	})
	if !errors.Is(err, virtqueue.ErrInvalidQueue) || !strings.Contains(err.Error(), "host address") {
		t.Fatalf("err = %v, want ErrInvalidQueue about the host address", err)
	}
}

// chainCase sets up one chain in a fresh 16-entry queue over two 64 KiB
// regions, contiguous in guest-physical space, and says what Next must
// produce.
type chainCase struct {
	name         string
	setup        func(t *testing.T, d *vqt.Driver) // writes descriptors and publishes head 0
	wantErr      string                            // substring of c.Err; "" means a valid chain
	wantReadable []int                             // slice lengths
	wantWritable []int
}

func chainCases() []chainCase {
	const regionEnd = vqt.GuestPhysBase + 64<<10 // first byte of region 1
	const memEnd = vqt.GuestPhysBase + 128<<10   // first unmapped byte
	publish := func(d *vqt.Driver, descs ...vqt.Desc) {
		for i, desc := range descs {
			d.SetDesc(uint16(i), desc)
		}
		d.PublishHead(0)
	}
	return []chainCase{
		{
			name: "blk-style three descriptors",
			setup: func(t *testing.T, d *vqt.Driver) {
				a, b, c := alloc(t, d, 16), alloc(t, d, 4096), alloc(t, d, 1)
				publish(d, vqt.Desc{Addr: a, Len: 16, Flags: fNext, Next: 1},
					vqt.Desc{Addr: b, Len: 4096, Flags: fNext | fWrite, Next: 2},
					vqt.Desc{Addr: c, Len: 1, Flags: fWrite})
			},
			wantReadable: []int{16}, wantWritable: []int{4096, 1},
		},
		{
			name: "buffer spanning two contiguous regions yields two slices",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: regionEnd - 100, Len: 300})
			},
			wantReadable: []int{100, 200},
		},
		{
			name: "zero-length descriptor is accepted and adds no slice, whatever its address",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				publish(d, vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: 1},
					vqt.Desc{Addr: 0xdead_beef_0000, Len: 0, Flags: fNext | fWrite, Next: 2},
					vqt.Desc{Addr: a, Len: 8, Flags: fWrite})
			},
			wantReadable: []int{8}, wantWritable: []int{8},
		},
		{
			name: "indirect table",
			setup: func(t *testing.T, d *vqt.Driver) {
				a, b := alloc(t, d, 16), alloc(t, d, 512)
				tbl, err := d.AllocTable([]vqt.Desc{
					{Addr: a, Len: 16, Flags: fNext, Next: 1},
					{Addr: b, Len: 512, Flags: fWrite},
				})
				if err != nil {
					t.Fatal(err)
				}
				// WRITE on the pointer descriptor must be ignored (§2.7.5.3.2).
				publish(d, vqt.Desc{Addr: tbl, Len: 32, Flags: fIndirect | fWrite})
			},
			wantReadable: []int{16}, wantWritable: []int{512},
		},
		{
			name: "direct descriptors followed by an indirect one",
			setup: func(t *testing.T, d *vqt.Driver) {
				a, b := alloc(t, d, 16), alloc(t, d, 1)
				tbl, err := d.AllocTable([]vqt.Desc{{Addr: b, Len: 1, Flags: fWrite}})
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: a, Len: 16, Flags: fNext, Next: 1},
					vqt.Desc{Addr: tbl, Len: 16, Flags: fIndirect})
			},
			wantReadable: []int{16}, wantWritable: []int{1},
		},
		{
			name: "indirect table spanning two regions is read across the boundary",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 64)
				tbl := uint64(regionEnd - 24) // entry 1 straddles the boundary
				d.WriteTable(tbl, []vqt.Desc{
					{Addr: a, Len: 10, Flags: fNext, Next: 1},
					{Addr: a + 10, Len: 20, Flags: fNext, Next: 2},
					{Addr: a + 30, Len: 30, Flags: fWrite},
				})
				publish(d, vqt.Desc{Addr: tbl, Len: 48, Flags: fIndirect})
			},
			wantReadable: []int{10, 20}, wantWritable: []int{30},
		},
		{
			name: "looping chain is cut by the TTL",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				publish(d, vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: 1},
					vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: 0})
			},
			wantErr: "more than 16 descriptors",
		},
		{
			name: "self-referencing zero-length descriptor is cut by the TTL",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Len: 0, Flags: fNext, Next: 0})
			},
			wantErr: "loop",
		},
		{
			name: "next index beyond the table",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				publish(d, vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: 16})
			},
			wantErr: "next is 16, table has 16 entries",
		},
		{
			name: "nested indirect table",
			setup: func(t *testing.T, d *vqt.Driver) {
				inner, err := d.AllocTable([]vqt.Desc{{Addr: alloc(t, d, 8), Len: 8}})
				if err != nil {
					t.Fatal(err)
				}
				outer, err := d.AllocTable([]vqt.Desc{{Addr: inner, Len: 16, Flags: fIndirect}})
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: outer, Len: 16, Flags: fIndirect})
			},
			wantErr: "forbids nesting",
		},
		{
			name: "indirect table length not a multiple of 16",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: alloc(t, d, 32), Len: 24, Flags: fIndirect})
			},
			wantErr: "indirect table length 24",
		},
		{
			name: "indirect table of length zero",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: alloc(t, d, 32), Len: 0, Flags: fIndirect})
			},
			wantErr: "indirect table length 0",
		},
		{
			name: "indirect table longer than 32768 entries",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: vqt.GuestPhysBase, Len: 16 * 32769, Flags: fIndirect})
			},
			wantErr: "indirect table length 524304",
		},
		{
			name: "indirect together with next",
			setup: func(t *testing.T, d *vqt.Driver) {
				tbl, err := d.AllocTable([]vqt.Desc{{Addr: alloc(t, d, 8), Len: 8}})
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: tbl, Len: 16, Flags: fIndirect | fNext, Next: 1},
					vqt.Desc{Addr: alloc(t, d, 8), Len: 8})
			},
			wantErr: "both INDIRECT and NEXT",
		},
		{
			name: "indirect table outside guest memory",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: memEnd - 16, Len: 32, Flags: fIndirect})
			},
			wantErr: "indirect table",
		},
		{
			name: "next index beyond an indirect table",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				tbl, err := d.AllocTable([]vqt.Desc{{Addr: a, Len: 8, Flags: fNext, Next: 1}, {Addr: a, Len: 8, Flags: fNext, Next: 2}})
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: tbl, Len: 32, Flags: fIndirect})
			},
			wantErr: "next is 2, table has 2 entries",
		},
		{
			name: "loop inside an indirect table",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				tbl, err := d.AllocTable([]vqt.Desc{{Addr: a, Len: 8, Flags: fNext, Next: 1}, {Addr: a, Len: 8, Flags: fNext, Next: 0}})
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: tbl, Len: 32, Flags: fIndirect})
			},
			wantErr: "more than 2 descriptors",
		},
		{
			name: "indirect chain with more buffers than the queue size",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				descs := make([]vqt.Desc, 17)
				for i := range descs {
					descs[i] = vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: uint16(i + 1)}
				}
				descs[16].Flags = 0
				tbl, err := d.AllocTable(descs)
				if err != nil {
					t.Fatal(err)
				}
				publish(d, vqt.Desc{Addr: tbl, Len: 16 * 17, Flags: fIndirect})
			},
			wantErr: "more than 16 buffers",
		},
		{
			name: "descriptor address outside guest memory",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: 0x1000, Len: 8})
			},
			wantErr: "guest address 0x1000",
		},
		{
			name: "descriptor length past the end of the last region",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: memEnd - 8, Len: 16, Flags: fWrite})
			},
			wantErr: "0x120000",
		},
		{
			name: "descriptor address plus length wraps",
			setup: func(t *testing.T, d *vqt.Driver) {
				publish(d, vqt.Desc{Addr: ^uint64(0) - 3, Len: 8})
			},
			wantErr: "wraps",
		},
		{
			name: "readable descriptor after a writable one",
			setup: func(t *testing.T, d *vqt.Driver) {
				a := alloc(t, d, 8)
				publish(d, vqt.Desc{Addr: a, Len: 8, Flags: fWrite | fNext, Next: 1},
					vqt.Desc{Addr: a, Len: 8})
			},
			wantErr: "device-readable descriptor 1 follows a device-writable one",
		},
		{
			name: "chain longer than 2^32-1 bytes",
			setup: func(t *testing.T, d *vqt.Driver) {
				// The length check comes before translation, so the
				// second descriptor's bogus address is never reached.
				a := alloc(t, d, 8)
				publish(d, vqt.Desc{Addr: a, Len: 8, Flags: fNext, Next: 1},
					vqt.Desc{Addr: a, Len: 0xffff_fff8, Flags: fWrite})
			},
			wantErr: "longer than 4294967295 bytes",
		},
	}
}

func TestChainWalk(t *testing.T) {
	for _, tt := range chainCases() {
		t.Run(tt.name, func(t *testing.T) {
			d, q := newDriver(t, vqt.Config{Size: 16, Regions: 2})
			tt.setup(t, d)
			var c virtqueue.Chain
			ok, err := q.Next(&c)
			if err != nil || !ok {
				t.Fatalf("Next = %v, %v; want a chain", ok, err)
			}
			if c.Head != 0 {
				t.Errorf("Head = %d, want 0", c.Head)
			}
			if tt.wantErr != "" {
				if !errors.Is(c.Err, virtqueue.ErrInvalidChain) || !strings.Contains(c.Err.Error(), tt.wantErr) {
					t.Fatalf("c.Err = %v, want ErrInvalidChain mentioning %q", c.Err, tt.wantErr)
				}
				if len(c.Readable)+len(c.Writable) != 0 {
					t.Errorf("a bad chain left %d+%d buffers behind", len(c.Readable), len(c.Writable))
				}
			} else {
				if c.Err != nil {
					t.Fatalf("c.Err = %v", c.Err)
				}
				if g := lens(c.Readable); !slices.Equal(g, tt.wantReadable) {
					t.Errorf("readable lengths %v, want %v", g, tt.wantReadable)
				}
				if g := lens(c.Writable); !slices.Equal(g, tt.wantWritable) {
					t.Errorf("writable lengths %v, want %v", g, tt.wantWritable)
				}
			}
			// Whatever the chain, the queue stays usable and the head
			// can be completed with length 0.
			if q.Err() != nil {
				t.Errorf("chain error broke the queue: %v", q.Err())
			}
			if err := q.PushUsed(c.Head, 0); err != nil {
				t.Fatal(err)
			}
			if id, n, ok := d.PopUsed(); !ok || id != uint32(c.Head) || n != 0 {
				t.Errorf("used = %d/%d/%v, want head %d with length 0", id, n, ok, c.Head)
			}
		})
	}
}

func TestChainBuffersAliasGuestMemory(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Regions: 2})
	head, err := d.AddChain(vqt.Buffer{Data: []byte("request header")}, vqt.Buffer{Len: 6, Write: true})
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil {
		t.Fatalf("Next = %v, %v, chain err %v", ok, err, c.Err)
	}
	if string(c.Readable[0]) != "request header" {
		t.Errorf("readable = %q", c.Readable[0])
	}
	copy(c.Writable[0], "answer")
	if err := q.PushUsed(head, 6); err != nil {
		t.Fatal(err)
	}
	_, n, _ := d.PopUsed()
	gpa, _ := d.DataArea()
	if !bytes.Contains(d.Bytes(gpa, 64), []byte("answer")) || n != 6 {
		t.Errorf("device write not visible in guest memory (used len %d)", n)
	}
}

func TestBadChainDoesNotDisturbTheNext(t *testing.T) {
	d, q := newDriver(t, vqt.Config{})
	bad, err := d.AddChain(vqt.Buffer{Addr: 0x10, Len: 8}) // unmapped
	if err != nil {
		t.Fatal(err)
	}
	good, err := d.AddChain(vqt.Buffer{Len: 8})
	if err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil || c.Head != bad || !errors.Is(c.Err, virtqueue.ErrGuestAddress) {
		t.Fatalf("first Next: ok %v err %v head %d chain err %v", ok, err, c.Head, c.Err)
	}
	if ok, err := q.Next(&c); !ok || err != nil || c.Head != good || c.Err != nil || len(c.Readable) != 1 {
		t.Fatalf("second Next: ok %v err %v head %d chain err %v", ok, err, c.Head, c.Err)
	}
	if ok, err := q.Next(&c); ok || err != nil {
		t.Fatalf("third Next = %v, %v; want empty", ok, err)
	}
}

// assertBroken checks that every entry point reports the sticky error.
func assertBroken(t *testing.T, q *virtqueue.SplitQueue, want string) {
	t.Helper()
	var c virtqueue.Chain
	for i := 0; i < 3; i++ {
		ok, err := q.Next(&c)
		if ok || !errors.Is(err, virtqueue.ErrRingBroken) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Next #%d = %v, %v; want ErrRingBroken mentioning %q", i, ok, err, want)
		}
	}
	if _, err := q.EnableNotifications(); !errors.Is(err, virtqueue.ErrRingBroken) {
		t.Errorf("EnableNotifications err = %v", err)
	}
	if err := q.PushUsed(0, 0); !errors.Is(err, virtqueue.ErrRingBroken) {
		t.Errorf("PushUsed err = %v", err)
	}
	if q.NeedsNotification() {
		t.Errorf("a broken queue asked for a notification")
	}
}

func TestAvailIdxJumpingAheadBreaksTheQueue(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 16, Start: 65530})
	d.SetAvailIdx(11) // 65530 + 17 mod 2^16: 17 chains claimed available in a 16-entry queue (wraps past 0)
	assertBroken(t, q, "17 entries past next 65530, queue size 16")

	// Repairing the ring does not revive the queue: the error is sticky
	// and the ring is not read again.
	d.SetAvailIdx(65530)
	before := bytes.Clone(d.UsedRing())
	assertBroken(t, q, "queue size 16")
	if !bytes.Equal(before, d.UsedRing()) {
		t.Errorf("a broken queue wrote the used ring")
	}
}

func TestAvailIdxExactlyQueueSizeAheadIsFine(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 4})
	for i := 0; i < 4; i++ {
		if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
			t.Fatal(err)
		}
	}
	var c virtqueue.Chain
	for i := 0; i < 4; i++ {
		if ok, err := q.Next(&c); !ok || err != nil || c.Err != nil {
			t.Fatalf("Next #%d = %v, %v (%v)", i, ok, err, c.Err)
		}
	}
	if ok, err := q.Next(&c); ok || err != nil {
		t.Fatalf("Next after draining = %v, %v", ok, err)
	}
}

func TestHeadOutOfRangeBreaksTheQueue(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 256, RegionSize: 1 << 20})
	d.PublishHead(300)
	assertBroken(t, q, "guest says index 300 is available (avail slot 0), queue size 256")
}

func TestPushUsedPublishesElementThenIndex(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 4, Start: 65535})
	var c virtqueue.Chain
	for i := 0; i < 2; i++ {
		if _, err := d.AddChain(vqt.Buffer{Len: 1, Write: true}); err != nil {
			t.Fatal(err)
		}
		if ok, err := q.Next(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		if err := q.PushUsed(c.Head, uint32(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := d.UsedIdx(); got != 1 { // 65535 + 2 wraps to 1
		t.Errorf("used.idx = %d, want 1", got)
	}
	for i := 0; i < 2; i++ {
		id, n, ok := d.PopUsed()
		if !ok || id != uint32(i) || n != uint32(100+i) {
			t.Errorf("used element %d = {%d, %d} %v, want {%d, %d}", i, id, n, ok, i, 100+i)
		}
	}
	if q.NextAvail() != 1 {
		t.Errorf("NextAvail = %d, want 1", q.NextAvail())
	}
}

func TestAddUsedIsInvisibleUntilPublish(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8})
	var c virtqueue.Chain
	for i := 0; i < 3; i++ {
		if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
			t.Fatal(err)
		}
		if ok, err := q.Next(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		if err := q.AddUsed(c.Head, 0); err != nil {
			t.Fatal(err)
		}
	}
	if d.UsedIdx() != 0 {
		t.Fatalf("used.idx = %d before Publish", d.UsedIdx())
	}
	q.Publish()
	if d.UsedIdx() != 3 {
		t.Fatalf("used.idx = %d after Publish, want 3", d.UsedIdx())
	}
}

func TestPushUsedRejectsBadCompletions(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8})
	if err := q.PushUsed(0, 0); !errors.Is(err, virtqueue.ErrInvalidUsed) {
		t.Errorf("completing with nothing in flight: err = %v", err)
	}
	if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
		t.Fatal(err)
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if err := q.PushUsed(8, 0); !errors.Is(err, virtqueue.ErrInvalidUsed) {
		t.Errorf("head 8 in a queue of 8: err = %v", err)
	}
	if d.UsedIdx() != 0 {
		t.Errorf("rejected completions moved used.idx to %d", d.UsedIdx())
	}
}

func TestNotificationsWithoutEventIdx(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8})
	q.DisableNotifications()
	if d.UsedFlags()&virtqueue.UsedFlagNoNotify == 0 {
		t.Fatalf("DisableNotifications did not set VIRTQ_USED_F_NO_NOTIFY")
	}
	pending, err := q.EnableNotifications()
	if err != nil || pending {
		t.Fatalf("EnableNotifications on an empty ring = %v, %v", pending, err)
	}
	if d.UsedFlags() != 0 {
		t.Fatalf("EnableNotifications left used.flags = %#x", d.UsedFlags())
	}
	if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
		t.Fatal(err)
	}
	if pending, err := q.EnableNotifications(); err != nil || !pending {
		t.Fatalf("EnableNotifications with a chain waiting = %v, %v; want pending", pending, err)
	}
	var c virtqueue.Chain
	if ok, err := q.Next(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if err := q.PushUsed(c.Head, 0); err != nil {
		t.Fatal(err)
	}
	if !q.NeedsNotification() {
		t.Errorf("no notification although avail.flags = 0")
	}
	d.SetAvailFlags(virtqueue.AvailFlagNoInterrupt)
	if q.NeedsNotification() {
		t.Errorf("notification despite VIRTQ_AVAIL_F_NO_INTERRUPT")
	}
	if d.UsedIdx() != 1 || d.UsedFlags() != 0 {
		t.Errorf("used word = flags %#x idx %d", d.UsedFlags(), d.UsedIdx())
	}
}

func TestNotificationsWithEventIdx(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8, EventIdx: true})
	var c virtqueue.Chain
	complete := func() {
		t.Helper()
		if _, err := d.AddChain(vqt.Buffer{Len: 1}); err != nil {
			t.Fatal(err)
		}
		if ok, err := q.Next(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		if err := q.PushUsed(c.Head, 0); err != nil {
			t.Fatal(err)
		}
	}
	// Like QEMU's vhost-user-blk qtest "idx": the driver asks to be woken
	// only once used.idx passes 2 (used_event = 1 means "after entry 1").
	d.SetUsedEvent(1)
	complete() // used.idx 0 -> 1
	if !q.NeedsNotification() {
		t.Errorf("first NeedsNotification must say yes")
	}
	complete() // 1 -> 2: crosses used_event 1
	if !q.NeedsNotification() {
		t.Errorf("used.idx moved 1 -> 2 across used_event 1, but no notification")
	}
	complete() // 2 -> 3: used_event still 1
	if q.NeedsNotification() {
		t.Errorf("notification although used_event 1 was already passed")
	}
	if q.NeedsNotification() {
		t.Errorf("notification with nothing new published")
	}

	q.DisableNotifications() // a no-op with EVENT_IDX
	if d.UsedFlags() != 0 {
		t.Errorf("used.flags = %#x, must stay 0 with EVENT_IDX", d.UsedFlags())
	}
	if pending, err := q.EnableNotifications(); err != nil || pending {
		t.Fatalf("EnableNotifications = %v, %v", pending, err)
	}
	if got := d.AvailEvent(); got != q.NextAvail() || got != 3 {
		t.Errorf("avail_event = %d, want NextAvail 3", got)
	}
}

func TestMisalignedAvailRing(t *testing.T) {
	d, q := newDriver(t, vqt.Config{Size: 8, AvailMisaligned: true, Start: 65534})
	var c virtqueue.Chain
	for i := 0; i < 20; i++ { // several laps, through slot 0 (which shares the idx word) and the 16-bit wrap
		if _, err := d.AddChain(vqt.Buffer{Len: uint32(i + 1)}); err != nil {
			t.Fatal(err)
		}
		ok, err := q.Next(&c)
		if !ok || err != nil || c.Err != nil || len(c.Readable[0]) != i+1 {
			t.Fatalf("round %d: Next = %v, %v, %v", i, ok, err, c.Err)
		}
		if err := q.PushUsed(c.Head, 0); err != nil {
			t.Fatal(err)
		}
		d.ResetAlloc()
	}
	d.SetAvailFlags(virtqueue.AvailFlagNoInterrupt)
	if q.NeedsNotification() {
		t.Errorf("NO_INTERRUPT not seen through the 16-bit flags load")
	}
}

// TestDriverAndDeviceConcurrently runs the mock driver and the device in two
// goroutines; under -race it checks that the ring accesses synchronize.
func TestDriverAndDeviceConcurrently(t *testing.T) {
	const total = 2000
	d, q := newDriver(t, vqt.Config{Size: 16})
	// One single-descriptor chain per table slot, written up front; the
	// driver then only recycles heads the device has completed.
	for i := uint16(0); i < 16; i++ {
		d.SetDesc(i, vqt.Desc{Addr: alloc(t, d, 4), Len: 4, Flags: fWrite})
	}
	dev := startRacingDevice(q, total)
	free := []uint16{}
	for i := uint16(0); i < 16; i++ {
		free = append(free, i)
	}
	for sent, got := 0, 0; got < total; {
		if sent < total && len(free) > 0 {
			d.PublishHead(free[len(free)-1])
			free = free[:len(free)-1]
			sent++
			continue
		}
		id, n, ok := d.PopUsed()
		if !ok {
			dev.nothingUsed(t, got)
			continue
		}
		if n != 4 || id >= 16 {
			t.Fatalf("bad used element {%d, %d}", id, n)
		}
		free = append(free, uint16(id))
		got++
	}
	dev.wait(t)
}

func TestChainHostSegmentsAreBounded(t *testing.T) {
	// Region 0 holds the rings of a 2-entry queue; 508 tiny regions follow,
	// contiguous in guest-physical space, so one descriptor can cover 508
	// regions and yield 508 host slices. Two such descriptors exceed the
	// per-chain bound of Size+MaxRegions = 511 slices.
	const tiny, n = 16, virtqueue.MaxRegions - 1
	rings := make([]byte, 4096)
	regions := []virtqueue.Region{{GuestPhysAddr: 0, UserAddr: 0x100000, Data: rings}}
	for i := 0; i < n; i++ {
		regions = append(regions, virtqueue.Region{
			GuestPhysAddr: 0x10000 + uint64(i*tiny),
			UserAddr:      0x200000 + uint64(i*0x1000),
			Data:          make([]byte, tiny),
		})
	}
	m, err := virtqueue.NewMemory(regions)
	if err != nil {
		t.Fatal(err)
	}
	q, err := virtqueue.NewSplitQueue(m, virtqueue.QueueConfig{
		Size: 2, DescUserAddr: 0x100000, AvailUserAddr: 0x100100, UsedUserAddr: 0x100200,
	})
	if err != nil {
		t.Fatal(err)
	}
	putDesc := func(i int, addr uint64, n uint32, flags, next uint16) {
		b := rings[16*i:]
		binary.LittleEndian.PutUint64(b[0:], addr)
		binary.LittleEndian.PutUint32(b[8:], n)
		binary.LittleEndian.PutUint16(b[12:], flags)
		binary.LittleEndian.PutUint16(b[14:], next)
	}
	putDesc(0, 0x10000, n*tiny, fNext, 1)
	putDesc(1, 0x10000, n*tiny, fWrite, 0)
	// avail.ring[0] = 0 already; publish avail.idx = 1 (no driver runs
	// concurrently, so a plain store is enough here).
	binary.LittleEndian.PutUint16(rings[0x100+2:], 1)

	var c virtqueue.Chain
	ok, err := q.Next(&c)
	if !ok || err != nil {
		t.Fatalf("Next = %v, %v", ok, err)
	}
	if !errors.Is(c.Err, virtqueue.ErrInvalidChain) || !strings.Contains(c.Err.Error(), "more than 511 host segments") {
		t.Fatalf("c.Err = %v, want the segment bound", c.Err)
	}
	if cap(c.Readable) > 2*(2+virtqueue.MaxRegions) || cap(c.Writable) > 2*(2+virtqueue.MaxRegions) {
		t.Errorf("slices grew to cap %d/%d", cap(c.Readable), cap(c.Writable))
	}
}
