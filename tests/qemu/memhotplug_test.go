package qemu_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// Memory hotplug during I/O: a guest started with -m 512M,slots=4,maxmem=2G
// gets a 256 MiB memory-backend-memfd,share=on DIMM (QMP object-add +
// device_add pc-dimm) while an O_DIRECT write stream runs; QEMU hands the
// new region to the daemon with ADD_MEM_REG (CONFIGURE_MEM_SLOTS). The guest
// onlines it as movable memory (the Debian cloud kernel does not online
// hot-added memory by itself) and runs 192 MiB of buffered and O_DIRECT
// I/O, then offlines it; device_del unplugs the DIMM (QEMU
// sends REM_MEM_REG) and the guest goes on with more I/O. Everything
// verifies in the guest and, with qemu-img compare, on the host.
//
// Not proven here: that a request's buffer was inside the DIMM (the
// kernel chooses; the block device's page cache stayed out of the movable
// zone in our runs, see the zoneinfo lines on the console). The vhostuser
// tests drive requests into an added region and check that none touches it
// after REM_MEM_REG (TestHotpluggedRegionServesIOAndIsNeverTouchedAfterRemoval,
// TestNoRequestTouchesARegionAfterRemMemRegIsAnswered).
func TestDIMMPluggedAndUnpluggedDuringIO(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "hotplug.vhdx", 256*mib, 512)
	a := region{seed: 301, off: 0, len: 32 * mib}
	big := region{seed: 302, off: 40 * mib, len: 192 * mib}
	c := region{seed: 303, off: 240 * mib, len: 8 * mib}
	want := e.newExpected(t, img)
	for _, r := range []region{a, big, c} {
		want.write(t, r.seed, r.off, r.len)
	}
	buffered := func(s string) string { return s[:len(s)-len(" -direct")] }
	const blocks = "/sys/devices/system/memory/memory[0-9]*"
	b := e.startBackend(t, img, backendOpts{})
	name := "hotplug"
	qmpPath := filepath.Join(e.work, name, "qmp.sock")
	e.boot(t, b, name, vmOpts{
		maxMem:    "2G",
		control:   true,
		extraArgs: []string{"-qmp", "unix:" + qmpPath + ",server=on,wait=off"},
		script: script(
			"n0=$(ls -d "+blocks+" | wc -l)",
			"echo \"memory blocks before: $n0\"",
			a.guestWrite("/dev/vda", 64*1024)+" & w=$!",
			"echo READY",
			"wait_host PLUGGED",
			// ACPI hotplug is asynchronous: wait for the new blocks.
			"i=0; while [ $(ls -d "+blocks+" | wc -l) -le $n0 ]; do i=$((i+1)); [ $i -gt 300 ] && fail 'no memory block appeared'; sleep 0.1; done",
			"new=''",
			"for m in "+blocks+"; do",
			"  if [ \"$(cat $m/state)\" = offline ]; then echo online_movable >$m/state; new=\"$new $m\"; fi",
			"done",
			"[ -n \"$new\" ] || fail 'no hot-added memory block to online'",
			"echo \"onlined:$new\"",
			"grep -E 'MemTotal|MemFree' /proc/meminfo",
			buffered(big.guestWrite("/dev/vda", 1<<20)),
			"sync; echo 3 >/proc/sys/vm/drop_caches",
			buffered(big.guestVerify("/dev/vda", 1<<20)),
			"grep -E 'MemTotal|MemFree|^Cached' /proc/meminfo",
			// For the log: how much of the movable (hot-added) zone
			// the I/O used. Not asserted: the kernel may place the
			// buffers anywhere (see the test's comment).
			"awk '/^Node/ {m = ($4 == \"Movable\")} m && /pages free|nr_zone_.*(anon|file)/' /proc/zoneinfo",
			"wait $w",
			"for m in $new; do echo offline >$m/state || fail \"offlining $m\"; done",
			"echo OFFLINED",
			"wait_host UNPLUGGED",
			"grep MemTotal /proc/meminfo",
			c.guestWrite("/dev/vda", 64*1024),
			verifies(mib, a, big, c),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("READY")
			ctx, cancel := context.WithTimeout(context.Background(), e.timeout)
			defer cancel()
			q := dialQMP(ctx, t, qmpPath)
			if _, err := q.cmd("object-add", map[string]any{"qom-type": "memory-backend-memfd", "id": "m1", "size": 256 << 20, "share": true}); err != nil {
				g.failGuest(fmt.Sprintf("object-add: %v", err))
			}
			if _, err := q.cmd("device_add", map[string]any{"driver": "pc-dimm", "id": "d1", "memdev": "m1"}); err != nil {
				g.failGuest(fmt.Sprintf("device_add: %v", err))
			}
			e.note("# QMP: object-add memory-backend-memfd m1 (256 MiB, share), device_add pc-dimm d1")
			g.send("PLUGGED")
			g.waitFor("OFFLINED")
			if _, err := q.cmd("device_del", map[string]any{"id": "d1"}); err != nil {
				g.failGuest(fmt.Sprintf("device_del: %v", err))
			}
			e.note("# QMP: device_del d1")
			for {
				r, err := q.cmd("query-memory-devices", nil)
				if err != nil {
					g.failGuest(fmt.Sprintf("query-memory-devices: %v", err))
				}
				var devs []json.RawMessage
				_ = json.Unmarshal(r, &devs)
				if len(devs) == 0 {
					break
				}
				select {
				case <-ctx.Done():
					g.failGuest("the DIMM was not unplugged before the timeout")
				case <-time.After(100 * time.Millisecond):
				}
			}
			if _, err := q.cmd("object-del", map[string]any{"id": "m1"}); err != nil {
				g.failGuest(fmt.Sprintf("object-del: %v", err))
			}
			g.send("UNPLUGGED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
