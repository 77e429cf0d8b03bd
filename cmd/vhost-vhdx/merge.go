package main

// merge: a live merge of the top into its parent (vhdx.LiveMerge; its doc
// has the crash-safe protocol). Job style: the command starts the merge
// and replies at once; `status` shows its progress (state, done, total,
// rate) until the next merge; merge-cancel stops it.
//
//  1. Start, holding opMu and inside Monitor.Quiesce (no request in
//     flight): vhdx.StartLiveMerge reopens the parent read-write and links
//     the top to it through parent_linkage2; the DiskRef is swapped to the
//     LiveMerge, which forwards I/O to the top and records the blocks
//     written.
//  2. A goroutine runs the copy at the rate asked, without opMu: status,
//     stats and flush go on; resize and checkpoint are refused while a
//     merge runs (they would close the top under it).
//  3. When the copy is done: opMu, Quiesce, Finish (the final pass, the
//     parent flushed, the top removed) and the DiskRef swapped to the
//     parent, which is the disk from now on. The guest's pause is the
//     final pass; its length is logged.
//  4. On cancel (merge-cancel, or the daemon stopping) or an error: under
//     opMu and Quiesce the DiskRef is swapped back to the top, which keeps
//     the parent (read-write) below it; the chain reads the same and a
//     later merge starts again.
//
// A daemon killed during the merge is restarted with the top's path as
// before (the open replays the parent's log and serves the chain: the merge
// is abandoned) or, once the merge finished (the top file is gone), with
// the parent's path.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// mergeJob is the daemon's current or last merge.
type mergeJob struct {
	m      *vhdx.LiveMerge
	cancel context.CancelFunc
	done   chan struct{} // closed when the job ended (finished, failed or cancelled)
	mu     sync.Mutex
	end    string // set when the job ended: "" while running; under mu
	pause  time.Duration
}

// MergeStatus is the merge part of status.
type MergeStatus struct {
	vhdx.MergeProgress
	Running  bool  `json:"running"`
	PausedNS int64 `json:"paused_ns,omitempty"` // the final pass, once done
}

// MergeReply is the reply of merge: the job started.
type MergeReply struct {
	Top    string `json:"top"`
	Parent string `json:"parent"`
	Total  int64  `json:"total"`
	Rate   int64  `json:"rate"`
}

// rateArg is a rate in bytes/s: a JSON number or a size string ("10M");
// 0 is unbounded.
type rateArg int64

func (r *rateArg) UnmarshalJSON(b []byte) error {
	if t := string(b); t == "0" || t == `"0"` {
		*r = 0 // unbounded, as when the argument is absent
		return nil
	}
	var s sizeArg
	if err := s.UnmarshalJSON(b); err != nil || s.rel {
		return errors.New("rate must be a number of bytes per second or a string such as \"50M\"")
	}
	if s.n > 1<<62 {
		return errors.New("rate is too large")
	}
	*r = rateArg(s.n)
	return nil
}

// logger is the daemon's log entry (serve sets it; tests may not).
func (d *daemon) logger() *logrus.Entry {
	if d.log != nil {
		return d.log
	}
	return logrus.NewEntry(logrus.StandardLogger())
}

