package main

import (
	"fmt"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
)

// logNoSpace logs the episodes of serve --on-enospc wait: one warning when
// the first request starts waiting for host space and one when none waits
// any more, however many retries and requests the episode holds
// (blk/nospace.go). Each failed attempt is not logged: a full disk lasts
// until an operator acts, and a line per retry would fill the log too.
func logNoSpace(log *logrus.Entry) func(blk.NoSpaceEvent) {
	return func(ev blk.NoSpaceEvent) {
		if ev.Start {
			log.WithError(ev.Err).Warn("host file system full: holding writes until space is freed (--on-enospc wait; 'ctl status' shows them)")
			return
		}
		l := log.WithField("waited", time.Since(ev.Since).Round(time.Millisecond).String())
		if ev.SpaceBack {
			l.Warn("host space is back: held writes completed")
			return
		}
		l.Warn("held writes abandoned without space: their queue stopped; they stay in flight for the front-end to resubmit")
	}
}

// formatNoSpace is the "host space" line of ctl status: the --on-enospc
// policy, the writes waiting now, and the counts since the daemon started.
func formatNoSpace(s blk.NoSpaceSnapshot, now time.Time) string {
	line := "--on-enospc " + s.Policy
	if s.Waiting > 0 && s.Since != nil {
		line += fmt.Sprintf(", FULL: %d writes waiting since %s (%v)", s.Waiting,
			s.Since.Format(time.RFC3339), now.Sub(*s.Since).Round(time.Second))
	}
	if s.Episodes > 0 || s.Reported > 0 {
		line += fmt.Sprintf("; %d full-disk episodes held %d writes, %d writes failed for lack of space", s.Episodes, s.Held, s.Reported)
	}
	return line
}
