package main

// checkpoint: a live, Hyper-V-style checkpoint. The design:
//
// The vhost-user server serves a blk.DiskRef, not the image itself. To
// switch writes to a new child at one instant, checkpoint holds opMu (no
// other command touches the image) and runs the switch inside
// vhostuser.Monitor.Quiesce, which holds the session's dispatch lock for
// writing: every queue worker is between batches, so every request the
// guest has been given a completion for was executed on the old top, and
// no request starts until the switch is over. Inside:
//
//  1. Close the old top: its data and metadata are flushed and its log
//     emptied, so every acknowledged write is durable in it and the file is
//     consistent on its own. Closing also drops our exclusive lock, which
//     Create and the new chain's Open need to open it (read-only, shared).
//  2. vhdx.Create(NEW, ParentPath: old top): the child's locator records
//     the old top's path and its DataWriteGuid as parent_linkage.
//  3. vhdx.Open(NEW): the new chain, NEW read-write on top of the old top,
//     which is from now on opened read-only (shared lock) and never
//     written again: it can be copied or backed up while the guest runs.
//  4. DiskRef.Swap(new chain); Quiesce returns and the queues go on,
//     every request from now on executed on NEW.
//
// Nothing is lost, reordered or written twice: requests are not re-run,
// and none is in progress across the switch. If 2-4 fail, NEW (which did
// not exist before) is removed, the old top is opened read-write again
// and swapped back, and the command reports the error; the guest saw a
// pause, nothing else. If even that reopen fails the disk is offline
// (every request fails) and the error says so.
//
// The guest's I/O pauses for the duration of 1-4 (a flush, creating a
// small file, opening the chain); the reply reports it as paused_ns.
//
// Live merge (merge.go) reuses the same two pieces: Quiesce to start and
// to finish, and the DiskRef swapped to the vhdx.LiveMerge and then to the
// parent. A checkpoint while a merge runs is refused.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/control"
)

// CheckpointReply is the reply of checkpoint.
type CheckpointReply struct {
	Top      string `json:"top"`       // the new top, written from now on
	Parent   string `json:"parent"`    // the old top, read-only from now on
	Depth    int    `json:"depth"`     // layers below the new top
	PausedNS int64  `json:"paused_ns"` // how long the queues were held
}

func (d *daemon) checkpoint(ctx context.Context, c *control.Call) (any, error) {
	var a struct {
		Path string `json:"path"`
	}
	if err := c.Decode(&a); err != nil {
		return nil, err
	}
	if a.Path == "" || !filepath.IsAbs(a.Path) {
		return nil, fmt.Errorf("%w: \"path\" must be an absolute path (the daemon's working directory is not the client's)", control.ErrInvalidArguments)
	}
	path := filepath.Clean(a.Path)
	if d.readOnly {
		return nil, errors.New("checkpoint: the image is served read-only")
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.refuseDuringMerge("checkpoint"); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("checkpoint: %s already exists or cannot be checked (%v)", path, err)
	}
	old := d.image()
	oldPath := old.Path()
	if oldPath == path {
		return nil, fmt.Errorf("checkpoint: %s is the current top", path)
	}
	var r CheckpointReply
	err := d.monitor.Quiesce(func() error {
		start := time.Now()
		defer func() { r.PausedNS = int64(time.Since(start)) }()
		if err := old.Close(); err != nil {
			return d.restoreTop(oldPath, "", fmt.Errorf("closing %s: %w", oldPath, err))
		}
		if err := vhdx.Create(path, vhdx.CreateOptions{ParentPath: oldPath}); err != nil {
			return d.restoreTop(oldPath, path, fmt.Errorf("creating %s: %w", path, err))
		}
		top, err := vhdx.Open(path, vhdx.OpenOptions{})
		if err != nil {
			return d.restoreTop(oldPath, path, fmt.Errorf("opening %s: %w", path, err))
		}
		if _, err := d.ref.Swap(top); err != nil {
			top.Close()
			return d.restoreTop(oldPath, path, err)
		}
		r.Top, r.Parent, r.Depth = top.Path(), absPath(oldPath), top.Depth()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return r, nil
}

// absPath is p made absolute for a reply (the daemon may have been given
// a relative image path), or p if that fails.
func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// restoreTop undoes a failed checkpoint: removes created (if set; it did
// not exist before the checkpoint), reopens the old top read-write and
// serves it again. Called inside Quiesce.
func (d *daemon) restoreTop(oldPath, created string, cause error) error {
	if created != "" {
		os.Remove(created)
	}
	im, err := vhdx.Open(oldPath, vhdx.OpenOptions{})
	if err != nil {
		return fmt.Errorf("%w; reopening %s failed too, the disk is offline: %v", cause, oldPath, err)
	}
	if _, err := d.ref.Swap(im); err != nil {
		im.Close()
		return fmt.Errorf("%w; serving %s again failed, the disk is offline: %v", cause, oldPath, err)
	}
	return fmt.Errorf("%w (still serving %s)", cause, oldPath)
}
