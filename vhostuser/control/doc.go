// Package control is the daemon's control-socket protocol: QMP-shaped
// JSON, one object per line, on a unix socket. It knows nothing of disks
// or vhost-user; the commands (status, stats, flush, resize, ...) are
// handed in by cmd/vhost-vhdx, which wires them to the image and the
// vhost-user server.
//
// # Wire format
//
//	→ {"execute": "NAME", "arguments": {...}, "id": ANY}
//	← {"return": {...}, "id": ANY}
//	← {"error": {"class": "GenericError"|"CommandNotFound", "desc": "..."}, "id": ANY}
//
// "arguments" and "id" are optional; the id is echoed verbatim. Keys are
// matched exactly and no other key is accepted (ParseRequest). There is no
// greeting and no capabilities negotiation: a client may send a request
// as soon as it connects. query-commands (built in) lists the commands.
// Replies come in request order, one per request; a line that does not
// parse gets an error reply and the connection goes on.
//
// # API
//
//	func ParseRequest(line []byte) (Request, error) // FuzzControlRequest
//	func Listen(path string) (*net.UnixListener, error) // mode 0600 from the start
//	func Serve(ctx context.Context, ln *net.UnixListener, opts Options) error
//	type Command struct{ Name, Args, Help string; Run func(ctx, *Call) (any, error) }
//	func (c *Call) Decode(v any) error // strict: unknown keys, wrong types → ErrInvalidArguments
//	type Error struct{ Class, Desc string } // what a Run error becomes; Errorf
//	type Events interface{ ClientOpened; ClientClosed; Command } // for logging in cmd/
//	func Dial(path string) (*Client, error); (*Client).Call(ctx, name, args, ret)
//
// # Hostile and slow clients
//
// Every client has its own goroutine; commands run on it, so a slow
// command (flush) or a slow client holds up only itself, and nothing here
// touches the disk except through a command. Per client the server holds
// one read buffer of Options.MaxLine bytes (64 KiB by default) and the
// reply being written. A line longer than MaxLine gets an error reply and
// a disconnect, without reading the rest. A client that sends no complete
// line for IdleTimeout (10 minutes; half a request then silence included)
// is told so and disconnected. A reply the client does not read within
// WriteTimeout (5 s) ends the connection. At most MaxClients (16) clients
// are served at once; the next one gets an error reply and a disconnect.
// Server shutdown (ctx) closes the listener, interrupts every client's
// read or write, cancels the ctx of commands in progress and waits for
// the client goroutines.
//
// Who touches what: the accept loop adds clients to the set under mu; a
// client goroutine removes itself under mu when it ends; shutdown walks
// the set under mu to set past deadlines. The command table is built
// before the first accept and only read afterwards.
package control
