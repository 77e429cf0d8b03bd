package vhostuser_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// readWatch reports every disk read offset.
type readWatch struct {
	*memDisk
	reads chan int64
}

func (d *readWatch) ReadVec(bufs [][]byte, off int64) error {
	err := d.memDisk.ReadVec(bufs, off)
	select {
	case d.reads <- off:
	default:
	}
	return err
}

// TestQEMUFirmwareReadsBootSector lets real QEMU drive the back-end: QEMU
// realizes vhost-user-blk-pci (negotiation, GET_CONFIG), SeaBIOS's
// virtio-blk driver sets DRIVER_OK (QEMU then sends SET_MEM_TABLE and the
// ring set-up) and reads the boot sector through the ring.
// It runs with the real-guest tests: VHOST_VHDX_QEMU_TESTS=1 (make
// test-qemu, part of make test, sets it); once enabled, a missing QEMU is a
// failure, not a skip.
func TestQEMUFirmwareReadsBootSector(t *testing.T) {
	if os.Getenv("VHOST_VHDX_QEMU_TESTS") != "1" {
		t.Skip("QEMU tests are off: set VHOST_VHDX_QEMU_TESTS=1 (make test does) after running tests/qemu/setup.sh")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("qemu-system-x86_64 not installed: run tests/qemu/setup.sh")
	}
	dir, err := os.MkdirTemp("", "vuq")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := dir + "/s"
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	disk := &readWatch{memDisk: newMemDisk(16 << 20), reads: make(chan int64, 100)}
	// Boot sector: "hlt; jmp $-1" and the 0x55AA signature.
	copy(disk.data, []byte{0xf4, 0xeb, 0xfd})
	disk.data[510], disk.data[511] = 0x55, 0xaa
	ev := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: disk, Blk: blk.Options{Serial: "qemu"}, NumQueues: 2, Events: ev})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	var stderr bytes.Buffer
	cmd := exec.Command(qemu, "-nodefaults", "-display", "none",
		"-m", "128M", "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-machine", "q35,accel=kvm:tcg,memory-backend=mem",
		"-chardev", "socket,id=c0,path="+sock, "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2,bootindex=1")
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	select {
	case off := <-disk.reads:
		if off != 0 {
			t.Errorf("first read at offset %d, want the boot sector", off)
		}
	case err := <-exited:
		t.Fatalf("QEMU exited before reading the disk: %v\n%s", err, stderr.String())
	case c := <-ev.closed:
		cmd.Process.Kill()
		<-exited
		exited <- nil // for the deferred cleanup
		t.Fatalf("QEMU connection ended before a read: %v\n%s", c.err, stderr.String())
	}
}
