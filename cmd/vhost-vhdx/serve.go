package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// maxQueues bounds --num-queues and is its default: the most queues a
// vhost-user front-end can address (vhostuser.MaxQueues). QEMU asks for one
// queue per vCPU unless num-queues is set; offering many costs nothing
// until the front-end starts a queue, which is when its worker goroutine
// starts.
const maxQueues = vhostuser.MaxQueues

// capabilities is what --print-capabilities prints, per the vhost-user
// "Backend program conventions" (type "block", the optional features we
// support).
const capabilities = `{"type":"block","features":["read-only","blk-file"]}`

const serveUsage = `Usage: vhost-vhdx serve [--socket-path PATH | --fd N] [--read-only]
                        [--num-queues N] [--serial S] [--log-level L]
                        [--control-socket PATH] IMAGE
       vhost-vhdx serve --print-capabilities

Serve IMAGE to one vhost-user front-end (QEMU) at a time. When a front-end
disconnects the daemon listens again, so QEMU's reconnect=1 works. SIGINT or
SIGTERM stops accepting, finishes in-flight requests, flushes and closes the
image cleanly.

Options:
  --socket-path PATH    create and listen on this unix socket (alias: --socket)
  --fd N                serve on an inherited listening socket instead
  --blk-file IMAGE      the image (instead of the IMAGE argument)
  --read-only           open the image read-only; the guest sees a read-only disk
  --num-queues N        most request queues offered (default and maximum 256);
                        QEMU uses one per vCPU unless num-queues= is set, and
                        a worker runs only for each queue QEMU starts
  --serial S            GET_ID serial, at most 20 bytes (default: from the
                        image's Virtual Disk ID)
  --log-level L         debug, info, warn or error (default info)
  --control-socket PATH a unix socket (mode 0600) for live operations:
                        status, stats, flush, resize, checkpoint
                        (see 'vhost-vhdx ctl')
  --print-capabilities  print the vhost-user backend capabilities JSON and exit
`

type serveConfig struct {
	socketPath string
	fd         int
	readOnly   bool
	numQueues  int
	serial     string
	logLevel   string
	image      string
	printCaps  bool
	control    string
}

func parseServeFlags(args []string, stdout io.Writer) (serveConfig, error) {
	cfg := serveConfig{fd: -1}
	fs := newFlagSet("serve")
	fs.StringVar(&cfg.socketPath, "socket-path", "", "")
	fs.StringVar(&cfg.socketPath, "socket", "", "")
	fs.IntVar(&cfg.fd, "fd", -1, "")
	fs.StringVar(&cfg.image, "blk-file", "", "")
	fs.BoolVar(&cfg.readOnly, "read-only", false, "")
	fs.IntVar(&cfg.numQueues, "num-queues", maxQueues, "")
	fs.StringVar(&cfg.serial, "serial", "", "")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "")
	fs.BoolVar(&cfg.printCaps, "print-capabilities", false, "")
	fs.StringVar(&cfg.control, "control-socket", "", "")
	pos, err := parseArgs(fs, args, serveUsage, stdout, 0, 1)
	if err != nil {
		return cfg, err
	}
	if cfg.printCaps {
		return cfg, nil
	}
	switch {
	case len(pos) == 1 && cfg.image == "":
		cfg.image = pos[0]
	case len(pos) == 0 && cfg.image != "":
	default:
		return cfg, usagef("serve", "give the image either as IMAGE or as --blk-file, exactly once")
	}
	if (cfg.socketPath == "") == (cfg.fd < 0) {
		return cfg, usagef("serve", "give exactly one of --socket-path and --fd")
	}
	if cfg.numQueues < 1 || cfg.numQueues > maxQueues {
		return cfg, usagef("serve", "--num-queues %d out of range 1..%d", cfg.numQueues, maxQueues)
	}
	if len(cfg.serial) > 20 {
		return cfg, usagef("serve", "--serial %q is longer than the 20 bytes virtio-blk GET_ID returns", cfg.serial)
	}
	if _, err := logrus.ParseLevel(cfg.logLevel); err != nil {
		return cfg, usagef("serve", "--log-level: %v", err)
	}
	return cfg, nil
}

// defaultSerial derives a stable 20-character serial from the image's
// Virtual Disk ID (the page 83 identifier, MS-VHDX §2.6.2.3), so the guest
// sees the same /dev/disk/by-id name across restarts.
func defaultSerial(im *vhdx.Image) string {
	id := im.DiskID()
	return strings.ToUpper(hex.EncodeToString(id[:10]))
}

