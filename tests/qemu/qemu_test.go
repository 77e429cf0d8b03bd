package qemu_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/tests/qemu/pattern"
)

// script joins guest shell lines.
func script(lines ...string) string { return strings.Join(lines, "\n") }

// writes renders guestcmd writes for the regions, in order.
func writes(bs int64, rs ...region) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.guestWrite("/dev/vda", bs) + "\n")
	}
	return b.String()
}

// verifies renders O_DIRECT verifications for the regions.
func verifies(bs int64, rs ...region) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.guestVerify("/dev/vda", bs) + "\n")
	}
	return b.String()
}

func zeroes(off, n int64) string {
	return fmt.Sprintf("guestcmd verify -dev /dev/vda -zero -off %d -len %d -direct", off, n)
}

// A guest writes data that starts, ends and runs across the image's 1 MiB
// block boundaries, overwrites part of an allocated block, and reads it all
// back with O_DIRECT; unwritten ranges read as zeroes. On the host the
// image must pass qemu-img check and hold exactly what was written.
func TestGuestWritesAcrossBlockBoundariesAndReadsThemBack(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "blocks.vhdx", 64*mib, 512)
	rs := []region{
		{seed: 1, off: 0, len: 4096},                      // first sectors of the disk
		{seed: 2, off: 1*mib - 4096, len: 8192},           // across the 1 MiB boundary
		{seed: 3, off: 3*mib - 512, len: 1024},            // one sector either side of 3 MiB
		{seed: 4, off: 5*mib + 512, len: 3 * mib},         // four blocks, unaligned start
		{seed: 5, off: 6*mib - 4096, len: 8192},           // overwrites the middle of seed 4
		{seed: 6, off: img.size - 8192, len: 8192},        // last sectors of the disk
		{seed: 7, off: 20*mib + 4096, len: 64*1024 + 512}, // odd length inside one block
	}
	want := e.newExpected(t, img)
	for _, r := range rs {
		want.write(t, r.seed, r.off, r.len)
	}
	survivors := []region{ // what is left of seed 4 after seed 5
		{seed: 4, off: 5*mib + 512, len: mib - 4096 - 512},
		{seed: 4, off: 6*mib + 4096, len: 2*mib + 512 - 4096},
	}

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{script: script(
		expect("size in sectors", "$(cat /sys/block/vda/size)", strconv.FormatInt(img.size/512, 10)),
		writes(512*1024, rs...),
		verifies(512*1024, append(rs[:3:3], rs[5:]...)...),
		verifies(4096, survivors...),
		verifies(4096, rs[4]),
		zeroes(2*mib, mib-512), // unwritten part of a block that seed 3 allocated
		zeroes(12*mib, 4*mib),  // never-touched blocks
		zeroes(4096, mib-8192), // unwritten part of the block seed 1 allocated
		"echo 3 > /proc/sys/vm/drop_caches",
		// Buffered reads go through the page cache and readahead.
		"guestcmd verify -dev /dev/vda -seed 4 -off 7340032 -len 1049088",
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// A guest makes an ext4 file system, writes files, unmounts, checks it with
// e2fsck, remounts and verifies the checksums. On the host the image passes
// qemu-img check, and a raw conversion passes e2fsck and yields the same
// file contents through debugfs.
func TestGuestExt4SurvivesRemountAndHostFsck(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "ext4.vhdx", 128*mib, 512)
	files := []struct {
		name string
		seed uint64
		len  int64
	}{
		{"small", 21, 17},
		{"dir/big", 22, 20 * mib},
		{"dir/odd", 23, 1234567},
	}
	var w, v []string
	for _, f := range files {
		w = append(w, fmt.Sprintf("guestcmd write -create -dev /mnt/%s -seed %d -off 0 -len %d", f.name, f.seed, f.len))
		v = append(v, fmt.Sprintf("guestcmd verify -dev /mnt/%s -seed %d -off 0 -len %d", f.name, f.seed, f.len))
		v = append(v, fmt.Sprintf("expect_eq 'size of %s' \"$(stat -c %%s /mnt/%s)\" %d", f.name, f.name, f.len))
	}
	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{script: script(
		"/usr/sbin/mke2fs -t ext4 -q -F /dev/vda",
		"mount -t ext4 /dev/vda /mnt",
		"mkdir /mnt/dir",
		strings.Join(w, "\n"),
		"(cd /mnt && sha256sum small dir/big dir/odd) > /tmp/sums",
		"cat /tmp/sums",
		"umount /mnt",
		"/usr/sbin/e2fsck -fn /dev/vda",
		"echo 3 > /proc/sys/vm/drop_caches",
		"mount -t ext4 -o ro /dev/vda /mnt",
		"(cd /mnt && sha256sum -c /tmp/sums)",
		strings.Join(v, "\n"),
		"umount /mnt",
	)})
	b.stop(t)
	e.check(t, img)

	raw := filepath.Join(e.work, "ext4.raw")
	e.run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", img.path, raw)
	e.run(t, "e2fsck", "-fn", raw)
	for _, f := range files {
		out := filepath.Join(e.work, "dump-"+strings.ReplaceAll(f.name, "/", "_"))
		e.run(t, "debugfs", "-R", fmt.Sprintf("dump /%s %s", f.name, out), raw)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatalf("debugfs dump of %s: %v", f.name, err)
		}
		if int64(len(got)) != f.len {
			t.Errorf("host sees /%s with %d bytes, want %d", f.name, len(got), f.len)
			continue
		}
		if i := pattern.Mismatch(got, f.seed, 0); i >= 0 {
			t.Errorf("host sees /%s differ from what the guest wrote at byte %d", f.name, i)
		}
	}
}

