package vhostuser_test

import (
	"bytes"
	"context"
	"path/filepath"
	"runtime"
	"sync"
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
	paths := serveOnTwoSockets(t, vhostuser.Options{Disk: disk, Gate: gate, NumQueues: 2})
	src := dialSetUp(t, paths[0])
	ctx := context.Background()
	data := bytes.Repeat([]byte("source wrote this "), 512)[:8192]
	if res, err := src.Queues[1].Write(ctx, 64, data); err != nil || res.Status != 0 {
		t.Fatalf("source write: %v, status %d", err, res.Status)
	}

	dst, setup := dialWaitingAtGate(t, paths[1], gate)
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

// serveOnTwoSockets serves one device with opts on two sockets, a.sock and
// b.sock, as `serve --socket-path A --socket-path B` does, and returns
// their paths once both Serve goroutines run. The servers stop at cleanup.
func serveOnTwoSockets(t *testing.T, opts vhostuser.Options) []string {
	t.Helper()
	dir := t.TempDir()
	var paths []string
	var serving sync.WaitGroup
	for _, name := range []string{"a.sock", "b.sock"} {
		path := filepath.Join(dir, name)
		ln, err := vhostuser.Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		serving.Add(1)
		go func() {
			serving.Done()
			done <- vhostuser.Serve(ctx, ln, opts)
		}()
		t.Cleanup(func() { cancel(); <-done })
		paths = append(paths, path)
	}
	serving.Wait()
	return paths
}

// dialSetUp connects to path and negotiates two queues; the connection is
// closed at cleanup.
func dialSetUp(t *testing.T, path string) *frontend.Frontend {
	t.Helper()
	f, err := frontend.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Setup(frontend.Options{NumQueues: 2}); err != nil {
		t.Fatal(err)
	}
	return f
}

// dialWaitingAtGate connects to path and negotiates two queues in the
// background; it returns once the first ring waits at gate, with the
// channel that will carry Setup's result. The connection is closed at
// cleanup.
func dialWaitingAtGate(t *testing.T, path string, gate *vhostuser.RingGate) (*frontend.Frontend, <-chan error) {
	t.Helper()
	f, err := frontend.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	setup := make(chan error, 1)
	go func() { setup <- f.Setup(frontend.Options{NumQueues: 2}) }()
	for gate.Waiting() == 0 {
		runtime.Gosched()
	}
	return f, setup
}
