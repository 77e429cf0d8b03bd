package main

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// listenFDsStart is the first fd systemd passes (SD_LISTEN_FDS_START in
// sd_listen_fds(3)): fds 3 .. 3+LISTEN_FDS-1.
const listenFDsStart = 3

// activationEnv names the variables of the socket-activation protocol.
var activationEnv = []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}

// activationFD returns the listening socket systemd passed us, as
// sd_listen_fds(3) defines the protocol: LISTEN_PID must equal our pid
// (otherwise the variables were meant for another process and are
// ignored) and LISTEN_FDS counts the fds from 3. We serve one socket, so
// exactly one fd is accepted. The variables are unset once read, so that a
// process we might start does not take them for itself, and the fd is made
// close-on-exec. ok is false when no socket was passed to us.
func activationFD() (fd int, ok bool, err error) {
	pidStr, fdsStr := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	if pidStr == "" || fdsStr == "" {
		return -1, false, nil
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid != os.Getpid() {
		// Not for us (or unparsable, which sd_listen_fds also treats as
		// "not for us").
		return -1, false, nil
	}
	for _, k := range activationEnv {
		os.Unsetenv(k)
	}
	n, err := strconv.Atoi(fdsStr)
	switch {
	case err != nil || n < 0:
		return -1, false, fmt.Errorf("socket activation: LISTEN_FDS=%q is not a count", fdsStr)
	case n == 0:
		return -1, false, nil
	case n > 1:
		// Close what we do not use rather than leak it.
		for fd := listenFDsStart + 1; fd < listenFDsStart+n && fd < listenFDsStart+1024; fd++ {
			unix.Close(fd)
		}
		return -1, false, fmt.Errorf("socket activation passed %d sockets; vhost-vhdx serves one (one ListenStream= per socket unit)", n)
	}
	if _, err := unix.FcntlInt(uintptr(listenFDsStart), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return -1, false, fmt.Errorf("socket activation: fd %d: %w", listenFDsStart, err)
	}
	return listenFDsStart, true, nil
}

// socketFromActivation uses the socket systemd passed when neither
// --socket-path nor --fd was given.
func (cfg *serveConfig) socketFromActivation() error {
	fd, ok, err := activationFD()
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	if cfg.socketPath != "" || cfg.fd >= 0 {
		unix.Close(fd)
		return usagef("serve", "systemd passed a socket (LISTEN_FDS) and --socket-path or --fd was given: use one")
	}
	cfg.fd, cfg.activated = fd, true
	return nil
}
