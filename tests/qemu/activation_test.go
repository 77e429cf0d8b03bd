package qemu_test

import (
	"net"
	"os"
	"testing"
)

// activated turns the serve command line args into one started as
// systemd's socket activation starts it: the env's listening socket at sock
// as fd 3, LISTEN_FDS=1, and LISTEN_PID set to the daemon's own pid (the
// shell sets it to $$ and execs the daemon, which keeps the pid). args
// loses its --socket option.
func (e *env) activated(t *testing.T, sock string, args []string) ([]string, []*os.File, []string) {
	t.Helper()
	if e.actSock == nil {
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatalf("creating the activation socket: %v", err)
		}
		ln.SetUnlinkOnClose(false) // the socket outlives this copy, as systemd's does
		f, err := ln.File()
		ln.Close()
		if err != nil {
			t.Fatal(err)
		}
		e.actSock = f
		t.Cleanup(func() {
			f.Close()
			os.Remove(sock)
		})
		e.note("# systemd's part: a listening socket at " + sock + ", passed as fd 3")
	}
	var serve []string
	for i := 0; i < len(args); i++ {
		if args[i] == "--socket" {
			i++
			continue
		}
		serve = append(serve, args[i])
	}
	sh := append([]string{"sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`}, serve...)
	return sh, []*os.File{e.actSock}, []string{"LISTEN_FDS=1"}
}

// TestSocketActivatedBackendServesAGuestAndItsSuccessor starts the daemon
// as the vhost-vhdx@.socket unit does: systemd owns the listening socket and
// passes it to each daemon it starts. A guest writes through the first
// daemon; after a clean stop, a second daemon started on the same socket
// serves a second boot the data.
func TestSocketActivatedBackendServesAGuestAndItsSuccessor(t *testing.T) {
	e := newEnv(t)
	img := e.newImage(t, "activated.vhdx", 64*mib, 512)
	rs := []region{
		{seed: 81, off: mib - 4096, len: 8192},
		{seed: 82, off: 40 * mib, len: 2*mib + 512},
	}
	want := e.newExpected(t, img)
	for _, r := range rs {
		want.write(t, r.seed, r.off, r.len)
	}

	b := e.startBackend(t, img, backendOpts{activated: true})
	e.boot(t, b, "boot1", vmOpts{script: script(writes(mib, rs...), verifies(mib, rs...))})
	b.stop(t)
	if _, err := os.Stat(b.sock); err != nil && e.backend == backendVhostVHDX {
		t.Fatalf("a socket-activated daemon removed systemd's socket: %v", err)
	}

	b = e.startBackend(t, img, backendOpts{activated: true})
	e.boot(t, b, "boot2", vmOpts{script: script(verifies(mib, rs...))})
	b.stop(t)
	e.check(t, img)
	e.compare(t, img, want)
}
