package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// liveDaemon is serve's wiring run in the test process: an image served
// over vhost-user with a control socket, and its log.
type liveDaemon struct {
	d       *daemon
	vhost   string
	ctl     string
	imgPath string
	log     *syncBuffer
	stop    func()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startLiveDaemon(t *testing.T, numQueues int) *liveDaemon {
	t.Helper()
	return startLiveDaemonIn(t, t.TempDir(), numQueues, blk.NoSpaceReport)
}

// startLiveDaemonIn is startLiveDaemon with the image in dir and the
// out-of-space policy p (serve --on-enospc).
func startLiveDaemonIn(t *testing.T, dir string, numQueues int, p blk.NoSpacePolicy) *liveDaemon {
	t.Helper()
	img := filepath.Join(dir, "disk.vhdx")
	if err := vhdx.Create(img, vhdx.CreateOptions{Size: 64 << 20, BlockSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := vhdx.Open(img, vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ld := &liveDaemon{d: newDaemon(im, false, numQueues), vhost: filepath.Join(dir, "vhost.sock"), ctl: filepath.Join(dir, "ctl.sock"), imgPath: img, log: new(syncBuffer)}
	logger := logrus.New()
	logger.SetOutput(ld.log)
	logger.SetLevel(logrus.DebugLevel)
	entry := logger.WithField("image", img)
	ld.d.nospace = blk.NewNoSpace(p, logNoSpace(entry))
	ln, err := vhostuser.Listen(ld.vhost)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := startControl(ctx, ld.ctl, ld.d, entry)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.Serve(ctx, ln, ld.d.vhostOptions(blk.Options{Serial: "ctl-test"}, numQueues, newLogEvents(entry)))
	}()
	var once sync.Once
	ld.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
			wait()
			if err := ld.d.image().Close(); err != nil { // the top after any checkpoint
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(ld.stop)
	return ld
}

func (ld *liveDaemon) frontEnd(t *testing.T, queues int) *frontend.Frontend {
	t.Helper()
	f, err := frontend.Dial(ld.vhost)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Setup(frontend.Options{NumQueues: queues, MemSize: 4 << 20, QueueSize: 32, MaxIO: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (ld *liveDaemon) call(t *testing.T, name string, args, ret any) {
	t.Helper()
	cl, err := control.Dial(ld.ctl)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Call(context.Background(), name, args, ret); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func mustOK(t *testing.T, r frontend.BlkResult, err error) {
	t.Helper()
	if err != nil || r.Status != blk.StatusOK {
		t.Fatalf("request: status %d, %v", r.Status, err)
	}
}

// After known I/O from a front-end, status shows the connection, its
// features and queues and the image, and stats count exactly that I/O per
// queue and in total, with the image's allocations and journal commits.
func TestStatusAndStatsReportKnownFrontEndIO(t *testing.T) {
	ld := startLiveDaemon(t, 4)
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if st.FrontEnd.Connected || st.VirtualSize != 64<<20 || st.ReadOnly || len(st.Chain) != 1 || st.Chain[0].Path != ld.imgPath {
		t.Fatalf("status before a front-end: %+v", st)
	}

	f := ld.frontEnd(t, 2)
	ctx := context.Background()
	data := bytes.Repeat([]byte{0xab}, 4096)
	for _, mib := range []uint64{0, 1, 2} { // three 1 MiB blocks allocated
		r, err := f.Queues[0].Write(ctx, mib<<20/512, data)
		mustOK(t, r, err)
	}
	for i := 0; i < 2; i++ {
		r, err := f.Queues[1].Read(ctx, 0, 512)
		mustOK(t, r, err)
	}
	r, err := f.Queues[1].Flush(ctx)
	mustOK(t, r, err)
	if r, err := f.Queues[1].Read(ctx, 1<<40, 512); err != nil || r.Status != blk.StatusIOErr {
		t.Fatalf("read past the end: %+v %v", r, err)
	}

	ld.call(t, "status", nil, &st)
	fe := st.FrontEnd
	if !fe.Connected || len(fe.Queues) != 2 || !fe.Queues[0].Started || !fe.Queues[1].Enabled {
		t.Errorf("front-end status %+v", fe)
	}
	if !slices.Contains(fe.FeatureNames, "VERSION_1") || !slices.Contains(fe.ProtocolNames, "BACKEND_REQ") {
		t.Errorf("negotiated %v / %v", fe.FeatureNames, fe.ProtocolNames)
	}
	if st.Chain[0].AllocatedBytes != 3<<20 {
		t.Errorf("allocated %d bytes, want 3 MiB", st.Chain[0].AllocatedBytes)
	}
	if h := st.HostIOErrors; h == nil || h.Episodes != 0 || h.Open || h.PayloadLost || h.JournalOffline {
		t.Errorf("host I/O errors %+v, want reported with no episode", h)
	}

	var s StatsReply
	ld.call(t, "stats", nil, &s)
	if len(s.Queues) != 2 || s.Queues[0].Queue != 0 || s.Queues[1].Queue != 1 {
		t.Fatalf("stats queues %+v", s.Queues)
	}
	check := func(where string, got blk.OpSnapshot, ops, bytes, errs uint64) {
		t.Helper()
		if got.Ops != ops || got.Bytes != bytes || got.Errors != errs {
			t.Errorf("%s: ops %d bytes %d errors %d, want %d %d %d", where, got.Ops, got.Bytes, got.Errors, ops, bytes, errs)
		}
		if ops > 0 && (got.P50 == 0 || got.P50 > got.P99 || got.P99 > got.Max) {
			t.Errorf("%s: percentiles %d %d %d", where, got.P50, got.P99, got.Max)
		}
	}
	check("queue 0 write", s.Queues[0].Ops["write"], 3, 3*4096, 0)
	check("queue 1 read", s.Queues[1].Ops["read"], 3, 1024, 1)
	check("queue 1 flush", s.Queues[1].Ops["flush"], 1, 0, 0)
	check("total write", s.Total.Ops["write"], 3, 3*4096, 0)
	check("total read", s.Total.Ops["read"], 3, 1024, 1)
	if s.Total.Flushes != 1 || s.Image.Allocations != 3 || s.Image.JournalCommits < 3 {
		t.Errorf("flushes %d, allocations %d, journal commits %d", s.Total.Flushes, s.Image.Allocations, s.Image.JournalCommits)
	}

	// The command-line client prints the same.
	code, out, stderr := runCLI(t, "ctl", ld.ctl, "stats")
	if code != 0 || !strings.Contains(out, "write") || !strings.Contains(out, "total") || !strings.Contains(out, "blocks allocated 3") {
		t.Errorf("ctl stats: %d %q %q", code, out, stderr)
	}
	code, out, stderr = runCLI(t, "ctl", ld.ctl, "status")
	if code != 0 || !strings.Contains(out, "connected (connection") || !strings.Contains(out, "2 started [0 1]") {
		t.Errorf("ctl status: %d %q %q", code, out, stderr)
	}
	code, out, _ = runCLI(t, "ctl", ld.ctl, "help")
	for _, c := range []string{"status", "stats", "flush", "resize", "help"} {
		if code != 0 || !strings.Contains(out, c) {
			t.Errorf("ctl help lacks %s: %q", c, out)
		}
	}
	code, out, _ = runCLI(t, "ctl", ld.ctl, "stats", "--watch", "--interval", "10ms", "--count", "2")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); code != 0 || len(lines) != 3 {
		t.Errorf("stats --watch --count 2: %d, %q", code, out)
	}
}

// flush returns after the image is durable; the command and its client
// (pid, uid) are in the log.
func TestFlushCommandIsLoggedWithItsClient(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	f := ld.frontEnd(t, 1)
	r, err := f.Queues[0].Write(context.Background(), 0, make([]byte, 4096))
	mustOK(t, r, err)
	code, out, stderr := runCLI(t, "ctl", ld.ctl, "flush")
	if code != 0 || !strings.HasPrefix(out, "flushed in") {
		t.Fatalf("ctl flush: %d %q %q", code, out, stderr)
	}
	code, _, stderr = runCLI(t, "ctl", ld.ctl, "resize", "1M")
	if code != exitFailure || !strings.Contains(stderr, "smaller") {
		t.Errorf("shrinking resize: %d %q", code, stderr)
	}
	log := ld.log.String()
	for _, want := range []string{`command=flush`, `msg="control command"`, `command=resize`, `msg="control command failed"`, "pid=", "uid="} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
}

// Hostile control clients — a 1 GiB line, half a request then silence, a
// client that never reads its replies, garbage — do not stop the disk:
// the front-end's I/O completes and another client is served meanwhile.
func TestHostileControlClientsNeitherBlockTheDiskNorOtherClients(t *testing.T) {
	ld := startLiveDaemon(t, 1)
	f := ld.frontEnd(t, 1)
	dial := func() *net.UnixConn {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ld.ctl, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	var wg sync.WaitGroup
	huge := dial()
	wg.Add(1)
	go func() { // 1 GiB without a newline, until the server hangs up
		defer wg.Done()
		chunk := bytes.Repeat([]byte("x"), 1<<20)
		for i := 0; i < 1024; i++ {
			if _, err := huge.Write(chunk); err != nil {
				return
			}
		}
	}()
	half := dial()
	if _, err := half.Write([]byte(`{"execute": "sta`)); err != nil {
		t.Fatal(err)
	}
	deaf := dial()
	deaf.SetWriteBuffer(4096)
	wg.Add(1)
	go func() { // asks for stats forever, reads nothing
		defer wg.Done()
		req := []byte(`{"execute": "stats"}` + "\n")
		for {
			if _, err := deaf.Write(req); err != nil {
				return
			}
		}
	}()
	garbage := dial()
	if _, err := garbage.Write([]byte("\x00\xff{{{\n")); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	for i := 0; i < 50; i++ {
		r, err := f.Queues[0].Write(ctx, uint64(i*8), bytes.Repeat([]byte{byte(i)}, 4096))
		mustOK(t, r, err)
		r, err = f.Queues[0].Read(ctx, uint64(i*8), 4096)
		mustOK(t, r, err)
	}
	var st StatusReply
	ld.call(t, "status", nil, &st)
	if !st.FrontEnd.Connected {
		t.Error("status while hostile clients hang on")
	}
	// The garbage client got an error reply and is still connected.
	line := make([]byte, 512)
	n, err := garbage.Read(line)
	if err != nil || !strings.Contains(string(line[:n]), "GenericError") {
		t.Errorf("garbage client got %q, %v", line[:n], err)
	}
	// The huge-line client was cut off after an error.
	b, _ := io.ReadAll(huge)
	if !strings.Contains(string(b), "too long") {
		t.Errorf("huge-line client got %q", b)
	}
	// Shutting down releases the half-request and deaf clients.
	ld.stop()
	wg.Wait()
	if b, _ := io.ReadAll(half); len(b) != 0 && !strings.Contains(string(b), "error") {
		t.Errorf("half-request client got %q", b)
	}
}
