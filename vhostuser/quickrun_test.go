package vhostuser_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// The owner publishes the quick requests of a batch in runs of
// vhostuser.QuickRun, not all at its end, so the front-end can reap and
// refill while the rest of the batch executes: with the first read of the
// second run parked in the disk, the whole first run is already in the
// used ring, each with its own data.
func TestAnEarlyRunOfABatchIsPublishedWhileALaterReadOfItExecutes(t *testing.T) {
	const reads, size = 2 * vhostuser.QuickRun, 4096
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			d := newParkDisk(false)
			copy(d.data, pattern(11, reads*size)) // before the server reads it
			sector := func(i int) uint64 { return uint64(i * size / 512) }
			release := make(chan struct{})
			d.readGo[int64(sector(vhostuser.QuickRun))*512] = release
			s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
			f := s.connect(t, frontend.Options{MemSize: 2 << 20, QueueSize: 128, MaxIO: size, MaxInflight: reads, Packed: k.packed})
			q := f.Queues[0]
			var once bool
			t.Cleanup(func() { // a failed test must not leave the read parked
				if !once {
					close(release)
				}
			})

			// Published while the ring is disabled, then enabled: the owner
			// pops all of them in one batch.
			if err := f.SetVringEnable(0, false); err != nil {
				t.Fatal(err)
			}
			heads := map[uint16]int{}
			for i := range reads {
				h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTIn, Sector: sector(i), InLen: size})
				if err != nil {
					t.Fatal(err)
				}
				heads[h] = i
			}
			if err := f.SetVringEnable(0, true); err != nil {
				t.Fatal(err)
			}
			awaitParked(t, d, "read")

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			reap := func(n int, when string) {
				for range n {
					r, err := q.Reap(ctx, size)
					mustOK(t, when, r, err)
					i, ok := heads[r.Head]
					if !ok {
						t.Fatalf("%s: completion of head %d, not outstanding", when, r.Head)
					}
					delete(heads, r.Head)
					if !bytes.Equal(r.Data, d.bytes(i*size, size)) {
						t.Fatalf("%s: read %d has wrong data", when, i)
					}
				}
			}
			reap(vhostuser.QuickRun, "the first run, while a read of the second is parked")
			for _, i := range heads {
				if i < vhostuser.QuickRun {
					t.Fatalf("read %d of the first run still outstanding", i)
				}
			}
			once = true
			close(release)
			reap(vhostuser.QuickRun, "the second run")
		})
	}
}
