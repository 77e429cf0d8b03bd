package vhostuser_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// TestServeKeepsAcceptingAfterRunningOutOfFDs: accept(2) failing with EMFILE
// must not end the daemon; once fds are free again the waiting front-end is
// served.
func TestServeKeepsAcceptingAfterRunningOutOfFDs(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	// The front-end connects first: its connection waits in the backlog.
	fe, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Close()

	// Exhaust the fd table so the server's accept fails with EMFILE.
	var held []*os.File
	release := func() {
		for _, f := range held {
			f.Close()
		}
		held = nil
	}
	defer release()
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, unix.EMFILE) {
				t.Fatalf("exhausting fds: %v", err)
			}
			break
		}
		held = append(held, f)
		if len(held) > 1<<20 {
			t.Skip("fd limit too high to exhaust")
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: newMemDisk(1 << 20)}) }()

	// Let the server hit EMFILE at least once; then free the fds.
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-served:
		t.Fatalf("Serve returned while out of fds: %v", err)
	default:
	}
	release()

	if _, err := fe.GetFeatures(); err != nil {
		t.Fatalf("front-end not served after fds were released: %v", err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
}
