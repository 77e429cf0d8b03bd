package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder collects Events.
type recorder struct {
	mu     sync.Mutex
	closed []error
	cmds   []string
	closeC chan error
}

func newRecorder() *recorder { return &recorder{closeC: make(chan error, 1000)} }

func (r *recorder) ClientOpened(Peer) {}
func (r *recorder) ClientClosed(p Peer, err error) {
	r.mu.Lock()
	r.closed = append(r.closed, err)
	r.mu.Unlock()
	r.closeC <- err
}
func (r *recorder) Command(p Peer, name string, args json.RawMessage, err error, took time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := "ok"
	if err != nil {
		out = err.Error()
	}
	r.cmds = append(r.cmds, name+": "+out)
}

type testServer struct {
	path string
	rec  *recorder
	stop func()
	done chan error
}

// block is a command that waits until its ctx ends or release is closed.
var release = make(chan struct{})

func testCommands() []Command {
	return []Command{
		{Name: "echo", Args: `{"text": "STRING", "n": "INT"}`, Help: "echo the arguments", Run: func(ctx context.Context, c *Call) (any, error) {
			var a struct {
				Text string `json:"text"`
				N    int    `json:"n"`
			}
			if err := c.Decode(&a); err != nil {
				return nil, err
			}
			return a, nil
		}},
		{Name: "fail", Help: "always fails", Run: func(ctx context.Context, c *Call) (any, error) {
			return nil, errors.New("it failed")
		}},
		{Name: "wait", Help: "waits for its ctx", Run: func(ctx context.Context, c *Call) (any, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}},
	}
}

func startServer(t *testing.T, o Options) *testServer {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	if o.Commands == nil {
		o.Commands = testCommands()
	}
	o.Events = rec
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{path: path, rec: rec, stop: cancel, done: make(chan error, 1)}
	go func() { ts.done <- Serve(ctx, ln, o) }()
	t.Cleanup(func() {
		cancel()
		if err := <-ts.done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func dialRaw(t *testing.T, path string) (*net.UnixConn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
}

func roundTrip(t *testing.T, c *net.UnixConn, r *bufio.Reader, line string) reply {
	t.Helper()
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		t.Fatal(err)
	}
	return readReply(t, r)
}

func readReply(t *testing.T, r *bufio.Reader) reply {
	t.Helper()
	b, err := r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading reply: %v (got %q)", err, b)
	}
	var rp reply
	if err := json.Unmarshal(b, &rp); err != nil {
		t.Fatalf("reply %q: %v", b, err)
	}
	return rp
}

func TestMalformedRequestsGetAnErrorAndTheConnectionGoesOn(t *testing.T) {
	ts := startServer(t, Options{})
	c, r := dialRaw(t, ts.path)
	cases := []struct {
		name, line, class, want string
	}{
		{"garbage", `xyzzy`, ClassGeneric, "one JSON object"},
		{"truncated JSON", `{"execute": "echo"`, ClassGeneric, "not valid JSON"},
		{"array", `[1,2]`, ClassGeneric, "one JSON object"},
		{"two objects", `{"execute":"echo"} {"execute":"echo"}`, ClassGeneric, "not valid JSON"},
		{"missing execute", `{"arguments": {}}`, ClassGeneric, "missing"},
		{"execute not a string", `{"execute": 42}`, ClassGeneric, "must be a string"},
		{"bad command name", `{"execute": "a b\u0000"}`, ClassGeneric, "command name"},
		{"arguments not an object", `{"execute": "echo", "arguments": [1]}`, ClassGeneric, "must be an object"},
		{"unexpected key", `{"execute": "echo", "Execute": "x"}`, ClassGeneric, "unexpected key"},
		{"unknown command", `{"execute": "no-such-thing"}`, ClassCommandNotFound, "no-such-thing"},
		{"wrong argument type", `{"execute": "echo", "arguments": {"n": "seven"}}`, ClassGeneric, "invalid arguments"},
		{"unknown argument", `{"execute": "echo", "arguments": {"m": 7}}`, ClassGeneric, "invalid arguments"},
		{"command error", `{"execute": "fail"}`, ClassGeneric, "it failed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rp := roundTrip(t, c, r, tc.line)
			if rp.Error == nil || rp.Return != nil {
				t.Fatalf("reply %+v, want an error", rp)
			}
			if rp.Error.Class != tc.class || !strings.Contains(rp.Error.Desc, tc.want) {
				t.Errorf("error %+v, want class %s and %q", rp.Error, tc.class, tc.want)
			}
		})
	}
	// Still serving on the same connection, id echoed verbatim.
	rp := roundTrip(t, c, r, `{"execute": "echo", "arguments": {"text": "hi", "n": 3}, "id": {"x": [1, "two"]}}`)
	if rp.Error != nil || string(rp.Return) != `{"text":"hi","n":3}` || string(rp.ID) != `{"x":[1,"two"]}` {
		t.Errorf("reply %+v after the malformed requests", rp)
	}
}

