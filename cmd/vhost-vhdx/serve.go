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
	"slices"
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

// defaultPollUS is --poll-us's default: long enough to catch the next
// request of a guest at queue depth 1 (its own round trip through the
// kernel takes about 10 to 25 µs here), short enough that a quiet guest
// costs nothing (docs/benchmarks/profile.md, "adaptive polling").
const defaultPollUS = 50

// capabilities is what --print-capabilities prints, per the vhost-user
// "Backend program conventions" (type "block", the optional features we
// support).
const capabilities = `{"type":"block","features":["read-only","blk-file"]}`

const serveUsage = `Usage: vhost-vhdx serve [--socket-path PATH [--socket-owner U[:G]] [--socket-mode M]
                        | --fd N] [--read-only] [--num-queues N] [--serial S]
                        [--log-level L] [--log-file F] [--control-socket PATH] IMAGE
       vhost-vhdx serve --print-capabilities

Serve IMAGE to one vhost-user front-end (QEMU) at a time. When a front-end
disconnects the daemon listens again, so QEMU's reconnect=1 works. SIGINT or
SIGTERM stops accepting, finishes in-flight requests, flushes and closes the
image cleanly. SIGHUP reopens the --log-file (for logrotate).

Without --socket-path or --fd, serve takes the listening socket systemd
passes by socket activation (LISTEN_FDS=1 and LISTEN_PID, fd 3).

Options:
  --socket-path PATH    create and listen on this unix socket (alias: --socket);
                        repeat it to serve the one open image on several
                        sockets, e.g. QEMU's migration source on one and its
                        destination on the other: the queues of only one
                        front-end run at a time, a second one's start waits
                        until the first one's queues are all stopped
  --socket-owner U[:G]  give the socket to user U and group G (names or ids;
                        ":G" alone changes only the group), e.g. so that
                        libvirt's QEMU (libvirt-qemu on Debian) can connect
  --socket-mode M       the socket's permission bits in octal (e.g. 0660);
                        default 0777 less the umask
  --fd N                serve on an inherited listening socket instead
  --blk-file IMAGE      the image (instead of the IMAGE argument)
  --read-only           open the image read-only; the guest sees a read-only disk
  --num-queues N        most request queues offered (default and maximum 256);
                        QEMU uses one per vCPU unless num-queues= is set, and
                        a worker runs only for each queue QEMU starts
  --serial S            GET_ID serial, at most 20 bytes (default: from the
                        image's Virtual Disk ID)
  --log-level L         debug, info, warn or error (default info); debug also
                        logs every vhost-user message the front-end sends
  --log-file F          append the log to F instead of stderr; SIGHUP reopens it
  --on-enospc report|wait
                        when the host file system is full: report fails the
                        write with an I/O error in the guest (default); wait
                        holds it and retries (100 ms to 1 s apart) until space
                        is freed, as QEMU's werror=enospc; logged once per
                        episode and shown by 'ctl status'
  --poll-us N           after a queue runs empty, keep looking at it for N µs
                        before sleeping until the guest's next kick (default
                        50; 0: sleep at once). Saves the wake-up of a halted
                        vCPU per request; costs at most N µs of CPU per burst
  --control-socket PATH a unix socket (mode 0600) for live operations:
                        status, stats, flush, resize, checkpoint
                        (see 'vhost-vhdx ctl')
  --stop-with-parent    also stop cleanly when the parent process is stopping on
                        a signal it does not pass on (GNU make with SIGINT;
                        make run uses it) or has exited
  --print-capabilities  print the vhost-user backend capabilities JSON and exit
`

type serveConfig struct {
	socketPath  string   // the first --socket-path
	socketPaths []string // every --socket-path, in order
	fd          int
	readOnly    bool
	numQueues   int
	serial      string
	logLevel    string
	image       string
	printCaps   bool

	socketOwner, socketMode string
	access                  socketAccess // parsed --socket-owner, --socket-mode
	activated               bool         // fd came from systemd socket activation
	logFile                 string
	control                 string // --control-socket
	stopWithParent          bool   // --stop-with-parent (serve_parent.go)
	onENOSPC                string // --on-enospc
	pollUS                  int    // --poll-us
	noSpace                 blk.NoSpacePolicy
}

