package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// hostileDisk is a small zeroed in-memory blk.Disk.
type hostileDisk struct{ data []byte }

func (d *hostileDisk) ReadVec(bufs [][]byte, off int64) error {
	for _, b := range bufs {
		off += int64(copy(b, d.data[off:]))
	}
	return nil
}

func (d *hostileDisk) WriteVec(bufs [][]byte, off int64) error {
	for _, b := range bufs {
		off += int64(copy(d.data[off:], b))
	}
	return nil
}

func (d *hostileDisk) Flush() error               { return nil }
func (d *hostileDisk) Size() int64                { return int64(len(d.data)) }
func (d *hostileDisk) LogicalSectorSize() uint32  { return 512 }
func (d *hostileDisk) PhysicalSectorSize() uint32 { return 512 }

func TestBenchHostileReportsEveryCasePassingAgainstTheServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: &hostileDisk{data: make([]byte, 1<<20)}})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	var out bytes.Buffer
	if err := runBenchHostile(context.Background(), sock, &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if strings.Contains(out.String(), "FAIL") || !strings.Contains(out.String(), "cases passed") {
		t.Errorf("output:\n%s", out.String())
	}
}
