package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for zero Options fields.
const (
	DefaultMaxLine      = 64 << 10
	DefaultIdleTimeout  = 10 * time.Minute
	DefaultWriteTimeout = 5 * time.Second
	DefaultMaxClients   = 16
)

// Peer identifies a client: a connection number and the peer's
// credentials from SO_PEERCRED (-1 when unavailable).
type Peer struct {
	ID  uint64 `json:"id"`
	PID int32  `json:"pid"`
	UID int32  `json:"uid"`
	GID int32  `json:"gid"`
}

// Call is one command invocation.
type Call struct {
	Peer Peer
	// Args is the request's "arguments" object, nil when absent.
	Args json.RawMessage
}

// Decode unmarshals the arguments into v (a pointer to a struct) strictly:
// unknown keys and wrong types are errors wrapping ErrInvalidArguments.
// Absent arguments leave v as it is.
func (c *Call) Decode(v any) error {
	if c.Args == nil {
		return nil
	}
	d := json.NewDecoder(bytes.NewReader(c.Args))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidArguments, err)
	}
	return nil
}

// Command is one command the server executes.
type Command struct {
	Name string
	// Args documents the arguments, e.g. `{"size": "SIZE"}`; "" for none.
	Args string
	Help string
	// Run executes the command. ctx ends when the client disconnects or
	// the server stops. The result is marshalled as the reply's "return";
	// nil becomes {}.
	Run func(ctx context.Context, c *Call) (any, error)
}

// CommandInfo describes a command in the reply of query-commands.
type CommandInfo struct {
	Name string `json:"name"`
	Args string `json:"args,omitempty"`
	Help string `json:"help"`
}

// Events receives what happens on the control socket, for logging. Methods
// are called from client goroutines concurrently.
type Events interface {
	ClientOpened(p Peer)
	// ClientClosed: err nil for an orderly end (EOF or server stop),
	// otherwise why the client was dropped.
	ClientClosed(p Peer, err error)
	// Command: one request handled (name "" for a request that did not
	// parse), with its outcome and how long it ran.
	Command(p Peer, name string, args json.RawMessage, err error, took time.Duration)
}

// Options configure Serve.
type Options struct {
	Commands []Command
	Events   Events // nil: none
	// MaxLine bounds a request line; a longer one gets an error reply and
	// a disconnect. Default DefaultMaxLine.
	MaxLine int
	// IdleTimeout: a client that sends no complete line for this long is
	// disconnected. Default DefaultIdleTimeout.
	IdleTimeout time.Duration
	// WriteTimeout: a client that does not read its reply within this is
	// disconnected. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// MaxClients bounds concurrent clients; one more gets an error reply
	// and a disconnect. Default DefaultMaxClients.
	MaxClients int
}

// Listen creates the control socket at path with mode 0600. It is bound
// under a temporary name in the same directory, chmod-ed, then renamed
// into place, so no client can connect while it has wider permissions.
// A stale socket at path is replaced; any other file there is an error.
func Listen(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSocket == 0 {
		return nil, fmt.Errorf("control: %s exists and is not a socket: %w", path, fs.ErrExist)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("control: %w", err)
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("control: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("control: %w", err)
	}
	return ln, nil
}

type server struct {
	opts     Options
	commands map[string]Command
	list     []CommandInfo

	mu      sync.Mutex
	clients map[*net.UnixConn]struct{}
	nextID  uint64
	wg      sync.WaitGroup
}

// Serve accepts clients on ln until ctx ends, then disconnects every
// client, waits for their goroutines (a command in progress sees its ctx
// cancelled) and closes ln. Each client has its own goroutine, reads its
// requests one line at a time and gets replies in order; clients never
// wait for one another. query-commands is built in.
func Serve(ctx context.Context, ln *net.UnixListener, opts Options) error {
	defer ln.Close()
	s := &server{opts: withDefaults(opts), commands: map[string]Command{}, clients: map[*net.UnixConn]struct{}{}}
	s.add(Command{Name: "query-commands", Help: "list the commands", Run: func(context.Context, *Call) (any, error) {
		return s.list, nil
	}})
	for _, c := range opts.Commands {
		if !validName(c.Name) || c.Run == nil {
			return fmt.Errorf("control: command %q: bad name or no Run", c.Name)
		}
		if _, dup := s.commands[c.Name]; dup {
			return fmt.Errorf("control: command %q defined twice", c.Name)
		}
		s.add(c)
	}
	sort.Slice(s.list, func(i, j int) bool { return s.list[i].Name < s.list[j].Name })

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.clients {
			c.SetDeadline(time.Unix(1, 0))
		}
		s.mu.Unlock()
	})
	defer stop()
	defer s.wg.Wait()
	var backoff time.Duration
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ECONNABORTED) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(backoff):
				}
				continue
			}
			return fmt.Errorf("control: accept: %w", err)
		}
		backoff = 0
		s.mu.Lock()
		if ctx.Err() != nil {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		full := len(s.clients) >= s.opts.MaxClients
		if !full {
			s.clients[c] = struct{}{}
		}
		s.nextID++
		p := peerOf(c, s.nextID)
		s.mu.Unlock()
		s.wg.Add(1)
		if full {
			go s.refuse(c, p)
			continue
		}
		go s.client(ctx, c, p)
	}
}

