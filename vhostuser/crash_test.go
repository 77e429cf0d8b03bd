package vhostuser_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// The crash test runs the back-end as a child process (this test binary
// re-executed into TestHelperBackendProcess) so that it can really be
// SIGKILLed: nothing of it survives but what it wrote to the disk file
// and to shared memory.
const (
	envHelperSocket  = "VHOSTVHDX_HELPER_SOCKET"
	envHelperDisk    = "VHOSTVHDX_HELPER_DISK"
	envHelperBlockAt = "VHOSTVHDX_HELPER_BLOCK_AT" // comma-separated byte offsets
)

// fileDisk is a blk.Disk on a file. A write to one of the offsets in
// blockAt stores the first half of its data, reports "blocked" on stdout
// and never returns: the process is killed in the middle of that write.
type fileDisk struct {
	f       *os.File
	size    int64
	blockAt map[int64]bool
}

func (d *fileDisk) ReadVec(bufs [][]byte, off int64) error {
	for _, b := range bufs {
		if _, err := d.f.ReadAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (d *fileDisk) WriteVec(bufs [][]byte, off int64) error {
	if d.blockAt[off] {
		d.f.WriteAt(bufs[0][:len(bufs[0])/2], off)
		fmt.Println("blocked")
		time.Sleep(time.Hour) // until SIGKILL
	}
	for _, b := range bufs {
		if _, err := d.f.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (d *fileDisk) Flush() error               { return d.f.Sync() }
func (d *fileDisk) Size() int64                { return d.size }
func (d *fileDisk) LogicalSectorSize() uint32  { return 512 }
func (d *fileDisk) PhysicalSectorSize() uint32 { return 512 }

// TestHelperBackendProcess is the back-end process of the crash test; it
// does nothing in a normal run.
func TestHelperBackendProcess(t *testing.T) {
	sock := os.Getenv(envHelperSocket)
	if sock == "" {
		t.Skip("helper process for TestBackendKilledWithWritesInFlightResubmitsExactlyTheUnfinishedOnes")
	}
	f, err := os.OpenFile(os.Getenv(envHelperDisk), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	blockAt := map[int64]bool{}
	for _, f := range strings.Split(os.Getenv(envHelperBlockAt), ",") {
		if off, err := strconv.ParseInt(f, 10, 64); err == nil {
			blockAt[off] = true
		}
	}
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("listening")
	err = vhostuser.Serve(context.Background(), ln, vhostuser.Options{Disk: &fileDisk{f: f, size: st.Size(), blockAt: blockAt}, NumQueues: 2})
	t.Fatalf("Serve returned: %v", err)
}

type backendProc struct {
	cmd   *exec.Cmd
	lines *bufio.Scanner
}

// startBackend runs the helper back-end and waits until it listens.
func startBackend(t *testing.T, sock, disk string, blockAt ...int64) *backendProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperBackendProcess$", "-test.count=1")
	var offs []string
	for _, off := range blockAt {
		offs = append(offs, strconv.FormatInt(off, 10))
	}
	cmd.Env = append(os.Environ(), envHelperSocket+"="+sock, envHelperDisk+"="+disk, envHelperBlockAt+"="+strings.Join(offs, ","))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &backendProc{cmd: cmd, lines: bufio.NewScanner(out)}
	t.Cleanup(func() { p.kill() })
	p.await(t, "listening")
	return p
}

// await blocks until the back-end prints line; it fails if the back-end
// exits first.
func (p *backendProc) await(t *testing.T, line string) {
	t.Helper()
	for p.lines.Scan() {
		if p.lines.Text() == line {
			return
		}
	}
	t.Fatalf("back-end exited before printing %q: %v", line, p.lines.Err())
}

func (p *backendProc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Kill()
		p.cmd.Wait()
	}
}

func TestBackendKilledWithWritesInFlightResubmitsExactlyTheUnfinishedOnes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts back-end processes")
	}
	dir := t.TempDir()
	sock, disk := filepath.Join(dir, "s.sock"), filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	const perQueue = 5 // three descriptors each in a 16-entry ring
	o := inflightSetup
	o.NumQueues = 2

	// Requests run in parallel inside a queue: the first back-end parks
	// the 2nd and the 4th write of each queue, completes the others around
	// them, and dies with those two executing.
	sectorOf := func(queue, i int) uint64 { return uint64(8 * (queue*perQueue + i)) }
	blocked := func(i int) bool { return i == 1 || i == 3 }
	var blockAt []int64
	for qi := range 2 {
		for i := range perQueue {
			if blocked(i) {
				blockAt = append(blockAt, int64(sectorOf(qi, i)*512))
			}
		}
	}
	a := startBackend(t, sock, disk, blockAt...)
	f, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in, err := f.SetupInflight(o, true)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	want := map[uint64][]byte{}
	blockedHeads := make([]map[uint16]bool, len(f.Queues))
	for qi, q := range f.Queues {
		blockedHeads[qi] = map[uint16]bool{}
		for i := range perQueue {
			sector := sectorOf(qi, i)
			data := pattern(byte(16*qi+i+1), 4096)
			want[sector] = data
			h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: sector, Data: data})
			if err != nil {
				t.Fatal(err)
			}
			if blocked(i) {
				blockedHeads[qi][h] = true
			}
		}
	}
	for range blockAt {
		a.await(t, "blocked")
	}
	for qi, q := range f.Queues {
		for range perQueue - len(blockedHeads[qi]) {
			r, err := q.Reap(context.Background(), 0)
			mustOK(t, fmt.Sprintf("queue %d write around the parked ones", qi), r, err)
			if blockedHeads[qi][r.Head] {
				t.Fatalf("queue %d: parked write %d completed", qi, r.Head)
			}
		}
	}
	a.kill()
	// What the dead back-end left: in each queue the writes it was
	// executing, and only those, are marked in flight.
	for qi := range f.Queues {
		region := in.QueueRegion(qi, virtqueue.InflightRegionSize(o.QueueSize))
		for h := 0; h < int(o.QueueSize); h++ {
			if marked := region[16+16*h] == 1; marked != blockedHeads[qi][uint16(h)] {
				t.Errorf("queue %d descriptor %d: in flight %t after the kill; the writes being executed have heads %v", qi, h, marked, blockedHeads[qi])
			}
		}
	}

	// A new back-end on the same socket; the front-end reconnects as QEMU
	// with reconnect=1 does, handing back the inflight buffer.
	startBackend(t, sock, disk)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Reattach(c, in, o); err != nil {
		t.Fatalf("reconnecting: %v", err)
	}
	for qi, q := range f.Queues {
		for range len(blockedHeads[qi]) {
			r, err := q.Reap(context.Background(), 0)
			mustOK(t, fmt.Sprintf("queue %d resubmitted write", qi), r, err)
			if !blockedHeads[qi][r.Head] {
				t.Errorf("queue %d: head %d completed again after the restart", qi, r.Head)
			}
		}
		if _, ok := q.PopUsed(); ok {
			t.Errorf("queue %d: a request completed twice", qi)
		}
	}
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	for sector, data := range want {
		if !bytes.Equal(got[sector*512:sector*512+4096], data) {
			t.Errorf("sector %d does not hold its write after the restart", sector)
		}
	}
	// Every request is completed and none is left marked in flight.
	for qi := range f.Queues {
		region := in.QueueRegion(qi, virtqueue.InflightRegionSize(o.QueueSize))
		for h := 0; h < int(o.QueueSize); h++ {
			if region[16+16*h] != 0 {
				t.Errorf("queue %d descriptor %d still in flight", qi, h)
			}
		}
	}
}