// The backend is stopped with SIGTERM after a first guest wrote data, the
// image is checked while closed, and a restarted backend serves a second
// guest that finds the first guest's data and adds its own.
func TestBackendRestartBetweenBootsKeepsData(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "restart.vhdx", 64*mib, 512)
	first := []region{
		{seed: 51, off: 0, len: 2*mib + 4096},
		{seed: 52, off: 40*mib - 512, len: 1024},
	}
	second := []region{
		{seed: 53, off: 2 * mib, len: 4096}, // overwrites the tail of seed 51
		{seed: 54, off: 63 * mib, len: mib},
	}
	want := e.newExpected(t, img)
	for _, r := range append(first, second...) {
		want.write(t, r.seed, r.off, r.len)
	}

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{script: script(writes(mib, first...), verifies(mib, first...))})
	b.stop(t)
	e.check(t, img)

	b = e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot2", vmOpts{script: script(
		verifies(mib, first...),
		writes(mib, second...),
		verifies(mib, second...),
		verifies(mib, region{seed: 51, off: 0, len: 2 * mib}),
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// With --read-only the guest sees a read-only disk: reads return the image's
// data, writes fail, and the image file is left byte-for-byte unchanged.
func TestReadOnlyBackendRefusesWritesAndServesReads(t *testing.T) {
	e := newEnv(t)
	const size = 64 * mib
	data := []region{
		{seed: 61, off: 0, len: 4 * mib},
		{seed: 62, off: 10*mib + 512, len: 5120},
	}
	img := &image{path: filepath.Join(e.work, "ro.vhdx"), size: size, logicalSector: 512}
	want := e.newExpected(t, img)
	for _, r := range data {
		want.write(t, r.seed, r.off, r.len)
	}
	e.run(t, "qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M", want.path, img.path)
	before := fileSum(t, img.path)

	b := e.startBackend(t, img, backendOpts{readOnly: true})
	e.boot(t, b, "boot1", vmOpts{script: script(
		expect("sysfs ro", "$(cat /sys/block/vda/ro)", "1"),
		expect("blockdev --getro", "$(blockdev --getro /dev/vda)", "1"),
		verifies(mib, data...),
		zeroes(20*mib, mib),
		"expect_fail 'O_DIRECT write' "+region{seed: 63, off: 0, len: 4096}.guestWrite("/dev/vda", 4096),
		"expect_fail 'buffered write' dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync",
		verifies(mib, data[0]),
	)})
	b.stop(t)
	if after := fileSum(t, img.path); after != before {
		t.Errorf("read-only serving changed the image file (sha256 %s -> %s)", before, after)
	}
	e.check(t, img)
	e.compare(t, img, want)
}