func parseServeFlags(args []string, stdout io.Writer) (serveConfig, error) {
	cfg := serveConfig{fd: -1}
	fs := newFlagSet("serve")
	fs.Var(socketPathsFlag{&cfg}, "socket-path", "")
	fs.Var(socketPathsFlag{&cfg}, "socket", "")
	fs.IntVar(&cfg.fd, "fd", -1, "")
	fs.StringVar(&cfg.image, "blk-file", "", "")
	fs.BoolVar(&cfg.readOnly, "read-only", false, "")
	fs.IntVar(&cfg.numQueues, "num-queues", maxQueues, "")
	fs.StringVar(&cfg.serial, "serial", "", "")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "")
	fs.BoolVar(&cfg.printCaps, "print-capabilities", false, "")
	fs.StringVar(&cfg.socketOwner, "socket-owner", "", "")
	fs.StringVar(&cfg.socketMode, "socket-mode", "", "")
	fs.StringVar(&cfg.logFile, "log-file", "", "")
	fs.StringVar(&cfg.control, "control-socket", "", "")
	fs.BoolVar(&cfg.stopWithParent, "stop-with-parent", false, "")
	fs.StringVar(&cfg.onENOSPC, "on-enospc", "report", "")
	fs.IntVar(&cfg.pollUS, "poll-us", defaultPollUS, "")
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
	if err := cfg.socketFromActivation(); err != nil {
		return cfg, err
	}
	if (cfg.socketPath == "") == (cfg.fd < 0) {
		return cfg, usagef("serve", "give exactly one of --socket-path and --fd (or start serve by systemd socket activation)")
	}
	if err := cfg.parseAccess(); err != nil {
		return cfg, err
	}
	if cfg.numQueues < 1 || cfg.numQueues > maxQueues {
		return cfg, usagef("serve", "--num-queues %d out of range 1..%d", cfg.numQueues, maxQueues)
	}
	if cfg.pollUS < 0 || time.Duration(cfg.pollUS)*time.Microsecond > vhostuser.MaxPollWindow {
		return cfg, usagef("serve", "--poll-us %d out of range 0..%d", cfg.pollUS, vhostuser.MaxPollWindow/time.Microsecond)
	}
	if len(cfg.serial) > 20 {
		return cfg, usagef("serve", "--serial %q is longer than the 20 bytes virtio-blk GET_ID returns", cfg.serial)
	}
	if _, err := logrus.ParseLevel(cfg.logLevel); err != nil {
		return cfg, usagef("serve", "--log-level: %v", err)
	}
	if cfg.noSpace, err = blk.ParseNoSpacePolicy(cfg.onENOSPC); err != nil {
		return cfg, usagef("serve", "--on-enospc: %v", err)
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
	if cfg.logFile != "" {
		lf, err := openLogFile(cfg.logFile)
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		defer lf.Close()
		log.SetOutput(lf)
		stopHUP := reopenOnSIGHUP(lf, log)
		defer stopHUP()
	} else {
		// SIGHUP's default action would kill the daemon (systemctl
		// reload, a closed terminal): there is nothing to reload.
		signal.Ignore(syscall.SIGHUP)
	}

	im, err := vhdx.Open(cfg.image, vhdx.OpenOptions{ReadOnly: cfg.readOnly})
	if err != nil {
		return fmt.Errorf("serve %s: %w", cfg.image, err)
	}
	serial := cfg.serial
	if serial == "" {
		serial = defaultSerial(im)
	}

	var lns []*net.UnixListener
	if cfg.fd >= 0 {
		ln, err := vhostuser.FromFD(cfg.fd)
		if err != nil {
			im.Close()
			return fmt.Errorf("serve: %w", err)
		}
		lns = append(lns, ln)
	}
	for _, p := range cfg.socketPaths {
		ln, err := listenWithAccess(p, cfg.access)
		if err != nil {
			for i, l := range lns {
				l.Close()
				os.Remove(cfg.socketPaths[i])
			}
			im.Close()
			return fmt.Errorf("serve: %w", err)
		}
		lns = append(lns, ln)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	entry := log.WithFields(logrus.Fields{"image": cfg.image})
	if cfg.stopWithParent {
		go watchParent(ctx, procParent, parentWatchEvery, func(why string) {
			entry.WithField("reason", why).Info("stopping with the parent process")
			stop()
		})
	}
	sockets := make([]string, len(lns))
	for i, ln := range lns {
		sockets[i] = ln.Addr().String()
	}
	entry.WithFields(logrus.Fields{
		"socket":       strings.Join(sockets, ","),
		"virtual_size": im.Size(),
		"read_only":    cfg.readOnly,
		"num_queues":   cfg.numQueues,
		"serial":       serial,
		"activated":    cfg.activated,
	}).Info("serving VHDX image over vhost-user-blk")

	d := newDaemon(im, cfg.readOnly, cfg.numQueues)
	d.nospace = blk.NewNoSpace(cfg.noSpace, logNoSpace(entry))
	ctlCtx, ctlStop := context.WithCancel(ctx)
	defer ctlStop()
	ctlWait := func() {}
	if cfg.control != "" {
		if ctlWait, err = startControl(ctlCtx, cfg.control, d, entry); err != nil {
			for _, l := range lns {
				l.Close()
			}
			for _, p := range cfg.socketPaths {
				os.Remove(p)
			}
			im.Close()
			return fmt.Errorf("serve: %w", err)
		}
	}
	opts := d.vhostOptions(blk.Options{Serial: serial}, cfg.numQueues, newLogEvents(entry))
	opts.PollWindow = time.Duration(cfg.pollUS) * time.Microsecond
	if len(lns) > 1 {
		// One device on several sockets: one front-end's queues at a
		// time (vhostuser.RingGate); the daemon's one write cache mode
		// is shared already.
		opts.Gate = vhostuser.NewRingGate()
	}
	serveErr := serveAll(ctx, stop, lns, opts)
	// Control commands use the image: they stop before it closes.
	ctlStop()
	ctlWait()
	if d.cancelMerge() { // merge.go: the chain is served as it was
		entry.Warn("a running merge was cancelled by the shutdown; run merge again to complete it")
	}
	for _, p := range cfg.socketPaths {
		os.Remove(p)
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

// serveAll runs Serve on every listener and returns the first error; an
// error on one listener stops them all.
func serveAll(ctx context.Context, stop context.CancelFunc, lns []*net.UnixListener, opts vhostuser.Options) error {
	errs := make(chan error, len(lns))
	for _, ln := range lns {
		go func() {
			err := vhostuser.Serve(ctx, ln, opts)
			if err != nil {
				stop()
			}
			errs <- err
		}()
	}
	var first error
	for range lns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// socketPathsFlag collects repeated --socket-path flags.
type socketPathsFlag struct{ cfg *serveConfig }

func (f socketPathsFlag) String() string { return "" }

func (f socketPathsFlag) Set(v string) error {
	if v == "" {
		return errors.New("empty socket path")
	}
	if slices.Contains(f.cfg.socketPaths, v) {
		return fmt.Errorf("socket path %s given twice", v)
	}
	if f.cfg.socketPath == "" {
		f.cfg.socketPath = v
	}
	f.cfg.socketPaths = append(f.cfg.socketPaths, v)
	return nil
}

var _ vhostuser.RecoveryEvents = logEvents{}
var _ vhostuser.CacheEvents = logEvents{}
var _ vhostuser.MessageEvents = logEvents{}

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

// MessageHandled traces the control channel at debug level: one line per
// vhost-user message, so a start sequence that stopped half-way shows where.
func (e logEvents) MessageHandled(conn uint64, request string, err error) {
	if !e.log.Logger.IsLevelEnabled(logrus.DebugLevel) {
		return
	}
	l := e.log.WithFields(logrus.Fields{"conn": conn, "request": request})
	if err != nil {
		l = l.WithError(err)
	}
	l.Debug("vhost-user message handled")
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
