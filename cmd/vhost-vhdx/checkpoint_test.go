package main

import (
	"bytes"
	"context"
	"errors"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx/vhdxtest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

func fill4K(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

func readBack(t *testing.T, q *frontend.Queue, sector uint64) []byte {
	t.Helper()
	r, err := q.Read(context.Background(), sector, 4096)
	mustOK(t, r, err)
	return r.Data
}

func readFile(t *testing.T, im *vhdx.Image, off int64) []byte {
	t.Helper()
	b := make([]byte, 4096)
	if _, err := im.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// queueWrite is a 4 KiB write of byte b at sector on queue q.
type queueWrite struct {
	q      int
	sector uint64
	b      byte
}

// writeFilled runs each write on its queue, one after the other, and
// fails unless each completes OK.
func writeFilled(t *testing.T, f *frontend.Frontend, writes ...queueWrite) {
	t.Helper()
	for _, w := range writes {
		r, err := f.Queues[w.q].Write(context.Background(), w.sector, fill4K(w.b))
		mustOK(t, r, err)
	}
}

// A checkpoint switches every write to a new child at one instant while
// the front-end runs: what was written before stays in the old top, which
// is now read-only and reads as it was at the checkpoint; what is written
// after goes to the child; the front-end reads the union, and the chain
// opens on its own after the daemon stops.
func TestCheckpointSwitchesWritesToANewChildAndFreezesTheOldTop(t *testing.T) {
	ld := startLiveDaemon(t, 2)
	f := ld.frontEnd(t, 2)
	ctx := context.Background()
	const s0, s1, s4 = 0, (1 << 20) / 512, (4 << 20) / 512
	writeFilled(t, f, queueWrite{0, s0, 'A'}, queueWrite{1, s1, 'B'})

	dir := filepath.Dir(ld.imgPath)
	cp1 := filepath.Join(dir, "cp1.vhdx")
	var rep CheckpointReply
	ld.call(t, "checkpoint", map[string]any{"path": cp1}, &rep)
	if rep.Top != cp1 || rep.Parent != ld.imgPath || rep.Depth != 1 {
		t.Fatalf("checkpoint reply %+v", rep)
	}
	writeFilled(t, f, queueWrite{1, s0, 'C'}, queueWrite{0, s4, 'D'})
	for _, c := range []struct {
		sector uint64
		want   byte
	}{{s0, 'C'}, {s1, 'B'}, {s4, 'D'}} {
		if got := readBack(t, f.Queues[0], c.sector); !bytes.Equal(got, fill4K(c.want)) {
			t.Errorf("front-end reads %q... at sector %d, want %c", got[:4], c.sector, c.want)
		}
	}

	// The old top is consistent and frozen: it opens read-only beside the
	// running daemon and reads what was written before the checkpoint.
	old, err := vhdx.Open(ld.imgPath, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("old top while the daemon runs: %v", err)
	}
	if !bytes.Equal(readFile(t, old, 0), fill4K('A')) || !bytes.Equal(readFile(t, old, 4<<20), make([]byte, 4096)) {
		t.Error("old top does not read as it was at the checkpoint")
	}
	old.Close()

	var st StatusReply
	ld.call(t, "status", nil, &st)
	if len(st.Chain) != 2 || st.Chain[0].Path != cp1 || st.Chain[1].Path != ld.imgPath || st.Chain[0].Type != "differencing" {
		t.Errorf("status chain %+v", st.Chain)
	}

	// A second checkpoint stacks another layer; the CLI takes a relative
	// path and sends it absolute.
	wd, _ := os.Getwd()
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runCLI(t, "ctl", ld.ctl, "checkpoint", "cp2.vhdx")
	os.Chdir(wd)
	if code != 0 || !strings.Contains(out, filepath.Join(dir, "cp2.vhdx")) {
		t.Fatalf("ctl checkpoint: %d %q %q", code, out, stderr)
	}
	r, err := f.Queues[0].Write(ctx, s1, fill4K('E'))
	mustOK(t, r, err)

	ld.stop()
	cp2 := filepath.Join(dir, "cp2.vhdx")
	top, err := vhdx.Open(cp2, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("chain after the daemon stopped: %v", err)
	}
	defer top.Close()
	if top.Depth() != 2 {
		t.Errorf("chain depth %d, want 2", top.Depth())
	}
	for _, c := range []struct {
		off  int64
		want byte
	}{{0, 'C'}, {1 << 20, 'E'}, {4 << 20, 'D'}} {
		if got := readFile(t, top, c.off); !bytes.Equal(got, fill4K(c.want)) {
			t.Errorf("chain reads %q... at %d, want %c", got[:4], c.off, c.want)
		}
	}
	// Other readers of the format read the chain written live the same.
	want := make([]byte, top.Size())
	if _, err := top.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	t.Run("libvhdi", func(t *testing.T) {
		sameBytes(t, "libvhdi reading the live checkpoint chain", vhdxtest.ReadWithLibvhdi(t, cp2, cp1, ld.imgPath), want)
	})
	t.Run("7-Zip", func(t *testing.T) {
		sameBytes(t, "7-Zip reading the live checkpoint chain", vhdxtest.ReadWith7zip(t, cp2), want)
	})
}

// A checkpoint that cannot be made (the file exists, a relative path, a
// directory that does not exist) changes nothing: the daemon keeps
// serving the same top, writes land there.
func TestFailedCheckpointKeepsServingTheSameTop(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	f := ld.frontEnd(t, 1)
	dir := filepath.Dir(ld.imgPath)
	exists := filepath.Join(dir, "exists.vhdx")
	if err := os.WriteFile(exists, []byte("not mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	cl, err := control.Dial(ld.ctl)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for _, path := range []string{exists, "relative.vhdx", filepath.Join(dir, "no-such-dir", "cp.vhdx")} {
		var e *control.Error
		if err := cl.Call(context.Background(), "checkpoint", map[string]any{"path": path}, nil); !errors.As(err, &e) {
			t.Errorf("checkpoint %s: %v, want an error reply", path, err)
		}
		r, err := f.Queues[0].Write(context.Background(), 0, fill4K('Z'))
		mustOK(t, r, err)
	}
	if b, _ := os.ReadFile(exists); string(b) != "not mine" {
		t.Error("checkpoint overwrote an existing file")
	}
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if len(st.Chain) != 1 || st.Chain[0].Path != ld.imgPath {
		t.Errorf("chain after failed checkpoints: %+v", st.Chain)
	}
	if got := readBack(t, f.Queues[0], 0); !bytes.Equal(got, fill4K('Z')) {
		t.Error("writes after a failed checkpoint are lost")
	}
}

// Checkpoints taken while two queues write without pause lose nothing:
// afterwards every sector reads as the last write acknowledged for it,
// through the daemon and through the chain opened after it stopped.
func TestCheckpointsDuringContinuousWritesLoseNoAcknowledgedWrite(t *testing.T) {
	ld := startLiveDaemon(t, 2)
	f := ld.frontEnd(t, 2)
	ctx := context.Background()
	const perQueue = 48 // sectors each queue cycles over, 4 KiB apart, spread over blocks
	last := make([][perQueue]uint32, 2)
	stop := make(chan struct{})
	errc := make(chan error, 2)
	sectorOf := func(q, i int) uint64 { return uint64(q*perQueue+i) * (1 << 20) / 512 / 2 }
	for q := 0; q < 2; q++ {
		go func(q int) {
			buf := make([]byte, 4096)
			for seq := uint32(1); ; seq++ {
				select {
				case <-stop:
					errc <- nil
					return
				default:
				}
				i := int(seq) % perQueue
				for k := range buf {
					buf[k] = byte(seq >> (8 * (k % 4)))
				}
				r, err := f.Queues[q].Write(ctx, sectorOf(q, i), buf)
				if err != nil || r.Status != 0 {
					errc <- errors.New("write failed")
					return
				}
				last[q][i] = seq
			}
		}(q)
	}
	dir := filepath.Dir(ld.imgPath)
	var top string
	for n := 1; n <= 5; n++ {
		top = filepath.Join(dir, "cp"+string(rune('0'+n))+".vhdx")
		var rep CheckpointReply
		ld.call(t, "checkpoint", map[string]any{"path": top}, &rep)
		if rep.Depth != n {
			t.Fatalf("checkpoint %d: depth %d", n, rep.Depth)
		}
	}
	close(stop)
	for q := 0; q < 2; q++ {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	want := func(seq uint32) []byte {
		b := make([]byte, 4096)
		if seq == 0 {
			return b
		}
		for k := range b {
			b[k] = byte(seq >> (8 * (k % 4)))
		}
		return b
	}
	written := 0
	for q := 0; q < 2; q++ {
		for i := 0; i < perQueue; i++ {
			if got := readBack(t, f.Queues[q], sectorOf(q, i)); !bytes.Equal(got, want(last[q][i])) {
				t.Errorf("queue %d sector %d reads %x..., want write %d", q, sectorOf(q, i), got[:4], last[q][i])
			}
			if last[q][i] != 0 {
				written++
			}
		}
	}
	if written == 0 {
		t.Fatal("no write was acknowledged")
	}
	ld.stop()
	im, err := vhdx.Open(top, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for q := 0; q < 2; q++ {
		for i := 0; i < perQueue; i++ {
			if got := readFile(t, im, int64(sectorOf(q, i))*512); !bytes.Equal(got, want(last[q][i])) {
				t.Errorf("chain: queue %d sector %d reads %x..., want write %d", q, sectorOf(q, i), got[:4], last[q][i])
			}
		}
	}
}
