package vhostuser_test

import (
	"bytes"
	"context"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// One disk on two sockets sharing a RingGate, as `serve --socket-path A
// --socket-path B` runs it for a migration on one host: the second
// front-end's rings start only once the first one's are all stopped, and
// it sees everything the first one wrote.
func TestDestinationRingsStartOnlyAfterTheSourceStoppedItsRings(t *testing.T) {
	disk := newMemDisk(testDiskSize)
	gate := vhostuser.NewRingGate()
	var paths []string
	for _, name := range []string{"a.sock", "b.sock"} {
		path := filepath.Join(t.TempDir(), name)
		ln, err := vhostuser.Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: disk, Gate: gate, NumQueues: 2})
		}()
		t.Cleanup(func() { cancel(); <-done })
		paths = append(paths, path)
	}
	src, err := frontend.Dial(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.Setup(frontend.Options{NumQueues: 2}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data := bytes.Repeat([]byte("source wrote this "), 512)[:8192]
	if res, err := src.Queues[1].Write(ctx, 64, data); err != nil || res.Status != 0 {
		t.Fatalf("source write: %v, status %d", err, res.Status)
	}

	dst, err := frontend.Dial(paths[1])
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	setup := make(chan error, 1)
	go func() { setup <- dst.Setup(frontend.Options{NumQueues: 2}) }()
	for gate.Waiting() == 0 {
		runtime.Gosched()
	}
	select {
	case err := <-setup:
		t.Fatalf("destination started a ring while the source's run (Setup: %v)", err)
	default:
	}
	// The source still serves while the destination waits.
	if res, err := src.Queues[0].Read(ctx, 64, 512); err != nil || res.Status != 0 {
		t.Fatalf("source read while the destination waits: %v", err)
	}
	// Source stops its rings (what QEMU does at the end of a migration).
	for i := range 2 {
		if err := src.SetVringEnable(uint32(i), false); err != nil {
			t.Fatal(err)
		}
		if _, err := src.GetVringBase(uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-setup; err != nil {
		t.Fatalf("destination Setup after the source stopped: %v", err)
	}
	res, err := dst.Queues[0].Read(ctx, 64, len(data))
	if err != nil || res.Status != 0 || !bytes.Equal(res.Data, data) {
		t.Fatalf("destination read: %v, status %d, data equal %t", err, res.Status, bytes.Equal(res.Data, data))
	}
	if gate.Owner() == 0 {
		t.Fatal("gate free while the destination's rings run")
	}
	// The destination leaves: the gate is free again.
	dst.Close()
	for gate.Owner() != 0 {
		runtime.Gosched()
	}
}
