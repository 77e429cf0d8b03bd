package main

import (
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// socketAccess is who may connect to the socket serve creates: the
// front-end (QEMU started by libvirt runs as libvirt-qemu on Debian, qemu on
// Fedora) must be able to write to it.
type socketAccess struct {
	uid, gid int         // -1: unchanged
	mode     os.FileMode // 0: unchanged (umask default)
}

func (a socketAccess) any() bool { return a.uid >= 0 || a.gid >= 0 || a.mode != 0 }

// parseSocketOwner parses --socket-owner USER[:GROUP] (names or numeric
// ids; ":GROUP" alone changes only the group).
func parseSocketOwner(s string) (uid, gid int, err error) {
	uid, gid = -1, -1
	if s == "" {
		return uid, gid, nil
	}
	u, g, hasGroup := strings.Cut(s, ":")
	if u != "" {
		if uid, err = lookupID(u, func(n string) (string, error) {
			x, err := user.Lookup(n)
			if err != nil {
				return "", err
			}
			return x.Uid, nil
		}); err != nil {
			return -1, -1, fmt.Errorf("--socket-owner: user %q: %w", u, err)
		}
	}
	if hasGroup {
		if g == "" {
			return -1, -1, fmt.Errorf("--socket-owner %q: empty group after ':'", s)
		}
		if gid, err = lookupID(g, func(n string) (string, error) {
			x, err := user.LookupGroup(n)
			if err != nil {
				return "", err
			}
			return x.Gid, nil
		}); err != nil {
			return -1, -1, fmt.Errorf("--socket-owner: group %q: %w", g, err)
		}
	}
	return uid, gid, nil
}

// lookupID takes a numeric id as is and looks a name up.
func lookupID(s string, lookup func(string) (string, error)) (int, error) {
	if n, err := strconv.ParseUint(s, 10, 31); err == nil {
		return int(n), nil
	}
	id, err := lookup(s)
	if err != nil {
		return -1, err
	}
	n, err := strconv.ParseUint(id, 10, 31)
	if err != nil {
		return -1, fmt.Errorf("id %q: %w", id, err)
	}
	return int(n), nil
}

// parseSocketMode parses --socket-mode as octal permission bits (0660).
func parseSocketMode(s string) (os.FileMode, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n == 0 || n&^0o777 != 0 {
		return 0, fmt.Errorf("--socket-mode %q: want octal permission bits such as 0660", s)
	}
	return os.FileMode(n), nil
}

// listenWithAccess creates the socket at path and gives it a's owner and
// mode. The socket is bound under umask 0177, so it is born 0600 (owner
// only) and nobody can connect before its owner and mode are set. The umask
// is process-wide: serve calls this before it starts anything else that
// creates files. Without a mode, the socket gets what a plain bind would
// have given it (0777 less the umask).
func listenWithAccess(path string, a socketAccess) (*net.UnixListener, error) {
	if !a.any() {
		return vhostuser.Listen(path)
	}
	old := syscall.Umask(0o177)
	ln, err := vhostuser.Listen(path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*net.UnixListener, error) {
		ln.Close() // unlinks path
		return nil, err
	}
	// Owner first: chown clears set-id bits, and the mode is set last.
	if a.uid >= 0 || a.gid >= 0 {
		if err := os.Lchown(path, a.uid, a.gid); err != nil {
			return fail(fmt.Errorf("socket owner: %w", err))
		}
	}
	mode := a.mode
	if mode == 0 {
		mode = 0o777 &^ os.FileMode(old)
	}
	if err := os.Chmod(path, mode); err != nil {
		return fail(fmt.Errorf("socket mode: %w", err))
	}
	return ln, nil
}

// parseAccess checks --socket-owner and --socket-mode, which apply only to
// a socket serve creates: an inherited one (--fd, socket activation) has
// the owner and mode its creator gave it (SocketUser=, SocketMode= in a
// .socket unit).
func (cfg *serveConfig) parseAccess() error {
	if cfg.socketOwner == "" && cfg.socketMode == "" {
		return nil
	}
	if cfg.socketPath == "" {
		return usagef("serve", "--socket-owner and --socket-mode apply to --socket-path only (an inherited socket keeps its creator's owner and mode)")
	}
	uid, gid, err := parseSocketOwner(cfg.socketOwner)
	if err != nil {
		return usagef("serve", "%v", err)
	}
	mode, err := parseSocketMode(cfg.socketMode)
	if err != nil {
		return usagef("serve", "%v", err)
	}
	cfg.access = socketAccess{uid: uid, gid: gid, mode: mode}
	return nil
}