// mergeStatus is the current or last merge for status (nil: none).
func (d *daemon) mergeStatus() *MergeStatus {
	d.mergeMu.Lock()
	j := d.mergeJob
	d.mergeMu.Unlock()
	if j == nil {
		return nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return &MergeStatus{MergeProgress: j.m.Progress(), Running: j.end == "", PausedNS: int64(j.pause)}
}

// refuseDuringMerge refuses op while a merge runs. Caller holds opMu.
func (d *daemon) refuseDuringMerge(op string) error {
	d.mergeMu.Lock()
	defer d.mergeMu.Unlock()
	if j := d.mergeJob; j != nil {
		select {
		case <-j.done:
		default:
			return fmt.Errorf("%s: a merge of %s into %s is running; wait for it or run merge-cancel", op, j.m.Top().Path(), j.m.Parent().Path())
		}
	}
	return nil
}

func (d *daemon) merge(_ context.Context, c *control.Call) (any, error) {
	var a struct {
		Rate rateArg `json:"rate"`
	}
	if err := c.Decode(&a); err != nil {
		return nil, err
	}
	if d.readOnly {
		return nil, errors.New("merge: the image is served read-only")
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.refuseDuringMerge("merge"); err != nil {
		return nil, err
	}
	im := d.image()
	if im.Parent() == nil {
		return nil, fmt.Errorf("merge: %s has no parent to merge into", im.Path())
	}
	var m *vhdx.LiveMerge
	err := d.monitor.Quiesce(func() error {
		var err error
		if m, err = vhdx.StartLiveMerge(im, vhdx.LiveMergeOptions{Rate: int64(a.Rate)}); err != nil {
			return err
		}
		if _, err := d.ref.Swap(m); err != nil {
			m.Abandon()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &mergeJob{m: m, cancel: cancel, done: make(chan struct{})}
	d.mergeMu.Lock()
	d.mergeJob = j
	d.mergeMu.Unlock()
	p := m.Progress()
	log := d.logger().WithFields(logrus.Fields{"top": p.Top, "parent": p.Parent, "rate": p.Rate})
	log.WithField("total", p.Total).Info("merge started")
	go d.runMerge(ctx, j, log)
	return MergeReply{Top: p.Top, Parent: p.Parent, Total: p.Total, Rate: p.Rate}, nil
}

// runMerge copies, then finishes or abandons the merge (steps 2-4).
func (d *daemon) runMerge(ctx context.Context, j *mergeJob, log *logrus.Entry) {
	defer close(j.done)
	if d.beforeMergeCopy != nil {
		d.beforeMergeCopy(ctx)
	}
	err := j.m.Run(ctx)
	d.opMu.Lock()
	defer d.opMu.Unlock()
	var pause time.Duration
	end := "done"
	if err == nil {
		err = d.monitor.Quiesce(func() error {
			start := time.Now()
			defer func() { pause = time.Since(start) }()
			child := j.m.Current()
			p, ferr := j.m.Finish()
			if p == nil {
				return ferr
			}
			d.retire(child) // its counts are final: it is closed and gone
			// The LiveMerge forwards to the parent already; serving the
			// parent directly drops a lock per request.
			if _, err := d.ref.Swap(p); err != nil {
				log.WithError(err).Warn("merge: serving the parent through the merge")
			}
			if ferr != nil {
				log.WithError(ferr).Warn("merge done with a warning")
			}
			return nil
		})
	}
	if err != nil {
		end = "abandoned"
		if !errors.Is(err, context.Canceled) {
			end = "failed"
		}
		d.monitor.Quiesce(func() error {
			top := j.m.Abandon()
			if _, serr := d.ref.Swap(top); serr != nil {
				log.WithError(serr).Warn("merge: serving the top through the merge")
			}
			return nil
		})
	}
	j.mu.Lock()
	j.end, j.pause = end, pause
	j.mu.Unlock()
	p := j.m.Progress()
	e := log.WithFields(logrus.Fields{"done": p.Done, "total": p.Total, "recopied": p.Recopied, "paused": pause.String()})
	switch end {
	case "done":
		e.Info("merge done; the parent is the disk and the top was removed")
	case "abandoned":
		e.Warn("merge cancelled; the chain is served as it was")
	default:
		e.WithError(err).Error("merge failed; the chain is served as it was")
	}
}

// cancelMerge stops a running merge and waits for it to end (the chain is
// then served as before the merge). It reports whether one was running.
func (d *daemon) cancelMerge() bool {
	d.mergeMu.Lock()
	j := d.mergeJob
	d.mergeMu.Unlock()
	if j == nil {
		return false
	}
	select {
	case <-j.done:
		return false
	default:
	}
	j.cancel()
	<-j.done
	return true
}

func (d *daemon) mergeCommands() []control.Command {
	return []control.Command{
		{Name: "merge", Args: `{"rate": "BYTES/S (default unbounded)"}`,
			Help: "start merging the top into its parent while the guest runs; status shows progress; when done the parent is the disk and the top file is removed",
			Run:  d.merge},
		{Name: "merge-cancel", Help: "stop a running merge; the chain is served as before it",
			Run: func(context.Context, *control.Call) (any, error) {
				if !d.cancelMerge() {
					return nil, errors.New("merge-cancel: no merge is running")
				}
				return d.mergeStatus(), nil
			}},
	}
}