func TestOversizeLineGetsAnErrorAndADisconnectWhileOthersAreServed(t *testing.T) {
	ts := startServer(t, Options{MaxLine: 4096})
	c, r := dialRaw(t, ts.path)
	// A client that would send 1 GiB without a newline: the server reads
	// at most MaxLine of it.
	go func() {
		chunk := []byte(strings.Repeat("a", 1<<16))
		for i := 0; i < 1<<14; i++ {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	b, err := r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("no error reply before the disconnect: %v", err)
	}
	var rp reply
	if err := json.Unmarshal(b, &rp); err != nil || rp.Error == nil || !strings.Contains(rp.Error.Desc, "too long") {
		t.Fatalf("reply %q (%v), want a line-too-long error", b, err)
	}
	if err := <-ts.rec.closeC; !errors.Is(err, ErrLineTooLong) {
		t.Errorf("client closed with %v, want ErrLineTooLong", err)
	}
	cl, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var got struct{ Text string }
	if err := cl.Call(context.Background(), "echo", map[string]any{"text": "still here"}, &got); err != nil || got.Text != "still here" {
		t.Errorf("second client: %v %+v", err, got)
	}
}

func TestIdleClientWithHalfARequestIsDisconnected(t *testing.T) {
	ts := startServer(t, Options{IdleTimeout: 50 * time.Millisecond})
	c, r := dialRaw(t, ts.path)
	// On a loaded machine the server may time out before this write; the
	// error reply is waiting for the read either way.
	_, _ = c.Write([]byte(`{"execute": "ec`))
	rp := readReply(t, r)
	if rp.Error == nil || !strings.Contains(rp.Error.Desc, "idle") {
		t.Errorf("reply %+v, want an idle error", rp)
	}
	if _, err := r.ReadByte(); err != io.EOF {
		t.Errorf("after the idle error: %v, want EOF", err)
	}
}

func TestClientThatNeverReadsIsDisconnectedAndOthersAreServed(t *testing.T) {
	ts := startServer(t, Options{WriteTimeout: 20 * time.Millisecond})
	c, _ := dialRaw(t, ts.path)
	c.SetWriteBuffer(4096)
	// Requests whose replies are large fill the socket buffers: the
	// server's write blocks, its deadline passes, it drops the client.
	big := strings.Repeat("x", 8000)
	req := []byte(`{"execute": "echo", "arguments": {"text": "` + big + `"}}` + "\n")
	go func() {
		for {
			if _, err := c.Write(req); err != nil {
				return
			}
		}
	}()
	err := <-ts.rec.closeC
	if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("non-reading client closed with %v, want a write deadline error", err)
	}
	cl, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Call(context.Background(), "echo", nil, nil); err != nil {
		t.Errorf("another client after the dropped one: %v", err)
	}
}

