package vhostuser_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// durableDisk models a disk with a volatile cache: writes land in data and
// reach durable only at Flush, as they reach the platter only at fdatasync.
type durableDisk struct {
	*memDisk
	dmu     sync.Mutex
	durable []byte
}

func newDurableDisk(size int) *durableDisk {
	return &durableDisk{memDisk: newMemDisk(size), durable: make([]byte, size)}
}

func (d *durableDisk) Flush() error {
	d.dmu.Lock()
	defer d.dmu.Unlock()
	d.mu.RLock()
	copy(d.durable, d.data)
	d.mu.RUnlock()
	return d.memDisk.Flush()
}

func (d *durableDisk) isDurable(off int, want []byte) bool {
	d.dmu.Lock()
	defer d.dmu.Unlock()
	return bytes.Equal(d.durable[off:off+len(want)], want)
}

const writebackOff = 32 // virtio_blk_config.writeback (VIRTIO 1.2 §5.2.4)

func writeback(t *testing.T, f *frontend.Frontend) byte {
	t.Helper()
	b, err := f.GetConfig(writebackOff, 1)
	if err != nil {
		t.Fatalf("GET_CONFIG writeback: %v", err)
	}
	return b[0]
}

// A writable device offers CONFIG_WCE and starts write-back (a write is
// durable after a FLUSH). After the driver writes writeback = 0 every write
// is durable by the time its completion is seen, and so is every write
// completed before the switch; writeback = 1 brings the cache back.
func TestWriteThroughModeMakesEveryWriteDurableBeforeItCompletes(t *testing.T) {
	d := newDurableDisk(testDiskSize)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
	f := s.connect(t, frontend.Options{ConfigSize: 60})
	if f.Features&(1<<blk.FeatureConfigWCE) == 0 {
		t.Fatalf("CONFIG_WCE not negotiated (features %#x)", f.Features)
	}
	if f.Config[writebackOff] != 1 {
		t.Fatalf("initial writeback %d, want 1 (write-back)", f.Config[writebackOff])
	}
	ctx := context.Background()
	q := f.Queues[0]
	a, b, c := pattern(1, 512), pattern(2, 512), pattern(3, 512)

	r, err := q.Write(ctx, 0, a)
	mustOK(t, "write A", r, err)
	if d.isDurable(0, a) {
		t.Fatal("write-back: A durable without a FLUSH (the model is broken)")
	}
	if err := f.SetConfig(writebackOff, 0, []byte{0}); err != nil {
		t.Fatalf("SET_CONFIG writeback 0: %v", err)
	}
	if !d.isDurable(0, a) {
		t.Fatal("switching to write-through left A, completed before, not durable")
	}
	if got := writeback(t, f); got != 0 {
		t.Fatalf("writeback reads %d after writing 0", got)
	}
	r, err = q.Write(ctx, 8, b)
	mustOK(t, "write B", r, err)
	if !d.isDurable(8*512, b) {
		t.Fatal("write-through: B completed but is not durable")
	}

	if err := f.SetConfig(writebackOff, 0, []byte{1}); err != nil {
		t.Fatalf("SET_CONFIG writeback 1: %v", err)
	}
	r, err = q.Write(ctx, 16, c)
	mustOK(t, "write C", r, err)
	if d.isDurable(16*512, c) {
		t.Fatal("write-back again: C was flushed anyway")
	}
	r, err = q.Flush(ctx)
	mustOK(t, "flush", r, err)
	if !d.isDurable(16*512, c) {
		t.Fatal("C not durable after FLUSH")
	}
}

// The mode belongs to the served disk, not to the connection: QEMU does
// not repeat SET_CONFIG after a reconnect, so a guest that chose
// write-through keeps it on the next connection.
func TestWriteThroughModeSurvivesReconnect(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{ConfigSize: 60})
	if err := f.SetConfig(writebackOff, 0, []byte{0}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	s.waitClosed(t)
	g := s.connect(t, frontend.Options{ConfigSize: 60})
	if g.Config[writebackOff] != 0 {
		t.Fatalf("writeback %d on the next connection, want 0", g.Config[writebackOff])
	}
}

