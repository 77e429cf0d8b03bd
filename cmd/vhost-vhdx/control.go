package main

// The daemon side of the control socket (serve --control-socket): the
// commands, wired to the open image, the vhost-user server's Monitor,
// Stats and ConfigNotifier, and their log lines. The protocol is package
// control.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// daemon is what control commands act on.
//
// The served disk is a blk.DiskRef over the top image, so checkpoint can
// switch it. opMu orders commands against that switch: status, stats and
// flush hold it for reading, checkpoint and resize for writing, so no
// command uses an image a checkpoint is closing. A merge (merge.go) holds
// it for writing to start and to finish, not while it copies; meanwhile
// the DiskRef serves the vhdx.LiveMerge, and checkpoint and resize are
// refused.
type daemon struct {
	ref      *blk.DiskRef // current *vhdx.Image, or *vhdx.LiveMerge during a merge
	opMu     sync.RWMutex
	readOnly bool
	started  time.Time
	monitor  *vhostuser.Monitor
	stats    *blk.Stats
	notifier *vhostuser.ConfigNotifier
	cache    *blk.WriteCache

	// retired sums the counters of the images the DiskRef served before
	// the current one (a checkpoint or resize swaps in a newly opened
	// image, whose counters start at zero), so stats shows the image
	// counters since the daemon started. Added to by the DiskRef's OnSwap
	// hook, whoever swaps (the old image is quiesced or closed by then, so
	// its counts are final); retiredMu because a swap need not hold opMu.
	// checkpoint and resize do hold it, so a stats reply never falls
	// between their Swap and the hook; a swapper that does not could make
	// one reply miss the old image's counts for that instant.
	retiredMu sync.Mutex
	retired   vhdx.Counters
	log       *logrus.Entry // nil: the standard logger

	mergeMu  sync.Mutex
	mergeJob *mergeJob    // the current or last merge (merge.go); under mergeMu
	nospace  *blk.NoSpace // --on-enospc state; nil: report, not counted

	// beforeMergeCopy is a test hook, nil in production: the merge's
	// goroutine runs it before the copy starts, with the merge's context
	// (cancelled by merge-cancel), so a test can hold a merge running for
	// as long as it needs.
	beforeMergeCopy func(context.Context)
}

// image is the image served now (the top of the chain; during a merge
// the LiveMerge serves it).
func (d *daemon) image() *vhdx.Image {
	return servedImage(d.ref.Load())
}

// vhostOptions are the vhost-user server options for d: its image, with
// the monitor, statistics, notifier and write cache the control commands
// read.
func (d *daemon) vhostOptions(o blk.Options, numQueues int, ev vhostuser.Events) vhostuser.Options {
	o.ReadOnly, o.Cache, o.NoSpace = d.readOnly, d.cache, d.nospace
	return vhostuser.Options{Disk: d.ref, Blk: o, NumQueues: numQueues, Events: ev,
		Notifier: d.notifier, Monitor: d.monitor, Stats: d.stats}
}

// newDaemon prepares the state control commands act on for an open image.
func newDaemon(im *vhdx.Image, readOnly bool, numQueues int) *daemon {
	d := &daemon{ref: blk.NewDiskRef(im), readOnly: readOnly, started: time.Now(), monitor: new(vhostuser.Monitor),
		stats: blk.NewStats(numQueues), notifier: new(vhostuser.ConfigNotifier)}
	if !readOnly {
		d.cache = new(blk.WriteCache)
	}
	d.ref.OnSwap(func(old blk.Disk) {
		// A merge swaps in a LiveMerge serving the same top, and at its
		// end the parent it already forwards to: the image underneath
		// did not change, so its counts are not final yet (runMerge
		// retires the merged child itself).
		if im := servedImage(old); im != nil && im != servedImage(d.ref.Load()) {
			d.retire(im)
		}
	})
	return d
}

