package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// resize grows the served image while a front-end is connected: the
// front-end is told with CONFIG_CHANGE_MSG, re-reads the capacity (GET_CONFIG,
// answered while the daemon waits for the ack) and finds the new size,
// writes past the old end succeed, the data before it is intact, and the
// image reopens at the new size.
func TestResizeGrowsTheDiskUnderAFrontEndAndTellsIt(t *testing.T) {
	ld := startLiveDaemon(t, 2)
	f := ld.frontEnd(t, 2)
	if err := f.SetBackendReqFD(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r, err := f.Queues[0].Write(ctx, 0, fill4K('a'))
	mustOK(t, r, err)
	const oldSize, newSize = 64 << 20, 64<<20 + 100<<20
	if r, err := f.Queues[1].Write(ctx, oldSize/512, fill4K('x')); err != nil || r.Status != blk.StatusIOErr {
		t.Fatalf("write past the end before the resize: %+v %v", r, err)
	}

	type result struct {
		rep ResizeReply
		err error
	}
	done := make(chan result, 1)
	go func() {
		cl, err := control.Dial(ld.ctl)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer cl.Close()
		var rep ResizeReply
		err = cl.Call(ctx, "resize", map[string]any{"size": "+100M"}, &rep)
		done <- result{rep, err}
	}()
	h, _, err := f.ReadBackendRequest()
	if err != nil {
		t.Fatal(err)
	}
	if h.Request != vhostuser.Request(vhostuser.BackendConfigChangeMsg) {
		t.Fatalf("back-end request %d, want CONFIG_CHANGE_MSG", h.Request)
	}
	cfg, err := f.GetConfig(0, 8)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(cfg); got != newSize/512 {
		t.Errorf("capacity after CONFIG_CHANGE_MSG %d sectors, want %d", got, newSize/512)
	}
	if err := f.AckBackendRequest(h, 0); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.rep.OldSize != oldSize || res.rep.NewSize != newSize || !res.rep.Notified {
		t.Errorf("resize reply %+v", res.rep)
	}
	// The new end is usable, the old data is there.
	for q, sector := range []uint64{oldSize / 512, newSize/512 - 8} {
		r, err := f.Queues[q].Write(ctx, sector, fill4K('n'))
		mustOK(t, r, err)
		if got := readBack(t, f.Queues[q], sector); !bytes.Equal(got, fill4K('n')) {
			t.Errorf("sector %d past the old end reads %q...", sector, got[:4])
		}
	}
	if got := readBack(t, f.Queues[0], 0); !bytes.Equal(got, fill4K('a')) {
		t.Error("data before the resize changed")
	}
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if st.VirtualSize != newSize {
		t.Errorf("status virtual size %d, want %d", st.VirtualSize, newSize)
	}
	// Shrinking is refused and changes nothing.
	code, _, stderr := runCLI(t, "ctl", ld.ctl, "resize", "64M")
	if code != exitFailure || !strings.Contains(stderr, "smaller") {
		t.Errorf("shrink: %d %q", code, stderr)
	}
	ld.stop()
	im, err := vhdx.Open(ld.imgPath, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Size() != newSize || !bytes.Equal(readFile(t, im, newSize-4096), fill4K('n')) {
		t.Errorf("reopened image: size %d, last 4K not as written", im.Size())
	}
}

// Without a connected front-end the image grows and the reply says the
// next front-end reads the new capacity; a differencing top (after a
// checkpoint) cannot grow and keeps serving.
func TestResizeWithoutAFrontEndAndOnADifferencingTop(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	var rep ResizeReply
	ld.call(t, "resize", map[string]any{"size": 96 << 20}, &rep)
	if rep.NewSize != 96<<20 || rep.Notified || !strings.Contains(rep.Note, "next connects") {
		t.Errorf("resize without a front-end: %+v", rep)
	}
	f := ld.frontEnd(t, 1)
	if cfg, err := f.GetConfig(0, 8); err != nil || binary.LittleEndian.Uint64(cfg) != 96<<20/512 {
		t.Errorf("a new front-end reads capacity %v (%v)", cfg, err)
	}
	ld.call(t, "checkpoint", map[string]any{"path": ld.imgPath + ".cp"}, nil)
	cl, err := control.Dial(ld.ctl)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Call(context.Background(), "resize", map[string]any{"size": "+1M"}, nil); err == nil || !strings.Contains(err.Error(), "still serving") {
		t.Errorf("resize of a differencing top: %v", err)
	}
	r, err := f.Queues[0].Write(context.Background(), 8, fill4K('d'))
	mustOK(t, r, err)
}
