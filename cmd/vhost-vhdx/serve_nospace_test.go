package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// fullDiskDaemon serves an image on a small real tmpfs with policy p,
// writes before to sector 0 while there is space, then fills the file
// system with a filler file it returns.
func fullDiskDaemon(t *testing.T, p blk.NoSpacePolicy, before []byte) (*liveDaemon, *frontend.Frontend, string) {
	t.Helper()
	dir := vhdxtest.SmallFS(t, 16<<20)
	ld := startLiveDaemonIn(t, dir, 1, p)
	f := ld.frontEnd(t, 1)
	r, err := f.Queues[0].Write(context.Background(), 0, before)
	mustOK(t, r, err)
	filler := filepath.Join(dir, "filler")
	vhdxtest.FillUp(t, filler)
	return ld, f, filler
}

func readBackSectors(t *testing.T, f *frontend.Frontend, sector uint64, want []byte, what string) {
	t.Helper()
	r, err := f.Queues[0].Read(context.Background(), sector, len(want))
	mustOK(t, r, err)
	if !bytes.Equal(r.Data[:len(want)], want) {
		t.Fatalf("%s does not read back", what)
	}
}

// newBlockSector is a sector in a block the first write did not allocate:
// writing it needs a fresh 1 MiB block of host space.
const newBlockSector = 8 << 20 / 512