// SET_CONFIG changes writeback and nothing else: a migration write, a byte
// outside writeback, a value other than 0/1, a range outside the config
// or a writeback change without CONFIG_WCE negotiated is refused (non-zero
// REPLY_ACK), changes nothing, and the session goes on.
func TestSetConfigChangesOnlyTheWritebackByte(t *testing.T) {
	whole := func(f *frontend.Frontend, edit func(c []byte)) []byte {
		c := bytes.Clone(f.Config)
		edit(c)
		return c
	}
	cases := []struct {
		name     string
		noWCE    bool // front-end does not negotiate CONFIG_WCE
		offset   uint32
		flags    uint32
		data     func(f *frontend.Frontend) []byte
		accepted bool
		wantWB   byte
	}{
		{"writeback 0", false, writebackOff, 0, func(*frontend.Frontend) []byte { return []byte{0} }, true, 0},
		{"whole config with only writeback changed", false, 0, 0, func(f *frontend.Frontend) []byte {
			return whole(f, func(c []byte) { c[writebackOff] = 0 })
		}, true, 0},
		{"writeback 2", false, writebackOff, 0, func(*frontend.Frontend) []byte { return []byte{2} }, false, 1},
		{"migration flag", false, writebackOff, 1, func(*frontend.Frontend) []byte { return []byte{0} }, false, 1},
		{"writeback and capacity", false, 0, 0, func(f *frontend.Frontend) []byte {
			return whole(f, func(c []byte) { c[writebackOff] = 0; c[0]++ })
		}, false, 1},
		{"the unused byte after writeback", false, writebackOff, 0, func(*frontend.Frontend) []byte { return []byte{1, 7} }, false, 1},
		{"num_queues", false, 34, 0, func(*frontend.Frontend) []byte { return []byte{9, 0} }, false, 1},
		{"past the end of the config", false, blk.ConfigSize - 1, 0, func(*frontend.Frontend) []byte { return []byte{0, 0} }, false, 1},
		{"offset near 2^32", false, 0xffffffff, 0, func(*frontend.Frontend) []byte { return []byte{0} }, false, 1},
		{"writeback 0 without CONFIG_WCE negotiated", true, writebackOff, 0, func(*frontend.Frontend) []byte { return []byte{0} }, false, 1},
		{"writeback unchanged without CONFIG_WCE negotiated", true, writebackOff, 0, func(*frontend.Frontend) []byte { return []byte{1} }, true, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, 1)
			o := frontend.Options{ConfigSize: 60}
			if tc.noWCE {
				o.Features = ^uint64(1 << blk.FeatureConfigWCE)
			}
			f := s.connect(t, o)
			before := bytes.Clone(f.Config)
			err := f.SetConfig(tc.offset, tc.flags, tc.data(f))
			if tc.accepted && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.accepted && !errors.Is(err, frontend.ErrNack) {
				t.Fatalf("err = %v, want ErrNack", err)
			}
			after, err := f.GetConfig(0, 60)
			if err != nil {
				t.Fatalf("session unusable after SET_CONFIG: %v", err)
			}
			before[writebackOff] = tc.wantWB
			if !bytes.Equal(after, before) {
				t.Fatalf("config after SET_CONFIG\n%x\nwant\n%x", after, before)
			}
		})
	}
}

// A read-only device offers no CONFIG_WCE, reports writeback 0 and refuses
// to change it.
func TestReadOnlyDeviceHasNoWriteCacheToggle(t *testing.T) {
	s := startServerOpts(t, vhostuser.Options{NumQueues: 1, Blk: blk.Options{ReadOnly: true}})
	f := s.connect(t, frontend.Options{ConfigSize: 60})
	if f.Features&(1<<blk.FeatureConfigWCE) != 0 || f.Config[writebackOff] != 0 {
		t.Fatalf("read-only: features %#x writeback %d; want no CONFIG_WCE, 0", f.Features, f.Config[writebackOff])
	}
	if err := f.SetConfig(writebackOff, 0, []byte{1}); !errors.Is(err, frontend.ErrNack) {
		t.Fatalf("SET_CONFIG writeback 1 on a read-only device: %v, want ErrNack", err)
	}
}

// Writes racing a switch to write-through: every write submitted after
// the SET_CONFIG reply is durable when it completes, and once the writers
// stop everything they wrote is durable without any FLUSH.
func TestSwitchToWriteThroughDuringWritesLosesNoDurability(t *testing.T) {
	d := newDurableDisk(testDiskSize)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 2})
	f := s.connect(t, frontend.Options{NumQueues: 2, ConfigSize: 60})
	ctx := context.Background()
	var switched atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan string, 2)
	const perQueue = 40
	for qi, q := range f.Queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perQueue; i++ {
				after := switched.Load()
				sector := uint64(qi*perQueue + i)
				data := pattern(byte(qi*perQueue+i+1), 512)
				r, err := q.Write(ctx, sector, data)
				if err != nil || r.Status != 0 {
					errs <- "write failed"
					return
				}
				if after && !d.isDurable(int(sector)*512, data) {
					errs <- "a write submitted after the switch completed before it was durable"
					return
				}
			}
		}()
	}
	if err := f.SetConfig(writebackOff, 0, []byte{0}); err != nil {
		t.Fatal(err)
	}
	switched.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	for qi := range f.Queues {
		for i := 0; i < perQueue; i++ {
			sector := qi*perQueue + i
			if !d.isDurable(sector*512, pattern(byte(sector+1), 512)) {
				t.Fatalf("sector %d not durable after writers stopped in write-through mode", sector)
			}
		}
	}
}

// A driver that negotiates CONFIG_WCE but not FLUSH cannot ask for
// durability, so the device starts write-through (VIRTIO 1.2 §5.2.5):
// writeback reads 0 and a completed write is already durable.
func TestWriteCacheWithoutFlushNegotiatedIsWriteThrough(t *testing.T) {
	d := newDurableDisk(testDiskSize)
	s := startServerOpts(t, vhostuser.Options{Disk: d, NumQueues: 1})
	f := s.connect(t, frontend.Options{ConfigSize: 60, Features: ^uint64(1 << blk.FeatureFlush)})
	if f.Features&(1<<blk.FeatureConfigWCE) == 0 || f.Features&(1<<blk.FeatureFlush) != 0 {
		t.Fatalf("features %#x: want CONFIG_WCE without FLUSH", f.Features)
	}
	if got := writeback(t, f); got != 0 {
		t.Fatalf("writeback %d, want 0", got)
	}
	data := pattern(4, 512)
	r, err := f.Queues[0].Write(context.Background(), 3, data)
	mustOK(t, "write", r, err)
	if !d.isDurable(3*512, data) {
		t.Fatal("write completed without being durable on a device that cannot be flushed")
	}
}
