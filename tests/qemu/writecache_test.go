package qemu_test

import (
	"strings"
	"testing"
)

// The guest's virtio_blk driver offers the write cache switch in
// /sys/block/vda/cache_type (CONFIG_WCE): it starts as "write back", the
// daemon accepts "write through" (and logs it), and I/O keeps working and
// lands in the image.
func TestGuestSwitchesTheWriteCacheToWriteThrough(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("checks the vhost-vhdx log")
	}
	img := e.newImage(t, "wce.vhdx", 16*mib, 512)
	r := region{seed: 77, off: mib, len: 256 * 1024}
	want := e.newExpected(t, img)
	want.write(t, r.seed, r.off, r.len)
	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot", vmOpts{script: script(
		expect("initial cache type", "$(cat /sys/block/vda/cache_type)", "write back"),
		"echo 'write through' > /sys/block/vda/cache_type",
		expect("cache type after the switch", "$(cat /sys/block/vda/cache_type)", "write through"),
		expect("block layer cache", "$(cat /sys/block/vda/queue/write_cache)", "write through"),
		writes(64*1024, r),
		verifies(4096, r),
	)})
	b.stop(t)
	if log := tail(b.log, 200); !strings.Contains(log, "write cache to write-through") {
		t.Fatalf("backend log does not show the switch:\n%s", log)
	}
	e.check(t, img)
	e.compare(t, img, want)
}