// servedImage is the image a disk of the DiskRef writes to: the image, or
// the current top of a running merge.
func servedImage(disk blk.Disk) *vhdx.Image {
	switch x := disk.(type) {
	case *vhdx.Image:
		return x
	case *vhdx.LiveMerge:
		return x.Current()
	}
	return nil
}

// retire adds the counters of an image no longer served to those since
// the daemon started.
func (d *daemon) retire(im *vhdx.Image) {
	c := im.Counters() // atomics: readable after Close
	d.retiredMu.Lock()
	d.retired = d.retired.Add(c)
	d.retiredMu.Unlock()
}

// LayerStatus is one file of the image chain in status.
type LayerStatus struct {
	Path           string `json:"path"`
	Type           string `json:"type"`
	VirtualSize    uint64 `json:"virtual_size"`
	AllocatedBytes int64  `json:"allocated_bytes"`
	FileSize       int64  `json:"file_size"`
}

// StatusReply is the reply of status.
type StatusReply struct {
	PID         int                    `json:"pid"`
	Version     string                 `json:"version"`
	UptimeNS    int64                  `json:"uptime_ns"`
	ReadOnly    bool                   `json:"read_only"`
	VirtualSize uint64                 `json:"virtual_size"`
	WriteCache  string                 `json:"write_cache"`
	Chain       []LayerStatus          `json:"chain"` // top first
	FrontEnd    vhostuser.DeviceStatus `json:"front_end"`
	Merge       *MergeStatus           `json:"merge,omitempty"` // the current or last merge (merge.go)
	ENOSPC      blk.NoSpaceSnapshot    `json:"enospc"`          // --on-enospc: requests held for host space
	// HostIOErrors: episodes of EIO from the image file (vhdx package doc,
	// "Host I/O errors"); absent for a read-only image.
	HostIOErrors *vhdx.HostIOErrors `json:"host_io_errors,omitempty"`
}

// StatsReply is the reply of stats.
type StatsReply struct {
	UptimeNS int64               `json:"uptime_ns"`
	Queues   []blk.QueueSnapshot `json:"queues"`
	Total    blk.QueueSnapshot   `json:"total"`
	// Image counts since the daemon started, over every image that was
	// the top (checkpoints and resizes open a new one); ImageTop only
	// the current top's, since it became the top.
	Image    vhdx.Counters `json:"image"`
	ImageTop vhdx.Counters `json:"image_top"`
}

// ResizeReply is the reply of resize.
type ResizeReply struct {
	OldSize  uint64 `json:"old_size"`
	NewSize  uint64 `json:"new_size"`
	Notified bool   `json:"notified"`  // the front-end acknowledged CONFIG_CHANGE_MSG
	PausedNS int64  `json:"paused_ns"` // how long the queues were held
	Note     string `json:"note,omitempty"`
}

func (d *daemon) status() StatusReply {
	d.opMu.RLock()
	defer d.opMu.RUnlock()
	im := d.image()
	r := StatusReply{
		PID:         os.Getpid(),
		Version:     version,
		UptimeNS:    int64(time.Since(d.started)),
		ReadOnly:    d.readOnly,
		VirtualSize: uint64(im.Size()),
		WriteCache:  "write-back",
		FrontEnd:    d.monitor.Status(),
		Merge:       d.mergeStatus(),
		ENOSPC:      d.nospace.Snapshot(),
	}
	if d.readOnly {
		r.WriteCache = "none (read-only)"
	} else if d.cache.WriteThrough() {
		r.WriteCache = "write-through"
	}
	layer := im
	for _, info := range im.BackingChain() {
		ls := LayerStatus{Type: info.Type.String(), VirtualSize: info.VirtualSize, AllocatedBytes: info.AllocatedBytes, FileSize: info.FileSize}
		if layer != nil {
			ls.Path = layer.Path()
			layer = layer.Parent()
		}
		r.Chain = append(r.Chain, ls)
	}
	if !d.readOnly {
		h := im.HostIOErrors()
		r.HostIOErrors = &h
	}
	return r
}

