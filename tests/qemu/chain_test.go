package qemu_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/tests/qemu/pattern"
)

// A guest served a differencing child (create --parent) over a base that
// holds known data reads the base's data through the child, writes into the
// child at awkward places (single sectors inside blocks the base holds, runs
// across block boundaries, a whole block, the last sector) and reads it all
// back. On the host the chain, read through libvhdi, 7-Zip and our convert,
// equals the expected disk; the base is untouched. After `commit` the base
// alone equals it too (qemu-img compare, for 512-byte sectors), and passes
// qemu-img check and vhost-vhdx check.
func TestGuestWritesIntoAChildOverABaseAndCommitMergesIt(t *testing.T) {
	for _, lss := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("lss%d", lss), func(t *testing.T) {
			e := newEnv(t)
			if e.backend != backendVhostVHDX {
				t.Skip("qemu-storage-daemon cannot open VHDX differencing images")
			}
			const size = 64 * mib
			s := lss
			// The base's data, written through our engine by convert.
			baseRegions := []region{
				{seed: 100, off: 0, len: 3 * mib},
				{seed: 101, off: 10*mib - 4*s, len: 2*mib + 8*s},
				{seed: 102, off: size - mib, len: mib},
			}
			baseRaw := filepath.Join(e.work, "base.raw")
			f, err := os.Create(baseRaw)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			for _, r := range baseRegions {
				buf := make([]byte, r.len)
				pattern.Fill(buf, r.seed, r.off)
				if _, err := f.WriteAt(buf, r.off); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
			base := filepath.Join(e.work, "base.vhdx")
			e.run(t, e.daemon, "convert", "-O", "vhdx", "--block-size", "1M", "--logical-sector", strconv.FormatInt(lss, 10), baseRaw, base)
			baseBefore, err := os.ReadFile(base)
			if err != nil {
				t.Fatal(err)
			}
			child := &image{path: filepath.Join(e.work, "child.avhdx"), size: size, logicalSector: int(lss)}
			e.run(t, e.daemon, "create", "--parent", base, child.path)

			guest := []region{
				{seed: 1, off: s, len: s},                       // one sector inside a block the base holds
				{seed: 2, off: mib - s, len: 2 * s},             // across a block boundary, over base data
				{seed: 3, off: 10*mib + 8*s, len: s},            // a lone sector in the middle of base data
				{seed: 4, off: 20 * mib, len: mib},              // a whole block the base does not hold
				{seed: 5, off: 30*mib + 4096, len: 64*1024 + s}, // odd length inside one empty block
				{seed: 6, off: size - s, len: s},                // the last sector, over base data
			}
			want := e.newExpected(t, child)
			for _, r := range baseRegions {
				want.write(t, r.seed, r.off, r.len)
			}
			for _, r := range guest {
				want.write(t, r.seed, r.off, r.len)
			}
			bs := int64(64 * 1024)
			b := e.startBackend(t, child, backendOpts{})
			e.boot(t, b, "boot1", vmOpts{script: script(
				expect("logical block size", "$(cat /sys/block/vda/queue/logical_block_size)", strconv.FormatInt(lss, 10)),
				// Base data read through the empty child.
				verifies(bs, baseRegions...),
				writes(s, guest...),
				verifies(s, guest...),
				// What the guest did not overwrite still comes from the base.
				verifies(s,
					region{seed: 100, off: 2 * s, len: mib - 3*s},
					region{seed: 100, off: mib + s, len: 2*mib - s},
					region{seed: 101, off: 10 * mib, len: 8 * s},
					region{seed: 101, off: 10*mib + 9*s, len: 2*mib - 5*s},
					region{seed: 102, off: size - mib, len: mib - s},
				),
				zeroes(40*mib, 4*mib),
			)})
			b.stop(t)

			if after, err := os.ReadFile(base); err != nil || string(after) != string(baseBefore) {
				t.Fatalf("serving the child modified the base (%v)", err)
			}
			e.run(t, e.daemon, "check", child.path)
			out := filepath.Join(e.work, "chain.libvhdi.raw")
			e.libvhdiToRaw(t, child.path, out, base)
			sameAsExpected(t, "the chain read by libvhdi", out, want)
			out = filepath.Join(e.work, "chain.7zip.raw")
			e.sevenZipToRaw(t, child.path, out)
			sameAsExpected(t, "the chain read by 7-Zip", out, want)
			out = filepath.Join(e.work, "chain.convert.raw")
			e.run(t, e.daemon, "convert", "-O", "raw", child.path, out)
			sameAsExpected(t, "the chain flattened by vhost-vhdx convert", out, want)

			e.run(t, e.daemon, "commit", child.path)
			baseImg := &image{path: base, size: size, logicalSector: int(lss)}
			e.check(t, baseImg)
			e.compare(t, baseImg, want)
			out = filepath.Join(e.work, "base.libvhdi.raw")
			e.libvhdiToRaw(t, base, out)
			sameAsExpected(t, "the committed base read by libvhdi", out, want)
			// The child still opens over the updated base and reads the same.
			e.run(t, e.daemon, "check", child.path)
			out = filepath.Join(e.work, "chain-after-commit.7zip.raw")
			e.sevenZipToRaw(t, child.path, out)
			sameAsExpected(t, "the chain after commit read by 7-Zip", out, want)
		})
	}
}
