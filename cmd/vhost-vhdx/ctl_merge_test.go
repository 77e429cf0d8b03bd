package main

import (
	"reflect"
	"strings"
	"testing"
)

// --rate becomes merge's "rate" argument (as does a bare RATE); --rate and
// --wait with another command are usage errors, found before any dial.
func TestCtlRateAndWaitBelongToMerge(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
		rate string
		want map[string]any
	}{
		{"merge", nil, "50M", map[string]any{"rate": "50M"}},
		{"merge", []string{"8M"}, "", map[string]any{"rate": "8M"}},
		{"merge", nil, "", nil},
	} {
		a, err := ctlArguments(c.name, c.args)
		if err == nil {
			a, err = mergeFlags(c.name, a, c.rate, false)
		}
		if err != nil || !reflect.DeepEqual(a, c.want) {
			t.Errorf("%s %v --rate %q: %v, %v; want %v", c.name, c.args, c.rate, a, err, c.want)
		}
	}
	for _, args := range [][]string{{"status", "--rate", "1M"}, {"flush", "--wait"}} {
		code, _, stderr := runCLI(t, append([]string{"ctl", "/nonexistent.sock"}, args...)...)
		if code != 2 || !strings.Contains(stderr, "merge only") {
			t.Errorf("ctl %v: exit %d, %q; want a usage error", args, code, stderr)
		}
	}
}
