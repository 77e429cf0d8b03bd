package vhostuser_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// coldDisk is a parkDisk that is a blk.CachedReader: reads at offsets with
// a readGo gate are "not in memory" (ReadVecCached says so) and park in
// ReadVecCold until the test opens the gate.
type coldDisk struct{ *parkDisk }

func (d coldDisk) ReadVecCached(b [][]byte, off int64) (bool, error) {
	d.mu.Lock()
	cold := d.readGo[off] != nil
	d.mu.Unlock()
	if cold {
		return false, nil
	}
	return true, d.memDisk.ReadVec(b, off)
}

func (d coldDisk) ReadVecCold(b [][]byte, off int64) error {
	d.park(d.readGo, off, "cold read")
	return d.memDisk.ReadVec(b, off)
}

// A read whose data must come from the disk goes to an executor: the ring
// owner goes on with the cached reads behind it, which complete while it
// waits, and it completes with its own data when the disk answers.
func TestACachedReadNeverWaitsBehindAReadOfDataOnTheDisk(t *testing.T) {
	for _, k := range ringKinds {
		t.Run(k.name, func(t *testing.T) {
			d := coldDisk{newParkDisk(false)}
			copy(d.data, pattern(5, 64*512))
			d.readGo[0] = make(chan struct{})
			s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
			f := s.connect(t, parallelSetup(k.packed))
			q := f.Queues[0]
			ctx := context.Background()
			cold, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTIn, Sector: 0, InLen: 4096})
			if err != nil {
				t.Fatal(err)
			}
			awaitParked(t, d.parkDisk, "cold read")
			for i := 1; i < 8; i++ {
				r, err := q.Read(ctx, uint64(8*i), 4096)
				mustOK(t, "cached read behind the cold one", r, err)
				if r.Head == cold || !bytes.Equal(r.Data, d.bytes(8*i*512, 4096)) {
					t.Fatalf("read %d: head %d (cold %d), data equal %v", i, r.Head, cold, bytes.Equal(r.Data, d.bytes(8*i*512, 4096)))
				}
			}
			close(d.readGo[0])
			r, err := q.Reap(ctx, 4096)
			mustOK(t, "the cold read", r, err)
			if r.Head != cold || !bytes.Equal(r.Data, d.bytes(0, 4096)) {
				t.Fatalf("cold read: head %d want %d, data equal %v", r.Head, cold, bytes.Equal(r.Data, d.bytes(0, 4096)))
			}
		})
	}
}
