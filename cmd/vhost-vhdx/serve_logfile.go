package main

import (
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/sirupsen/logrus"
)

// logFile is serve's --log-file: appended to, and reopened on SIGHUP so
// that logrotate (or an operator) can move it away and have the daemon
// write to a new file at the same path without a restart.
type logFile struct {
	path string
	mu   sync.Mutex
	f    *os.File // protected by mu
}

func openLogFile(path string) (*logFile, error) {
	l := &logFile{path: path}
	f, err := l.open()
	if err != nil {
		return nil, err
	}
	l.f = f
	return l, nil
}

func (l *logFile) open() (*os.File, error) {
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	return f, nil
}

// Write writes one log entry; logrus serialises calls, the mutex orders
// them with Reopen.
func (l *logFile) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Write(b)
}

// Reopen opens the path anew and switches to it. If that fails the old file
// stays in use, so nothing is lost.
func (l *logFile) Reopen() error {
	f, err := l.open()
	if err != nil {
		return err
	}
	l.mu.Lock()
	old := l.f
	l.f = f
	l.mu.Unlock()
	return old.Close()
}

func (l *logFile) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}

// reopenOnSIGHUP reopens lf on every SIGHUP until the returned stop is
// called. Failures are logged to the file still in use.
func reopenOnSIGHUP(lf *logFile, log *logrus.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-hup:
				if err := lf.Reopen(); err != nil {
					log.WithError(err).Error("SIGHUP: reopening the log file failed; still writing to the old one")
					continue
				}
				log.WithField("log_file", lf.path).Info("SIGHUP: log file reopened")
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
		<-finished
	}
}