// statsReply answers stats; with buckets the latency histograms travel
// too (sparse), for a client that subtracts two replies (blk.Interval,
// ctl stats --watch).
func (d *daemon) statsReply(buckets bool) StatsReply {
	d.opMu.RLock()
	defer d.opMu.RUnlock()
	q, t := d.stats.Snapshot()
	if q == nil {
		q = []blk.QueueSnapshot{}
	}
	if buckets {
		for i := range q {
			q[i].IncludeBuckets()
		}
		t.IncludeBuckets()
	}
	d.retiredMu.Lock()
	top := d.image().Counters()
	all := d.retired.Add(top)
	d.retiredMu.Unlock()
	return StatsReply{UptimeNS: int64(time.Since(d.started)), Queues: q, Total: t, Image: all, ImageTop: top}
}

func (d *daemon) statsCommand(_ context.Context, c *control.Call) (any, error) {
	var a struct {
		Buckets bool `json:"buckets"`
	}
	if err := c.Decode(&a); err != nil {
		return nil, err
	}
	return d.statsReply(a.Buckets), nil
}

// sizeArg is a size given as a JSON number of bytes or a string with an
// optional suffix, "+" meaning relative to the current size.
type sizeArg struct {
	rel bool
	n   uint64
}

func (s *sizeArg) UnmarshalJSON(b []byte) error {
	var num json.Number
	if err := json.Unmarshal(b, &num); err == nil {
		v, err := parseSize(num.String())
		if err != nil {
			return err
		}
		s.n = v
		return nil
	}
	var str string
	if err := json.Unmarshal(b, &str); err != nil {
		return errors.New("size must be a number of bytes or a string such as \"20G\" or \"+1G\"")
	}
	s.rel = strings.HasPrefix(str, "+")
	v, err := parseSize(strings.TrimPrefix(str, "+"))
	if err != nil {
		return err
	}
	s.n = v
	return nil
}

