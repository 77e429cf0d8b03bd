package qemu_test

import "testing"

// The backend is SIGKILLed in the middle of two guests writers' O_DIRECT
// streams on two queues — positioned by a third, foreground writer that
// finishes while the two are still going, not by a clock — and started
// again on the same socket. QEMU (chardev reconnect=1) hands the restarted
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
			b.kill(t)
			t.Log("backend killed in the middle of the guest's write streams; starting it again")
			b = e.startBackend(t, img, backendOpts{numQueues: 2})
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
