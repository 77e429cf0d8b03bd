package qemu_test

import (
	"fmt"
	"strconv"
	"testing"
)

// The README's attach line, unchanged (memfd memory with share=on, one NUMA
// node on it, a socket chardev, vhost-user-blk-pci with no num-queues),
// against a daemon started without --num-queues: QEMU asks for one queue
// per vCPU, the guest boots, its disk has that many blk-mq hardware queues,
// and data written through it reads back in the guest and lands in the
// image on the host.
func TestREADMEAttachLineWorksForAnyVCPUCount(t *testing.T) {
	for _, cpus := range []int{1, 2, 4, 8} {
		t.Run(fmt.Sprintf("smp%d", cpus), func(t *testing.T) {
			e := newEnv(t)
			img := e.newImage(t, "smp.vhdx", 16*mib, 512)
			rs := []region{
				{seed: uint64(cpus), off: 0, len: 64 * 1024},
				{seed: uint64(cpus) + 100, off: 3*mib - 4096, len: 2*mib + 8192},
			}
			want := e.newExpected(t, img)
			for _, r := range rs {
				want.write(t, r.seed, r.off, r.len)
			}
			var bo backendOpts // vhost-vhdx: its defaults, as the README says
			if e.backend == backendQSD {
				// qemu-storage-daemon offers one queue unless told.
				bo.numQueues = 8
			}
			b := e.startBackend(t, img, bo)
			e.boot(t, b, "boot", vmOpts{cpus: cpus, autoQueues: true, script: script(
				expect("online CPUs", "$(grep -c ^processor /proc/cpuinfo)", strconv.Itoa(cpus)),
				expect("blk-mq hardware queues of vda", "$(ls /sys/block/vda/mq | wc -l)", strconv.Itoa(cpus)),
				writes(128*1024, rs...),
				verifies(4096, rs...),
			)})
			b.stop(t)
			e.check(t, img)
			e.compare(t, img, want)
		})
	}
}
