package vhdx

// External oracles: libvhdi and 7-Zip read VHDX images with code this
// project did not write, so a misreading of the spec that our reader and
// writer share shows up as a difference. Running them, and the rule for a
// missing tool (skip, or fail under VHOST_VHDX_REQUIRE_TOOLS), is in
// vhdxtest; here they are compared with an *Image.

import (
	"bytes"
	"io"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// oraclesReadWhole streams the whole virtual disk from libvhdi and from
// 7-Zip and compares each byte with what im reads.
func oraclesReadWhole(t testing.TB, im *Image, path string, parents ...string) {
	t.Helper()
	libvhdiReadsWhole(t, im, path, parents...)
	sevenZipReadsWhole(t, im, path)
}

func libvhdiReadsWhole(t testing.TB, im *Image, path string, parents ...string) {
	t.Helper()
	if got := vhdxtest.LibvhdiSize(t, path); got != im.Size() {
		t.Fatalf("libvhdi reports a %d-byte disk, we %d", got, im.Size())
	}
	vhdxtest.Stream(t, vhdxtest.LibvhdiCommand(t, path, parents, nil), func(r io.Reader) {
		vhdxtest.StreamEquals(t, "libvhdi", r, im, "read", 0, im.Size())
	})
}

// sevenZipReadsWhole: 7-Zip finds the parents of a differencing image by
// itself, through the parent locator.
func sevenZipReadsWhole(t testing.TB, im *Image, path string) {
	t.Helper()
	vhdxtest.SevenZipEquals(t, path, im, "read", im.Size())
}

// libvhdiReadsSpans compares each span as libvhdi reads it with im and with
// want (the model of the disk: want(off, n) returns the expected bytes).
func libvhdiReadsSpans(t testing.TB, im *Image, path string, parents []string, spans []vhdxtest.Span, want func(off, n int64) []byte) {
	t.Helper()
	theirs := vhdxtest.ReadSpansWithLibvhdi(t, path, parents, spans)
	for i, s := range spans {
		ours := make([]byte, s.N)
		if _, err := im.ReadAt(ours, s.Off); err != nil {
			t.Fatalf("ReadAt(%#x, %d): %v", s.Off, s.N, err)
		}
		if j := vhdxtest.FirstDiff(ours, theirs[i]); j >= 0 {
			t.Fatalf("virtual byte %#x: we read %#x, libvhdi reads %#x", s.Off+int64(j), ours[j], theirs[i][j])
		}
		if w := want(s.Off, s.N); !bytes.Equal(ours, w) {
			j := vhdxtest.FirstDiff(ours, w)
			t.Fatalf("virtual byte %#x: we and libvhdi read %#x, the test wrote %#x", s.Off+int64(j), ours[j], w[j])
		}
	}
}