func TestManyClientsAreServedAtOnceAndOneTooManyIsRefused(t *testing.T) {
	const n = 8
	ts := startServer(t, Options{MaxClients: n})
	// n clients each park a "wait" command, so all n are connected at once.
	var conns []*net.UnixConn
	var readers []*bufio.Reader
	for i := 0; i < n; i++ {
		c, r := dialRaw(t, ts.path)
		if _, err := c.Write([]byte(`{"execute": "echo", "id": 1}` + "\n")); err != nil {
			t.Fatal(err)
		}
		readReply(t, r) // accepted and served
		conns, readers = append(conns, c), append(readers, r)
	}
	c, r := dialRaw(t, ts.path)
	rp := readReply(t, r)
	if rp.Error == nil || !strings.Contains(rp.Error.Desc, "too many clients") {
		t.Errorf("client %d got %+v, want too many clients", n+1, rp)
	}
	c.Close()
	<-ts.rec.closeC
	// Every one of the n is still served, concurrently.
	var wg sync.WaitGroup
	for i := range conns {
		wg.Add(1)
		go func(c *net.UnixConn, r *bufio.Reader, i int) {
			defer wg.Done()
			for k := 0; k < 20; k++ {
				if _, err := c.Write([]byte(`{"execute": "echo", "arguments": {"n": 5}, "id": "k"}` + "\n")); err != nil {
					t.Error(err)
					return
				}
				b, err := r.ReadBytes('\n')
				if err != nil || !strings.Contains(string(b), `"n":5`) {
					t.Errorf("client %d: %q %v", i, b, err)
					return
				}
			}
		}(conns[i], readers[i], i)
	}
	wg.Wait()
}

func TestSocketIsCreatedMode0600(t *testing.T) {
	ts := startServer(t, Options{})
	fi, err := os.Stat(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if entries, _ := os.ReadDir(filepath.Dir(ts.path)); len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the socket", len(entries))
	}
}

func TestListenRefusesToReplaceARegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(path, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(path); string(b) != "keep" {
		t.Error("file changed")
	}
}

func TestShutdownCancelsRunningCommandsAndDisconnects(t *testing.T) {
	ts := startServer(t, Options{})
	cl, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	errc := make(chan error, 1)
	go func() { errc <- cl.Call(context.Background(), "wait", nil, nil) }()
	// Wait until the command is running: the next client's query sees it
	// only through Events, so poll the recorder via a second round trip.
	cl2, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl2.Close()
	if err := cl2.Call(context.Background(), "echo", nil, nil); err != nil {
		t.Fatal(err)
	}
	ts.stop()
	if err := <-ts.done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	ts.done <- nil // for Cleanup
	if err := <-errc; err == nil {
		t.Error("wait returned success after shutdown")
	}
}

func TestQueryCommandsListsEveryCommand(t *testing.T) {
	ts := startServer(t, Options{})
	cl, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var list []CommandInfo
	if err := cl.Call(context.Background(), "query-commands", nil, &list); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range list {
		names = append(names, c.Name)
	}
	if got := strings.Join(names, ","); got != "echo,fail,query-commands,wait" {
		t.Errorf("commands %s", got)
	}
	var e *Error
	if err := cl.Call(context.Background(), "nope", nil, nil); !errors.As(err, &e) || e.Class != ClassCommandNotFound {
		t.Errorf("unknown command through Client: %v", err)
	}
}

func TestPeerCredentialsAreTheClientProcess(t *testing.T) {
	var got Peer
	var mu sync.Mutex
	cmds := []Command{{Name: "who", Run: func(ctx context.Context, c *Call) (any, error) {
		mu.Lock()
		got = c.Peer
		mu.Unlock()
		return nil, nil
	}}}
	ts := startServer(t, Options{Commands: cmds})
	cl, err := Dial(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Call(context.Background(), "who", nil, nil); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got.PID != int32(os.Getpid()) || got.UID != int32(os.Getuid()) {
		t.Errorf("peer %+v, want pid %d uid %d", got, os.Getpid(), os.Getuid())
	}
}
