package qemu_test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// hostAllocated is what the image file occupies on the host (st_blocks).
func hostAllocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Size
}

// infoAllocation runs `vhost-vhdx info --json` and returns the bytes in
// allocated blocks and the bytes the file occupies on the host.
func (e *env) infoAllocation(t *testing.T, img *image) (blocks, host int64) {
	t.Helper()
	var in struct {
		Allocated int64 `json:"allocated_bytes"`
		Host      int64 `json:"host_allocated_bytes"`
	}
	out := e.run(t, e.daemon, "info", "--json", img.path)
	if err := json.Unmarshal([]byte(out), &in); err != nil {
		t.Fatalf("info --json: %v\n%s", err, out)
	}
	return in.Allocated, in.Host
}

// A guest fills an ext4 file system with 200 MiB of files and deletes them;
// fstrim gives at least 90 % of the space they took on the host back. Then
// blkdiscard of the whole disk leaves (nearly) nothing allocated and reads
// back zeros, and BLKZEROOUT (what blkdiscard -z does) over written data
// reads back zeros while the data around it stays. qemu-img check accepts
// the image after each step; the file system passes e2fsck; qemu-img
// compare finds the disk equal to the expected contents once it is known.
func TestGuestFstrimGivesSpaceBackToTheHost(t *testing.T) {
	e := newEnv(t)
	if e.backend != backendVhostVHDX {
		t.Skip("discard is a vhost-vhdx feature; QEMU's vhdx driver ignores it")
	}
	const size = 512 * mib
	img := e.newImage(t, "trim.vhdx", size, 512)
	const files, fileLen = 10, 20 * mib
	var w []string
	for i := 0; i < files; i++ {
		w = append(w, fmt.Sprintf("guestcmd write -create -dev /mnt/f%d -seed %d -off 0 -len %d", i, 100+i, fileLen))
	}

	// Step 1: files written and synced.
	b := e.startBackend(t, img, backendOpts{})
	console := e.boot(t, b, "fill", vmOpts{script: script(
		`echo "discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)"`,
		`echo "discard_granularity=$(cat /sys/block/vda/queue/discard_granularity)"`,
		`echo "max_discard_segments=$(cat /sys/block/vda/queue/max_discard_segments)"`,
		"/usr/sbin/mke2fs -t ext4 -q -F -E nodiscard /dev/vda",
		"mount -t ext4 /dev/vda /mnt",
		strings.Join(w, "\n"),
		"sync",
		"umount /mnt",
	)})
	b.stop(t)
	var geo struct {
		Physical int `json:"physical_sector_size"`
	}
	if err := json.Unmarshal([]byte(e.run(t, e.daemon, "info", "--json", img.path)), &geo); err != nil {
		t.Fatal(err)
	}
	if got := consoleValue(t, console, "discard_granularity"); got != fmt.Sprint(geo.Physical) {
		t.Errorf("guest discard_granularity = %s, want %d (the physical sector)", got, geo.Physical)
	}
	if got := consoleValue(t, console, "max_discard_segments"); got == "1" {
		t.Errorf("guest max_discard_segments = 1; want multi-segment discards")
	}
	e.check(t, img)
	filled := hostAllocated(t, img.path)
	sizeFilled := fileSize(t, img.path)

	// Step 2: files deleted, fstrim.
	b = e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "trim", vmOpts{script: script(
		"mount -t ext4 /dev/vda /mnt",
		"rm /mnt/f*",
		"sync",
		"fstrim -v /mnt",
		"umount /mnt",
		"/usr/sbin/e2fsck -fn /dev/vda",
	)})
	b.stop(t)
	e.check(t, img)
	trimmed := hostAllocated(t, img.path)
	t.Logf("host allocation: %d bytes with the files, %d after fstrim", filled, trimmed)
	if drop, want := filled-trimmed, int64(files*fileLen)*9/10; drop < want {
		t.Fatalf("fstrim gave back %d bytes on the host; want at least %d (90%% of the %d bytes of files)", drop, want, files*fileLen)
	}
	if sz := fileSize(t, img.path); sz >= sizeFilled {
		t.Errorf("file size %d after fstrim; want the free tail cut off (was %d)", sz, sizeFilled)
	}
	raw := filepath.Join(e.work, "trim.raw")
	e.run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", img.path, raw)
	e.run(t, "e2fsck", "-fn", raw)

	// Step 3: blkdiscard of the whole disk reads zeros and leaves nothing
	// allocated; the disk then equals an all-zero one.
	b = e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "blkdiscard", vmOpts{script: script(
		"blkdiscard /dev/vda",
		"echo 3 > /proc/sys/vm/drop_caches",
		zeroes(0, size),
	)})
	b.stop(t)
	e.check(t, img)
	want := e.newExpected(t, img)
	e.compare(t, img, want)
	blocks, host := e.infoAllocation(t, img)
	t.Logf("after blkdiscard: info reports %d bytes in blocks, %d on the host", blocks, host)
	if blocks != 0 || host > 8*mib {
		t.Fatalf("after blkdiscard of the whole disk info reports %d bytes in blocks and %d on the host; want 0 and only metadata", blocks, host)
	}

	// Step 4: BLKZEROOUT over written data, within and across blocks.
	data := region{seed: 7, off: 0, len: 8 * mib}
	zoff, zlen := int64(mib-4096), int64(2*mib+8192)
	want.write(t, data.seed, data.off, data.len)
	want.zero(t, zoff, zlen)
	b = e.startBackend(t, img, backendOpts{})
	e.boot(t, b, "zeroout", vmOpts{script: script(
		writes(mib, data),
		fmt.Sprintf("guestcmd zeroout -dev /dev/vda -off %d -len %d", zoff, zlen),
		"echo 3 > /proc/sys/vm/drop_caches",
		zeroes(zoff, zlen),
		verifies(mib,
			region{seed: data.seed, off: 0, len: zoff},
			region{seed: data.seed, off: zoff + zlen, len: data.len - zoff - zlen}),
	)})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
