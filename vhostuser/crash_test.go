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
	"slices"
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

// killedMidWrite is the scene of the SIGKILL tests: a raw disk file, a
// back-end process on it, and a front-end with two queues and an inflight
// buffer. Requests run in parallel inside a queue: the back-end parks the
// 2nd and the 4th of killPerQueue writes of each queue, completes the
// others around them, and dies with those two executing.
type killedMidWrite struct {
	sock, disk string
	o          frontend.Options
	back       *backendProc
	f          *frontend.Frontend
	in         *frontend.Inflight
	want       map[uint64][]byte // sector -> the 4 KiB written there
	parked     [][]uint16        // per queue, the parked writes' heads (buffer ids), sorted
}

const killPerQueue = 5 // three descriptors each in a 16-entry ring

// killSector is where write i of queue qi goes.
func killSector(qi, i int) uint64 { return uint64(8 * (qi*killPerQueue + i)) }

func killParked(i int) bool { return i == 1 || i == 3 }

// startKilledMidWrite starts the back-end and sets up a front-end with o,
// two queues and an inflight buffer.
func startKilledMidWrite(t *testing.T, o frontend.Options) *killedMidWrite {
	t.Helper()
	dir := t.TempDir()
	k := &killedMidWrite{sock: filepath.Join(dir, "s.sock"), disk: filepath.Join(dir, "disk.raw"), o: o, want: map[uint64][]byte{}}
	k.o.NumQueues = 2
	if err := os.WriteFile(k.disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	var blockAt []int64
	for qi := range k.o.NumQueues {
		for i := range killPerQueue {
			if killParked(i) {
				blockAt = append(blockAt, int64(killSector(qi, i)*512))
			}
		}
	}
	k.back = startBackend(t, k.sock, k.disk, blockAt...)
	f, err := frontend.Dial(k.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	in, err := f.SetupInflight(k.o, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	k.f, k.in = f, in
	return k
}

// submitAndKill submits killPerQueue writes to each queue, waits until the
// parked ones are blocked in the back-end, reaps the others (none may be a
// parked one) and kills the back-end.
func (k *killedMidWrite) submitAndKill(t *testing.T) {
	t.Helper()
	k.parked = make([][]uint16, len(k.f.Queues))
	for qi, q := range k.f.Queues {
		for i := range killPerQueue {
			sector := killSector(qi, i)
			data := pattern(byte(16*qi+i+1), 4096)
			k.want[sector] = data
			h, err := q.Submit(frontend.BlkRequest{Type: frontend.BlkTOut, Sector: sector, Data: data})
			if err != nil {
				t.Fatal(err)
			}
			if killParked(i) {
				k.parked[qi] = append(k.parked[qi], h)
			}
		}
		slices.Sort(k.parked[qi])
	}
	for _, heads := range k.parked {
		for range heads {
			k.back.await(t, "blocked")
		}
	}
	for qi, q := range k.f.Queues {
		for range killPerQueue - len(k.parked[qi]) {
			r, err := q.Reap(context.Background(), 0)
			mustOK(t, fmt.Sprintf("queue %d write around the parked ones", qi), r, err)
			if slices.Contains(k.parked[qi], r.Head) {
				t.Fatalf("queue %d: parked write %d completed", qi, r.Head)
			}
		}
	}
	k.back.kill()
}

// restart starts a new back-end on the same socket; the front-end
// reconnects as QEMU with reconnect=1 does, handing back the inflight
// buffer.
func (k *killedMidWrite) restart(t *testing.T) {
	t.Helper()
	startBackend(t, k.sock, k.disk)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: k.sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.f.Reattach(c, k.in, k.o); err != nil {
		t.Fatalf("reconnecting: %v", err)
	}
}

// reapResubmitted reaps queue qi's resubmitted writes after restart: each
// completes OK and is a parked one, and nothing completes twice.
func (k *killedMidWrite) reapResubmitted(t *testing.T, qi int) {
	t.Helper()
	q := k.f.Queues[qi]
	for range len(k.parked[qi]) {
		r, err := q.Reap(context.Background(), 0)
		mustOK(t, fmt.Sprintf("queue %d resubmitted write", qi), r, err)
		if !slices.Contains(k.parked[qi], r.Head) {
			t.Errorf("queue %d: head %d completed again after the restart", qi, r.Head)
		}
	}
	if _, ok := q.PopUsed(); ok {
		t.Errorf("queue %d: a request completed twice", qi)
	}
}

// checkDisk checks that every write, the parked ones included, is on the
// disk file.
func (k *killedMidWrite) checkDisk(t *testing.T) {
	t.Helper()
	got, err := os.ReadFile(k.disk)
	if err != nil {
		t.Fatal(err)
	}
	for sector, data := range k.want {
		if !bytes.Equal(got[sector*512:sector*512+4096], data) {
			t.Errorf("sector %d does not hold its write after the restart", sector)
		}
	}
}

func TestBackendKilledWithWritesInFlightResubmitsExactlyTheUnfinishedOnes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts back-end processes")
	}
	k := startKilledMidWrite(t, inflightSetup)
	k.submitAndKill(t)
	// What the dead back-end left: in each queue the writes it was
	// executing, and only those, are marked in flight.
	for qi := range k.f.Queues {
		region := k.in.QueueRegion(qi, virtqueue.InflightRegionSize(k.o.QueueSize))
		for h := 0; h < int(k.o.QueueSize); h++ {
			if marked := region[16+16*h] == 1; marked != slices.Contains(k.parked[qi], uint16(h)) {
				t.Errorf("queue %d descriptor %d: in flight %t after the kill; the writes being executed have heads %v", qi, h, marked, k.parked[qi])
			}
		}
	}

	k.restart(t)
	for qi := range k.f.Queues {
		k.reapResubmitted(t, qi)
	}
	k.checkDisk(t)
	// Every request is completed and none is left marked in flight.
	for qi := range k.f.Queues {
		region := k.in.QueueRegion(qi, virtqueue.InflightRegionSize(k.o.QueueSize))
		for h := 0; h < int(k.o.QueueSize); h++ {
			if region[16+16*h] != 0 {
				t.Errorf("queue %d descriptor %d still in flight", qi, h)
			}
		}
	}
}