func (d *daemon) resize(ctx context.Context, c *control.Call) (any, error) {
	var a struct {
		Size *sizeArg `json:"size"`
	}
	if err := c.Decode(&a); err != nil {
		return nil, err
	}
	if a.Size == nil {
		return nil, fmt.Errorf("%w: missing \"size\"", control.ErrInvalidArguments)
	}
	if d.readOnly {
		return nil, errors.New("resize: the image is served read-only")
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.refuseDuringMerge("resize"); err != nil {
		return nil, err
	}
	im := d.image()
	old := uint64(im.Size())
	want := a.Size.n
	if a.Size.rel {
		if want > math.MaxInt64-old {
			return nil, fmt.Errorf("resize: %d + %d overflows", old, want)
		}
		want += old
	}
	switch {
	case want < old:
		return nil, fmt.Errorf("resize: %d bytes is smaller than the current %d; shrinking a disk a guest uses is refused", want, old)
	case want == old:
		return ResizeReply{OldSize: old, NewSize: old, Note: "already this size"}, nil
	case want%uint64(im.LogicalSectorSize()) != 0:
		return nil, fmt.Errorf("resize: %d is not a multiple of the %d-byte logical sector", want, im.LogicalSectorSize())
	}
	// The engine grows a closed image (vhdx.Resize: new BAT entries, and
	// a larger BAT if needed, then the size, through the log). Online, the
	// queues are held between batches while the top is closed, grown and
	// reopened, so every request sees the old size or the new one.
	r := ResizeReply{OldSize: old}
	path := im.Path()
	err := d.monitor.Quiesce(func() error {
		start := time.Now()
		defer func() { r.PausedNS = int64(time.Since(start)) }()
		if err := im.Close(); err != nil {
			return d.restoreTop(path, "", fmt.Errorf("closing %s: %w", path, err))
		}
		if err := vhdx.Resize(path, want, false); err != nil {
			return d.restoreTop(path, "", err)
		}
		grown, err := vhdx.Open(path, vhdx.OpenOptions{})
		if err != nil {
			return d.restoreTop(path, "", fmt.Errorf("reopening %s: %w", path, err))
		}
		if _, err := d.ref.Swap(grown); err != nil {
			grown.Close()
			return d.restoreTop(path, "", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("resize: %w", err)
	}
	r.NewSize = uint64(d.image().Size())
	// Outside Quiesce: QEMU acks only after re-reading the config, which
	// needs the session's control goroutine.
	nctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	switch err := d.notifier.NotifyConfigChange(nctx); {
	case err == nil:
		r.Notified = true
	case errors.Is(err, vhostuser.ErrNoBackendChannel):
		r.Note = "no front-end with a back-end channel is connected; it reads the new capacity when it next connects"
	default:
		r.Note = "the image grew but telling the front-end failed: " + err.Error()
	}
	return r, nil
}

func (d *daemon) commands() []control.Command {
	return append([]control.Command{
		{Name: "status", Help: "image chain, front-end, negotiated features, queues, uptime",
			Run: func(context.Context, *control.Call) (any, error) { return d.status(), nil }},
		{Name: "stats", Args: `{"buckets": false}`, Help: "requests per queue and in total: ops, bytes, errors, latency percentiles (buckets: with the histograms); allocations, journal commits since start",
			Run: d.statsCommand},
		{Name: "flush", Help: "make every acknowledged write durable; returns when done",
			Run: func(context.Context, *control.Call) (any, error) {
				start := time.Now()
				if d.readOnly {
					return map[string]any{"took_ns": 0, "note": "read-only: nothing to flush"}, nil
				}
				d.opMu.RLock()
				defer d.opMu.RUnlock()
				if err := d.image().Flush(); err != nil {
					return nil, fmt.Errorf("flush: %w", err)
				}
				return map[string]any{"took_ns": time.Since(start).Nanoseconds()}, nil
			}},
		{Name: "resize", Args: `{"size": "SIZE or +SIZE"}`, Help: "grow the disk while the guest runs and tell the guest",
			Run: d.resize},
		{Name: "checkpoint", Args: `{"path": "/ABSOLUTE/NEW.vhdx"}`, Help: "create NEW as a differencing child of the current top and switch every write to it at one instant",
			Run: d.checkpoint},
	}, d.mergeCommands()...)
}

// controlLog logs every control client and command with the peer's
// credentials.
type controlLog struct{ log *logrus.Entry }

func peerFields(p control.Peer) logrus.Fields {
	return logrus.Fields{"client": p.ID, "pid": p.PID, "uid": p.UID}
}

func (l controlLog) ClientOpened(p control.Peer) {
	l.log.WithFields(peerFields(p)).Debug("control client connected")
}

func (l controlLog) ClientClosed(p control.Peer, err error) {
	e := l.log.WithFields(peerFields(p))
	if err != nil {
		e.WithError(err).Warn("control client dropped")
		return
	}
	e.Debug("control client disconnected")
}

func (l controlLog) Command(p control.Peer, name string, args json.RawMessage, err error, took time.Duration) {
	e := l.log.WithFields(peerFields(p)).WithField("command", name).WithField("took", took.String())
	if len(args) > 0 {
		s := string(args)
		if len(s) > 200 {
			s = s[:200] + "..."
		}
		e = e.WithField("arguments", s)
	}
	if err != nil {
		e.WithError(err).Warn("control command failed")
		return
	}
	// status and stats are polled (ctl stats --watch): keep them out of
	// the default log level.
	if name == "status" || name == "stats" || name == "query-commands" {
		e.Debug("control command")
		return
	}
	e.Info("control command")
}

// startControl listens on path and serves the control socket until ctx
// ends; wait returns when it has stopped.
func startControl(ctx context.Context, path string, d *daemon, log *logrus.Entry) (wait func(), err error) {
	ln, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	d.log = log // merge logs its end through it
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := control.Serve(ctx, ln, control.Options{Commands: d.commands(), Events: controlLog{log}}); err != nil {
			log.WithError(err).Error("control socket stopped")
		}
		os.Remove(path)
	}()
	log.WithField("control_socket", path).Info("control socket listening")
	return func() { <-done }, nil
}