func TestFullHostDiskWithReportFailsTheWriteAndTheSameWriteSucceedsOnceSpaceIsFreed(t *testing.T) {
	before := bytes.Repeat([]byte{0x5a}, 64<<10)
	ld, f, filler := fullDiskDaemon(t, blk.NoSpaceReport, before)
	data := bytes.Repeat([]byte{0xc3}, 64<<10)
	r, err := f.Queues[0].Write(context.Background(), newBlockSector, data)
	if err != nil || r.Status != blk.StatusIOErr {
		t.Fatalf("write to a full host disk: status %d, %v; want IOERR", r.Status, err)
	}
	readBackSectors(t, f, 0, before, "the write acknowledged before the disk filled")
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if st.ENOSPC.Policy != "report" || st.ENOSPC.Reported != 1 || st.ENOSPC.Waiting != 0 {
		t.Errorf("status enospc %+v, want policy report, 1 reported", st.ENOSPC)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	r, err = f.Queues[0].Write(context.Background(), newBlockSector, data)
	mustOK(t, r, err)
	readBackSectors(t, f, newBlockSector, data, "the write once space was freed")
}

// TestFullHostDiskWithWaitHoldsTheWriteUntilSpaceIsFreed: with --on-enospc
// wait the write that finds the host disk full does not complete; status
// shows it waiting since a time, in episode 1; once the filler is removed
// it completes OK (no restart) and reads back, and the log has exactly one
// "full" and one "space is back" line.
func TestFullHostDiskWithWaitHoldsTheWriteUntilSpaceIsFreed(t *testing.T) {
	before := bytes.Repeat([]byte{0x5a}, 64<<10)
	ld, f, filler := fullDiskDaemon(t, blk.NoSpaceWait, before)
	data := bytes.Repeat([]byte{0xc3}, 64<<10)
	type result struct {
		r   frontend.BlkResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := f.Queues[0].Write(context.Background(), newBlockSector, data)
		done <- result{r, err}
	}()
	var st StatusReply
	deadline := time.Now().Add(30 * time.Second)
	for ld.call(t, "status", nil, &st); st.ENOSPC.Waiting != 1; ld.call(t, "status", nil, &st) {
		select {
		case res := <-done:
			t.Fatalf("the write completed (status %d, %v) while the host disk is full", res.r.Status, res.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no request waiting after 30 s: status enospc %+v", st.ENOSPC)
		}
		time.Sleep(10 * time.Millisecond) // polling the daemon's state, not timing it
	}
	if st.ENOSPC.Policy != "wait" || st.ENOSPC.Since == nil || st.ENOSPC.Episodes != 1 {
		t.Errorf("status enospc while held %+v, want policy wait, a start time, episode 1", st.ENOSPC)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	select {
	case res := <-done:
		mustOK(t, res.r, res.err)
	case <-time.After(30 * time.Second):
		t.Fatal("the held write did not complete within 30 s of freeing space")
	}
	readBackSectors(t, f, newBlockSector, data, "the held write")
	readBackSectors(t, f, 0, before, "the write acknowledged before the disk filled")
	st = StatusReply{}
	ld.call(t, "status", nil, &st)
	if st.ENOSPC.Waiting != 0 || st.ENOSPC.Since != nil || st.ENOSPC.Episodes != 1 || st.ENOSPC.Held != 1 {
		t.Errorf("status enospc after %+v, want nothing waiting, 1 episode, 1 held", st.ENOSPC)
	}
	log := ld.log.String()
	if strings.Count(log, "host file system full") != 1 || strings.Count(log, "host space is back") != 1 {
		t.Errorf("log has %d 'full' and %d 'space is back' lines, want one each:\n%s",
			strings.Count(log, "host file system full"), strings.Count(log, "host space is back"), log)
	}
}

func TestStatusLineSaysWhetherWritesWaitForHostSpace(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 30, 0, time.UTC)
	since := now.Add(-30 * time.Second)
	tests := []struct {
		s    blk.NoSpaceSnapshot
		want string
	}{
		{blk.NoSpaceSnapshot{Policy: "report"}, "--on-enospc report"},
		{blk.NoSpaceSnapshot{Policy: "report", Reported: 3}, "--on-enospc report; 0 full-disk episodes held 0 writes, 3 writes failed for lack of space"},
		{blk.NoSpaceSnapshot{Policy: "wait", Waiting: 2, Since: &since, Episodes: 4, Held: 9},
			"--on-enospc wait, FULL: 2 writes waiting since 2026-12-01T12:00:00Z (30s); 4 full-disk episodes held 9 writes, 0 writes failed for lack of space"},
	}
	for _, tt := range tests {
		if got := formatNoSpace(tt.s, now); got != tt.want {
			t.Errorf("formatNoSpace(%+v) =\n %q, want\n %q", tt.s, got, tt.want)
		}
	}
}

// TestDaemonStopsWhileAWriteIsHeldForSpace: stopping the daemon (SIGTERM
// cancels the same context) while a write waits for host space ends the
// wait at once: Serve returns, the image closes clean (the held write was
// never acknowledged), and the log says the write was abandoned.
func TestDaemonStopsWhileAWriteIsHeldForSpace(t *testing.T) {
	ld, f, _ := fullDiskDaemon(t, blk.NoSpaceWait, bytes.Repeat([]byte{0x5a}, 4096))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // the front-end's wait for a completion that never comes
	go f.Queues[0].Write(ctx, newBlockSector, bytes.Repeat([]byte{0xc3}, 4096))
	var st StatusReply
	deadline := time.Now().Add(30 * time.Second)
	for ld.call(t, "status", nil, &st); st.ENOSPC.Waiting != 1; ld.call(t, "status", nil, &st) {
		if time.Now().After(deadline) {
			t.Fatalf("no request waiting after 30 s: status enospc %+v", st.ENOSPC)
		}
		time.Sleep(10 * time.Millisecond) // polling the daemon's state, not timing it
	}
	stopped := make(chan struct{})
	go func() { ld.stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not stop within 30 s while a write was held for space")
	}
	if log := ld.log.String(); !strings.Contains(log, "held writes abandoned") {
		t.Errorf("the log does not say the held write was abandoned:\n%s", log)
	}
	rep, err := vhdx.Check(ld.imgPath, false)
	if err != nil || rep.Damaged() {
		t.Fatalf("check after stopping: %v, %+v", err, rep)
	}
}
