package control

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// Client is a control-socket client: one request at a time, replies
// matched by id. Safe for concurrent use (calls are serialised).
type Client struct {
	mu   sync.Mutex
	c    *net.UnixConn
	r    *bufio.Reader
	next uint64
}

// Dial connects to the control socket at path.
func Dial(path string) (*Client, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	return &Client{c: c, r: bufio.NewReaderSize(c, 1<<20)}, nil
}

// Close closes the connection.
func (cl *Client) Close() error { return cl.c.Close() }

// Call executes name with args (nil, or a value marshalling to a JSON
// object) and unmarshals the reply's "return" into ret (nil: discard). An
// error reply is returned as an *Error. ctx bounds the whole exchange.
func (cl *Client) Call(ctx context.Context, name string, args, ret any) error {
	raw, err := cl.CallRaw(ctx, name, args)
	if err != nil {
		return err
	}
	if ret == nil {
		return nil
	}
	if err := json.Unmarshal(raw, ret); err != nil {
		return fmt.Errorf("control: %s: decoding the reply: %w", name, err)
	}
	return nil
}

// CallRaw is Call returning the raw "return" value.
func (cl *Client) CallRaw(ctx context.Context, name string, args any) (json.RawMessage, error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.next++
	id := cl.next
	req := map[string]any{"execute": name, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("control: %s: %w", name, err)
	}
	if err := cl.c.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("control: %s: %w", name, err)
	}
	stop := context.AfterFunc(ctx, func() { cl.c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := cl.c.Write(append(b, '\n')); err != nil {
		cl.c.Close() // a partly written request: the connection is out of step
		return nil, ctxErr(ctx, fmt.Errorf("control: %s: %w", name, err))
	}
	for {
		line, err := cl.r.ReadBytes('\n')
		if err != nil {
			cl.c.Close()
			return nil, ctxErr(ctx, fmt.Errorf("control: %s: reading the reply: %w", name, err))
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *Error          `json:"error"`
			ID     json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("control: %s: bad reply %q: %w", name, truncate(string(line), 200), err)
		}
		if string(resp.ID) != strconv.FormatUint(id, 10) {
			if resp.ID == nil && resp.Error != nil {
				return nil, resp.Error // the server dropped us (too many clients, idle)
			}
			continue // a reply to an earlier request whose caller gave up
		}
		if resp.Error != nil {
			return nil, resp.Error
		}
		return resp.Return, nil
	}
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return err
}