func withDefaults(o Options) Options {
	if o.MaxLine <= 0 {
		o.MaxLine = DefaultMaxLine
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = DefaultIdleTimeout
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.MaxClients <= 0 {
		o.MaxClients = DefaultMaxClients
	}
	if o.Events == nil {
		o.Events = nopEvents{}
	}
	return o
}

func (s *server) add(c Command) {
	s.commands[c.Name] = c
	s.list = append(s.list, CommandInfo{Name: c.Name, Args: c.Args, Help: c.Help})
}

// peerOf reads SO_PEERCRED; -1 fields when the kernel does not say.
func peerOf(c *net.UnixConn, id uint64) Peer {
	p := Peer{ID: id, PID: -1, UID: -1, GID: -1}
	rc, err := c.SyscallConn()
	if err != nil {
		return p
	}
	_ = rc.Control(func(fd uintptr) {
		if cr, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			p.PID, p.UID, p.GID = cr.Pid, int32(cr.Uid), int32(cr.Gid)
		}
	})
	return p
}

// refuse answers a client over MaxClients with an error and closes it.
func (s *server) refuse(c *net.UnixConn, p Peer) {
	defer s.wg.Done()
	defer c.Close()
	err := fmt.Errorf("control: too many clients (at most %d)", s.opts.MaxClients)
	s.opts.Events.ClientOpened(p)
	c.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
	c.Write(encodeReply(nil, nil, err))
	s.opts.Events.ClientClosed(p, err)
}

// client serves one connection: read a line (bounded by MaxLine, within
// IdleTimeout), execute it, write the reply (within WriteTimeout).
func (s *server) client(ctx context.Context, c *net.UnixConn, p Peer) {
	defer s.wg.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		s.mu.Lock()
		delete(s.clients, c)
		s.mu.Unlock()
		c.Close()
	}()
	s.opts.Events.ClientOpened(p)
	err := s.serveClient(ctx, c, p)
	if ctx.Err() != nil {
		err = nil
	}
	s.opts.Events.ClientClosed(p, err)
}

func (s *server) serveClient(ctx context.Context, c *net.UnixConn, p Peer) error {
	br := bufio.NewReaderSize(c, s.opts.MaxLine)
	reply := func(b []byte) error {
		if err := c.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout)); err != nil {
			return err
		}
		// Shutdown sets a past deadline after cancelling ctx; a deadline
		// set here after that would undo it, so look at ctx after setting.
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if _, err := c.Write(b); err != nil {
			return fmt.Errorf("control: writing the reply: %w", err)
		}
		return nil
	}
	for {
		if err := c.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout)); err != nil {
			return err
		}
		if ctx.Err() != nil { // see reply
			return nil
		}
		line, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			err = fmt.Errorf("%w: more than %d bytes without a newline", ErrLineTooLong, s.opts.MaxLine)
			s.opts.Events.Command(p, "", nil, err, 0)
			reply(encodeReply(nil, nil, err))
			return err
		case errors.Is(err, os.ErrDeadlineExceeded):
			if ctx.Err() != nil {
				return nil
			}
			err = fmt.Errorf("control: idle for %v, disconnecting", s.opts.IdleTimeout)
			reply(encodeReply(nil, nil, err))
			return err
		case err != nil && len(bytes.TrimSpace(line)) > 0:
			return fmt.Errorf("control: connection ended in the middle of a request: %w", err)
		case err != nil:
			return nil // EOF between requests: orderly
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		req, perr := ParseRequest(line)
		if perr != nil {
			s.opts.Events.Command(p, "", nil, perr, 0)
			if err := reply(encodeReply(req.ID, nil, perr)); err != nil {
				return err
			}
			continue
		}
		// The line buffer is reused by the next read: keep copies.
		req.ID = bytes.Clone(req.ID)
		req.Arguments = bytes.Clone(req.Arguments)
		ret, cerr := s.execute(ctx, p, req)
		if err := reply(encodeReply(req.ID, ret, cerr)); err != nil {
			return err
		}
	}
}

func (s *server) execute(ctx context.Context, p Peer, req Request) (any, error) {
	cmd, ok := s.commands[req.Execute]
	if !ok {
		err := Errorf(ClassCommandNotFound, "the command %s has not been found", req.Execute)
		s.opts.Events.Command(p, req.Execute, req.Arguments, err, 0)
		return nil, err
	}
	start := time.Now()
	ret, err := cmd.Run(ctx, &Call{Peer: p, Args: req.Arguments})
	s.opts.Events.Command(p, req.Execute, req.Arguments, err, time.Since(start))
	return ret, err
}

type nopEvents struct{}

func (nopEvents) ClientOpened(Peer)                                           {}
func (nopEvents) ClientClosed(Peer, error)                                    {}
func (nopEvents) Command(Peer, string, json.RawMessage, error, time.Duration) {}