func runServe(args []string, stdout, stderr io.Writer) error {
	cfg, err := parseServeFlags(args, stdout)
	if err != nil {
		return err
	}
	if cfg.printCaps {
		fmt.Fprintln(stdout, capabilities)
		return nil
	}
	log := logrus.New()
	log.SetOutput(stderr)
	level, _ := logrus.ParseLevel(cfg.logLevel) // validated by parseServeFlags
	log.SetLevel(level)

	im, err := vhdx.Open(cfg.image, vhdx.OpenOptions{ReadOnly: cfg.readOnly})
	if err != nil {
		return fmt.Errorf("serve %s: %w", cfg.image, err)
	}
	serial := cfg.serial
	if serial == "" {
		serial = defaultSerial(im)
	}

	var ln *net.UnixListener
	if cfg.fd >= 0 {
		ln, err = vhostuser.FromFD(cfg.fd)
	} else {
		ln, err = vhostuser.Listen(cfg.socketPath)
	}
	if err != nil {
		im.Close()
		return fmt.Errorf("serve: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	entry := log.WithFields(logrus.Fields{"image": cfg.image})
	entry.WithFields(logrus.Fields{
		"socket":       ln.Addr().String(),
		"virtual_size": im.Size(),
		"read_only":    cfg.readOnly,
		"num_queues":   cfg.numQueues,
		"serial":       serial,
	}).Info("serving VHDX image over vhost-user-blk")

	d := newDaemon(im, cfg.readOnly, cfg.numQueues)
	ctlCtx, ctlStop := context.WithCancel(ctx)
	defer ctlStop()
	ctlWait := func() {}
	if cfg.control != "" {
		if ctlWait, err = startControl(ctlCtx, cfg.control, d, entry); err != nil {
			ln.Close()
			im.Close()
			return fmt.Errorf("serve: %w", err)
		}
	}
	serveErr := vhostuser.Serve(ctx, ln, d.vhostOptions(blk.Options{Serial: serial}, cfg.numQueues, newLogEvents(entry)))
	// Control commands use the image: they stop before it closes.
	ctlStop()
	ctlWait()
	if cfg.socketPath != "" {
		os.Remove(cfg.socketPath)
	}
	closeErr := d.image().Close() // the top after any checkpoint
	if serveErr != nil && !errors.Is(serveErr, context.Canceled) {
		return fmt.Errorf("serve: %w", serveErr)
	}
	if closeErr != nil {
		return fmt.Errorf("serve: closing %s: %w", cfg.image, closeErr)
	}
	entry.Info("stopped; image flushed and closed")
	return nil
}

var _ vhostuser.RecoveryEvents = logEvents{}
var _ vhostuser.CacheEvents = logEvents{}

// logEvents turns vhostuser's events into log lines with connection and
// queue fields; it is the only place the daemon's data path logs.
type logEvents struct {
	log     *logrus.Entry
	limiter *logLimiter
}

func newLogEvents(log *logrus.Entry) logEvents {
	return logEvents{log: log, limiter: newLogLimiter(requestLogBurst, time.Second)}
}

func (e logEvents) ConnOpened(id uint64) {
	e.log.WithField("conn", id).Info("front-end connected")
}

func (e logEvents) ConnClosed(id uint64, err error) {
	l := e.log.WithField("conn", id)
	if err != nil {
		l.WithError(err).Warn("front-end connection ended")
		return
	}
	l.Info("front-end disconnected")
}

func (e logEvents) QueueBroken(conn uint64, queue int, err error) {
	e.log.WithFields(logrus.Fields{"conn": conn, "queue": queue}).WithError(err).Error("queue broken; it stays stopped until the front-end resets it")
}

// WriteCacheChanged: the guest switched the write cache (SET_CONFIG).
func (e logEvents) WriteCacheChanged(conn uint64, writeThrough bool) {
	mode := "write-back"
	if writeThrough {
		mode = "write-through (every write flushed before it completes)"
	}
	e.log.WithFields(logrus.Fields{"conn": conn}).Info("guest set the write cache to " + mode)
}

// QueueRecovered: a ring restarted from the inflight region and redoes the
// requests a previous daemon (or connection) took but never completed.
func (e logEvents) QueueRecovered(conn uint64, queue int, n int) {
	e.log.WithFields(logrus.Fields{"conn": conn, "queue": queue, "requests": n}).Info("resubmitting requests left in flight by the previous back-end")
}

// RequestFailed is rate-limited: a guest can fail requests as fast as it
// can submit them, and the log must not become the bottleneck or fill the
// disk. Lines dropped in one interval are counted in the next one logged.
func (e logEvents) RequestFailed(conn uint64, queue int, err error) {
	ok, dropped := e.limiter.allow()
	if !ok {
		return
	}
	l := e.log.WithFields(logrus.Fields{"conn": conn, "queue": queue})
	if dropped > 0 {
		l = l.WithField("suppressed", dropped)
	}
	l.WithError(err).Warn("request failed")
}

// requestLogBurst is how many failed requests are logged per second.
const requestLogBurst = 10

// logLimiter allows burst events per interval and counts the rest.
type logLimiter struct {
	mu      sync.Mutex
	burst   int
	every   time.Duration
	start   time.Time
	used    int
	dropped uint64
	now     func() time.Time
}

func newLogLimiter(burst int, every time.Duration) *logLimiter {
	return &logLimiter{burst: burst, every: every, now: time.Now}
}

// allow reports whether to log this event and how many were dropped since
// the last one logged.
func (l *logLimiter) allow() (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if t := l.now(); t.Sub(l.start) >= l.every {
		l.start, l.used = t, 0
	}
	if l.used >= l.burst {
		l.dropped++
		return false, 0
	}
	l.used++
	d := l.dropped
	l.dropped = 0
	return true, d
}
