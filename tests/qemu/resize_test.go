package qemu_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// growDisk is an in-memory disk whose size the test changes while a guest
// uses it (test-only: the daemon has no online resize yet).
type growDisk struct {
	mu   sync.RWMutex
	data []byte // room for the largest size
	size atomic.Int64
}

func (d *growDisk) rangeOK(bufs [][]byte, off int64) error {
	n := int64(0)
	for _, b := range bufs {
		n += int64(len(b))
	}
	if off < 0 || off+n > d.size.Load() {
		return errors.New("growDisk: out of range")
	}
	return nil
}

func (d *growDisk) ReadVec(bufs [][]byte, off int64) error {
	if err := d.rangeOK(bufs, off); err != nil {
		return err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	for _, b := range bufs {
		off += int64(copy(b, d.data[off:]))
	}
	return nil
}

func (d *growDisk) WriteVec(bufs [][]byte, off int64) error {
	if err := d.rangeOK(bufs, off); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		off += int64(copy(d.data[off:], b))
	}
	return nil
}

func (d *growDisk) Flush() error               { return nil }
func (d *growDisk) Size() int64                { return d.size.Load() }
func (d *growDisk) LogicalSectorSize() uint32  { return 512 }
func (d *growDisk) PhysicalSectorSize() uint32 { return 512 }

// The served disk grows while the guest runs; the back-end announces it
// with BACKEND_CONFIG_CHANGE_MSG on the channel QEMU set up
// (SET_BACKEND_REQ_FD), QEMU re-reads the config and interrupts the guest,
// and the guest's kernel sees the new capacity ("detected capacity change")
// and can write at its end. The back-end runs in the test process with a
// test-only disk whose size can change.
func TestGuestSeesCapacityChangeAnnouncedOnTheBackendChannel(t *testing.T) {
	e := newEnv(t)
	const small, big = 8 * mib, 16 * mib
	d := &growDisk{data: make([]byte, big)}
	d.size.Store(small)

	sock := filepath.Join(e.work, "vhost.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	n := new(vhostuser.ConfigNotifier)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: d, Blk: blk.Options{Serial: "grow"}, Notifier: n})
	}()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	logf := filepath.Join(e.work, "backend.log")
	if err := os.WriteFile(logf, []byte("(in-process back-end)\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	b := &backend{env: e, sock: sock, log: logf, done: make(chan struct{})}

	e.boot(t, b, "boot", vmOpts{
		control: true,
		script: script(
			expect("sectors before", "$(cat /sys/block/vda/size)", strconv.FormatInt(small/512, 10)),
			"echo READY",
			"wait_host RESIZED",
			// The config interrupt is handled asynchronously; wait for it
			// (bounded by the guest's own hang timeout).
			"i=0; while [ \"$(cat /sys/block/vda/size)\" != "+strconv.FormatInt(big/512, 10)+" ]; do i=$((i+1)); [ $i -gt 300 ] && fail 'capacity did not change'; sleep 0.1; done",
			expect("sectors after", "$(cat /sys/block/vda/size)", strconv.FormatInt(big/512, 10)),
			"dmesg | grep -q 'detected capacity change' || fail 'no capacity change in dmesg'",
			"echo ok: dmesg reports the capacity change",
			// The new end of the disk is usable.
			region{seed: 5, off: big - mib, len: mib}.guestWrite("/dev/vda", 64*1024),
			region{seed: 5, off: big - mib, len: mib}.guestVerify("/dev/vda", 4096),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("READY")
			d.size.Store(big)
			if err := n.NotifyConfigChange(context.Background()); err != nil {
				g.failGuest("NotifyConfigChange: " + err.Error())
			}
			g.send("RESIZED")
			return b
		},
	})
}
