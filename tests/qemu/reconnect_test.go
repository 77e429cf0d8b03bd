package qemu_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The backend is SIGKILLed in the middle of two guest writers' O_DIRECT
// streams on two queues — positioned by a third, foreground writer that
// finishes while the two are still going, not by a clock — at a moment when
// its inflight buffer shows a request taken and not completed (the test
// freezes it with SIGSTOP and reads the buffer from /proc until it does),
// and is started again on the same socket. QEMU (chardev reconnect=1) hands the restarted
// backend the inflight buffer the first one allocated (INFLIGHT_SHMFD) and
// restarts each ring at its used index; the backend redoes the requests the
// dead process had taken but not completed (vhost-user.md §1.10, §1.13
// item 7). The writers finish, the guest verifies every byte, and so do
// qemu-img check and compare on the host.
func TestBackendKilledMidStreamOnTwoQueuesLosesNothing(t *testing.T) {
	e := newEnv(t)
	if e.backend == backendQSD {
		t.Skip("qemu-storage-daemon offers no INFLIGHT_SHMFD")
	}
	img := e.newImage(t, "midstream.vhdx", 96*mib, 512)
	a := region{seed: 121, off: 0, len: 32 * mib}
	c := region{seed: 122, off: 40 * mib, len: 32*mib + 4096}
	mark := region{seed: 123, off: 80 * mib, len: 2 * mib}
	want := e.newExpected(t, img)
	for _, r := range []region{a, c, mark} {
		want.write(t, r.seed, r.off, r.len)
	}

	b := e.startBackend(t, img, backendOpts{numQueues: 2})
	e.boot(t, b, "boot1", vmOpts{
		cpus:      2,
		numQueues: 2,
		reconnect: true,
		script: script(
			a.guestWrite("/dev/vda", 64*1024)+" & p0=$!",
			c.guestWrite("/dev/vda", 64*1024)+" & p1=$!",
			// 512 small writes queued behind and between the streams':
			// when they are done the streams are under way.
			mark.guestWrite("/dev/vda", 4096),
			"echo MIDSTREAM",
			"wait $p0",
			"wait $p1",
			verifies(mib, a, c, mark),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("MIDSTREAM")
			n := killWithRequestsInFlight(t, b, 2, 128) // QEMU's default queue-size
			t.Logf("backend killed in the middle of the guest's write streams with %d requests in flight; starting it again", n)
			b = e.startBackend(t, img, backendOpts{numQueues: 2})
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// readInflight returns the first size bytes of the stopped process pid's
// inflight buffer (the SET_INFLIGHT_FD mapping,
// "memfd:vhost-vhdx-inflight"). ok is false if it has none mapped yet.
func readInflight(pid, size int) (buf []byte, ok bool, err error) {
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, false, err
	}
	var start uint64
	for _, line := range strings.Split(string(maps), "\n") {
		if strings.Contains(line, "memfd:vhost-vhdx-inflight") {
			if _, err := fmt.Sscanf(line, "%x-", &start); err != nil {
				return nil, false, fmt.Errorf("parsing %q: %w", line, err)
			}
		}
	}
	if start == 0 {
		return nil, false, nil
	}
	buf = make([]byte, size)
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return nil, false, err
	}
	defer mem.Close()
	if _, err := mem.ReadAt(buf, int64(start)); err != nil {
		return nil, false, err
	}
	return buf, true, nil
}

// killWithRequestsInFlight stops the backend (SIGSTOP) over and over until
// its inflight buffer (numQueues split regions of queueSize entries, layout
// virtqueue/inflight.go) shows at least one request taken but not
// completed, then SIGKILLs it in that state, so the restarted backend has
// requests to redo. It returns how many there were.
func killWithRequestsInFlight(t *testing.T, b *backend, numQueues, queueSize int) int {
	t.Helper()
	regionSize := (16 + 16*queueSize + 63) &^ 63
	return killWhenInflight(t, b, numQueues*regionSize, func(buf []byte) int {
		marked := 0
		for q := 0; q < numQueues; q++ {
			for h := 0; h < queueSize; h++ {
				if buf[q*regionSize+16+16*h] == 1 {
					marked++
				}
			}
		}
		return marked
	})
}

// killWhenInflight is the loop behind killWithRequestsInFlight: marked
// counts the requests in flight in the first size bytes of the inflight
// buffer. It gives up (and fails the test) if the guest stops issuing
// requests first.
func killWhenInflight(t *testing.T, b *backend, size int, marked func([]byte) int) int {
	t.Helper()
	pid := b.cmd.Process.Pid
	for probe := 0; probe < 100000; probe++ {
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("SIGSTOP backend: %v", err)
		}
		for !processStopped(pid) {
			runtime.Gosched()
		}
		buf, ok, err := readInflight(pid, size)
		if err != nil {
			t.Fatalf("reading the backend's inflight buffer: %v", err)
		}
		if n := 0; ok {
			if n = marked(buf); n > 0 {
				b.env.note(fmt.Sprintf("kill -KILL $!  # crash the backend with %d requests in flight", n))
				b.cmd.Process.Kill()
				<-b.done
				return n
			}
		}
		syscall.Kill(pid, syscall.SIGCONT)
		time.Sleep(time.Millisecond) // let it run; not an assertion
	}
	t.Fatal("never caught the backend with a request in flight")
	return 0
}

func processStopped(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone: nothing to wait for
	}
	// Field 3, after "pid (comm)".
	i := strings.LastIndexByte(string(stat), ')')
	return i >= 0 && i+2 < len(stat) && (stat[i+2] == 'T' || stat[i+2] == 't')
}
