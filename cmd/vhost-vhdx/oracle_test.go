package main

// The command tests read their (small) images back through libvhdi and
// 7-Zip with vhdxtest.ReadWithLibvhdi and vhdxtest.ReadWith7zip, whole
// disks into memory, and compare with sameBytes. Without the tools a test
// skips, unless VHOST_VHDX_REQUIRE_TOOLS is set (make test), when it fails.

import (
	"fmt"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
)

// sameBytes fails the test at the first byte where got differs from want.
func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if i := vhdxtest.FirstDiff(got, want); i >= 0 {
		g, w := "EOF", "EOF"
		if i < len(got) {
			g = fmt.Sprintf("%#x", got[i])
		}
		if i < len(want) {
			w = fmt.Sprintf("%#x", want[i])
		}
		t.Fatalf("%s: byte %#x is %s, want %s (lengths %d and %d)", what, i, g, w, len(got), len(want))
	}
}