// A two-vCPU guest with two virtqueues runs one writer pinned to each vCPU
// on separate regions; both request queues complete requests (their
// interrupt counts rise), and all data arrives.
func TestTwoQueuesCarryParallelWriters(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "mq.vhdx", 64*mib, 512)
	a := region{seed: 71, off: 0, len: 24 * mib}
	c := region{seed: 72, off: 32*mib + 512, len: 24 * mib}
	want := e.newExpected(t, img)
	want.write(t, a.seed, a.off, a.len)
	want.write(t, c.seed, c.off, c.len)
	const bs = 128 * 1024

	b := e.startBackend(t, img, backendOpts{numQueues: 2})
	e.boot(t, b, "boot1", vmOpts{cpus: 2, numQueues: 2, script: script(
		expect("hardware queues", "$(ls /sys/block/vda/mq | wc -l)", "2"),
		"i0=$(irqs 0)",
		"i1=$(irqs 1)",
		"taskset -c 0 "+a.guestWrite("/dev/vda", bs)+" & p0=$!",
		"taskset -c 1 "+c.guestWrite("/dev/vda", bs)+" & p1=$!",
		"wait $p0",
		"wait $p1",
		"d0=$(( $(irqs 0) - i0 ))",
		"d1=$(( $(irqs 1) - i1 ))",
		`echo "interrupts during the writes: req.0=$d0 req.1=$d1"`,
		`[ "$d0" -gt 0 ] || fail "queue 0 completed no requests"`,
		`[ "$d1" -gt 0 ] || fail "queue 1 completed no requests"`,
		"taskset -c 1 "+a.guestVerify("/dev/vda", bs)+" & p0=$!",
		"taskset -c 0 "+c.guestVerify("/dev/vda", bs)+" & p1=$!",
		"wait $p0",
		"wait $p1",
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// A VHDX with 4096-byte logical sectors shows up in the guest with
// 4096-byte logical blocks, rejects 512-byte direct I/O in the guest kernel,
// and stores 4096-aligned writes correctly, including across 32 MiB (and so
// any smaller power-of-two block) boundaries.
func TestFourKiBSectorImageHas4096ByteLogicalBlocks(t *testing.T) {
	e := newEnv(t)
	const size = 64 * mib
	var img *image
	opts := backendOpts{}
	if e.backend == backendQSD {
		// QEMU's vhdx driver only creates 512-byte-sector images, so the
		// qemu-storage-daemon run checks the guest side with a 4096-byte
		// export of a 512-byte image.
		t.Log("qsd: 512-byte-sector image exported with logical-block-size=4096")
		img = e.newImage(t, "4k.vhdx", size, 512)
		opts.logicalBlockSize = 4096
	} else {
		img = e.newImage(t, "4k.vhdx", size, 4096)
	}
	rs := []region{
		{seed: 81, off: 0, len: 4096},
		{seed: 82, off: 32*mib - 4096, len: 8192},
		{seed: 83, off: mib - 8192, len: 3*mib + 3*4096},
		{seed: 84, off: size - 4096, len: 4096},
	}
	want := e.newExpected(t, img)
	for _, r := range rs {
		want.write(t, r.seed, r.off, r.len)
	}
	b := e.startBackend(t, img, opts)
	e.boot(t, b, "boot1", vmOpts{script: script(
		expect("logical_block_size", "$(cat /sys/block/vda/queue/logical_block_size)", "4096"),
		expect("blockdev --getss", "$(blockdev --getss /dev/vda)", "4096"),
		expect("size in bytes", "$(blockdev --getsize64 /dev/vda)", strconv.FormatInt(size, 10)),
		"expect_fail '512-byte O_DIRECT write' guestcmd write -dev /dev/vda -seed 9 -off 512 -len 512 -bs 512 -direct",
		writes(mib, rs...),
		verifies(mib, rs...),
		zeroes(8*mib, mib),
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// expect renders a guest expect_eq line.
func expect(what, got, want string) string {
	return fmt.Sprintf("expect_eq %s \"%s\" %s", shellQuote(what), got, shellQuote(want))
}

// BLKZEROOUT over a written range, including two whole 1 MiB blocks, reads
// back as zeroes while the data around it stays; the host image matches.
// The kernel uses WRITE_ZEROES requests when the backend offers them.
func TestZeroOutRangeReadsBackZeroes(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "zero.vhdx", 64*mib, 512)
	data := region{seed: 91, off: 0, len: 8 * mib}
	zoff, zlen := mib-4096, 2*mib+8192
	want := e.newExpected(t, img)
	want.write(t, data.seed, data.off, data.len)
	want.zero(t, zoff, zlen)

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{script: script(
		`echo "write_zeroes_max_bytes=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"`,
		writes(mib, data),
		fmt.Sprintf("guestcmd zeroout -dev /dev/vda -off %d -len %d", zoff, zlen),
		fmt.Sprintf("guestcmd zeroout -dev /dev/vda -off %d -len %d", 20*mib, 2*mib), // never written
		"echo 3 > /proc/sys/vm/drop_caches",
		zeroes(zoff, zlen),
		zeroes(20*mib, 2*mib),
		verifies(mib,
			region{seed: 91, off: 0, len: zoff},
			region{seed: 91, off: zoff + zlen, len: data.len - zoff - zlen}),
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// The --serial string reaches the guest as the virtio-blk device ID.
func TestSerialIsTheGuestDeviceID(t *testing.T) {
	e := newEnv(t)
	if e.backend == backendQSD {
		t.Skip("qemu-storage-daemon's vhost-user-blk export cannot set a serial")
	}
	img := e.newImage(t, "serial.vhdx", 16*mib, 512)
	b := e.startBackend(t, img, backendOpts{serial: "vhdx-test-0001"})
	e.boot(t, b, "boot1", vmOpts{script: expect("serial", "$(cat /sys/block/vda/serial)", "vhdx-test-0001")})
	b.stop(t)
	e.check(t, img)
}

// The backend is stopped with SIGTERM and started again while the guest
// runs; QEMU (chardev reconnect=1) reconnects and the guest's I/O, issued
// only once the new process listens, completes against it. Both phases'
// data is on the disk afterwards.
func TestBackendRestartWhileGuestRunsWithReconnect(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "reconnect.vhdx", 64*mib, 512)
	before := region{seed: 101, off: 0, len: 4*mib + 4096}
	after := region{seed: 102, off: 8*mib - 512, len: 4 * mib}
	want := e.newExpected(t, img)
	want.write(t, before.seed, before.off, before.len)
	want.write(t, after.seed, after.off, after.len)

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{
		reconnect: true,
		control:   true,
		script: script(
			writes(mib, before),
			"echo PHASE1-DONE",
			"wait_host RESTARTED",
			verifies(mib, before),
			writes(mib, after),
			verifies(mib, after),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("PHASE1-DONE")
			b.stop(t)
			t.Log("backend stopped while the guest runs; starting it again")
			b = e.startBackend(t, img, backendOpts{})
			g.send("RESTARTED")
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}

// The backend is killed (SIGKILL, no chance to finish anything) while two
// guest writers keep several requests in flight, and started again. QEMU
// reconnects and restarts the ring at the used index, and a backend that
// offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD also finds in the inflight
// region the requests it had taken but not completed, so nothing is lost
// even if it completed them out of order: the writers finish and every
// byte arrives.
func TestBackendCrashWhileGuestWritesIsRecovered(t *testing.T) {
	e := newEnv(t)
	if e.backend == backendQSD && os.Getenv("VHOST_VHDX_QSD_CRASH") != "1" {
		t.Skip("qemu-storage-daemon offers no INFLIGHT_SHMFD: a request it completed out of order " +
			"before the kill is lost and the guest waits forever (VHOST_VHDX_QSD_CRASH=1 runs it anyway)")
	}
	img := e.newImage(t, "crash.vhdx", 64*mib, 512)
	a := region{seed: 111, off: 512, len: 24 * mib}
	c := region{seed: 112, off: 32 * mib, len: 24*mib - 512}
	want := e.newExpected(t, img)
	want.write(t, a.seed, a.off, a.len)
	want.write(t, c.seed, c.off, c.len)

	b := e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "boot1", vmOpts{
		reconnect: true,
		script: script(
			a.guestWrite("/dev/vda", 256*1024)+" & p0=$!",
			c.guestWrite("/dev/vda", 256*1024)+" & p1=$!",
			"echo WRITERS-STARTED",
			"wait $p0",
			"wait $p1",
			verifies(mib, a, c),
		),
		during: func(g *guestRun) *backend {
			g.waitFor("WRITERS-STARTED")
			b.kill(t)
			t.Log("backend killed while the guest writes; starting it again")
			b = e.startBackend(t, img, backendOpts{})
			return b
		},
	})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
