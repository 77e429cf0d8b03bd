package vhostuser_test

import (
	"context"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend/hostile"
)

// The suite `vhost-vhdx bench --hostile` runs against a live daemon, run
// here against the server: every case gets the outcome the spec requires
// and the server serves a normal connection after each.
func TestHostileSuitePassesAndServerServesAfterEachCase(t *testing.T) {
	s := startServer(t, 1)
	if n := len(hostile.Cases()); n < 20 {
		t.Fatalf("suite has %d cases, want at least 20", n)
	}
	ran := 0
	failed := hostile.Run(context.Background(), s.path, func(name string, err error) {
		ran++
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
	})
	if failed != 0 || ran != len(hostile.Cases()) {
		t.Errorf("%d of %d cases failed, %d reported", failed, len(hostile.Cases()), ran)
	}
}
