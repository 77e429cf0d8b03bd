package main

import (
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

func TestRequestFailureLogIsRateLimitedAndCountsWhatItDrops(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLogLimiter(3, time.Second)
	l.now = func() time.Time { return now }
	for i := range 3 {
		if ok, dropped := l.allow(); !ok || dropped != 0 {
			t.Fatalf("event %d in the burst: allow = %v, %d", i, ok, dropped)
		}
	}
	for i := range 5 {
		if ok, _ := l.allow(); ok {
			t.Fatalf("event %d past the burst was allowed", i)
		}
	}
	now = now.Add(time.Second)
	if ok, dropped := l.allow(); !ok || dropped != 5 {
		t.Fatalf("first event of the next interval: allow = %v, dropped %d, want true, 5", ok, dropped)
	}
	if ok, dropped := l.allow(); !ok || dropped != 0 {
		t.Fatalf("second event: allow = %v, dropped %d, want true, 0", ok, dropped)
	}
}

func TestServeFlagsRefuseBadCombinations(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"no image", []string{"--socket", "/tmp/x.sock"}},
		{"no socket", []string{"disk.vhdx"}},
		{"socket and fd", []string{"--socket", "/tmp/x.sock", "--fd", "3", "disk.vhdx"}},
		{"image twice", []string{"--socket", "/tmp/x.sock", "--blk-file", "a.vhdx", "b.vhdx"}},
		{"zero queues", []string{"--socket", "/tmp/x.sock", "--num-queues", "0", "disk.vhdx"}},
		{"too many queues", []string{"--socket", "/tmp/x.sock", "--num-queues", "257", "disk.vhdx"}},
		{"serial too long", []string{"--socket", "/tmp/x.sock", "--serial", "123456789012345678901", "disk.vhdx"}},
		{"bad log level", []string{"--socket", "/tmp/x.sock", "--log-level", "loud", "disk.vhdx"}},
		{"bad out-of-space policy", []string{"--socket", "/tmp/x.sock", "--on-enospc", "stop", "disk.vhdx"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, append([]string{"serve"}, tc.args...)...)
			if code != exitUsage {
				t.Fatalf("status %d, want %d (usage); stderr %q", code, exitUsage, stderr)
			}
		})
	}
}

// Without --num-queues the daemon offers as many queues as a vhost-user
// front-end can address, so QEMU's default of one queue per vCPU works.
func TestServeOffersEveryAddressableQueueByDefault(t *testing.T) {
	cfg, err := parseServeFlags([]string{"--socket", "/tmp/x.sock", "d.vhdx"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.numQueues != vhostuser.MaxQueues {
		t.Fatalf("default --num-queues %d, want %d", cfg.numQueues, vhostuser.MaxQueues)
	}
}

func TestServeAcceptsSocketAliasAndBlkFile(t *testing.T) {
	cfg, err := parseServeFlags([]string{"--socket", "/tmp/x.sock", "--blk-file", "d.vhdx", "--num-queues", "2", "--read-only"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.socketPath != "/tmp/x.sock" || cfg.image != "d.vhdx" || cfg.numQueues != 2 || !cfg.readOnly {
		t.Fatalf("parsed %+v", cfg)
	}
}

func TestServeTakesSeveralSocketPathsButNotOneTwice(t *testing.T) {
	cfg, err := parseServeFlags([]string{"--socket-path", "/tmp/a.sock", "--socket-path", "/tmp/b.sock", "d.vhdx"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.socketPath != "/tmp/a.sock" || len(cfg.socketPaths) != 2 || cfg.socketPaths[1] != "/tmp/b.sock" {
		t.Fatalf("parsed %q %q", cfg.socketPath, cfg.socketPaths)
	}
	if _, err := parseServeFlags([]string{"--socket-path", "/tmp/a.sock", "--socket", "/tmp/a.sock", "d.vhdx"}, nil); err == nil {
		t.Fatal("the same socket path twice accepted")
	}
	if _, err := parseServeFlags([]string{"--socket-path", "/tmp/a.sock", "--fd", "3", "d.vhdx"}, nil); err == nil {
		t.Fatal("--socket-path with --fd accepted")
	}
}
