//go:build linux

// Command guestcmd runs inside the test guest (it is built with
// CGO_ENABLED=0 and appended to the initramfs by the harness). It writes the
// deterministic data of package pattern to a block device or file and
// verifies it, optionally with O_DIRECT so reads really reach the device.
//
//	guestcmd write  -dev /dev/vda -seed 1 -off 1048064 -len 8192 -direct
//	guestcmd verify -dev /dev/vda -seed 1 -off 1048064 -len 8192 -direct
//	guestcmd verify -dev /dev/vda -zero -off 0 -len 4096 -direct
//	guestcmd zeroout -dev /dev/vda -off 1044480 -len 2105344
//
// Exit status 0 means the operation completed and (for verify) matched.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/vhost-vhdx/vhost-vhdx/tests/qemu/pattern"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: guestcmd write|verify|zeroout [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	dev := fs.String("dev", "/dev/vda", "block device or file")
	seed := fs.Uint64("seed", 1, "pattern stream")
	off := fs.Int64("off", 0, "byte offset")
	length := fs.Int64("len", 0, "byte count")
	bs := fs.Int("bs", 1<<20, "bytes per I/O")
	direct := fs.Bool("direct", false, "use O_DIRECT (offsets, lengths and bs must be sector aligned)")
	zero := fs.Bool("zero", false, "verify: expect zeroes instead of the pattern")
	create := fs.Bool("create", false, "write: create the file if needed")
	if err := fs.Parse(os.Args[2:]); err != nil {
		os.Exit(2)
	}
	var err error
	switch cmd {
	case "write":
		err = write(*dev, *seed, *off, *length, *bs, *direct, *create)
	case "verify":
		err = verify(*dev, *seed, *off, *length, *bs, *direct, *zero)
	case "zeroout":
		err = zeroout(*dev, *off, *length)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	what := fmt.Sprintf("%s %s seed=%d off=%d len=%d direct=%v", cmd, *dev, *seed, *off, *length, *direct)
	if *zero {
		what += " zero"
	}
	if err != nil {
		fmt.Printf("guestcmd: %s: %v\n", what, err)
		os.Exit(1)
	}
	fmt.Printf("guestcmd: %s: ok\n", what)
}

// alignedBuf returns a page-aligned buffer, as O_DIRECT needs.
func alignedBuf(n int) ([]byte, error) {
	return syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
}

func open(path string, flags int, direct bool) (*os.File, error) {
	if direct {
		flags |= syscall.O_DIRECT
	}
	return os.OpenFile(path, flags, 0o644)
}

func write(path string, seed uint64, off, length int64, bs int, direct, create bool) error {
	flags := os.O_WRONLY
	if create {
		flags |= os.O_CREATE
	}
	f, err := open(path, flags, direct)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := alignedBuf(bs)
	if err != nil {
		return err
	}
	for done := int64(0); done < length; {
		n := int(min(int64(bs), length-done))
		pattern.Fill(buf[:n], seed, off+done)
		if _, err := f.WriteAt(buf[:n], off+done); err != nil {
			return err
		}
		done += int64(n)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return f.Close()
}

func verify(path string, seed uint64, off, length int64, bs int, direct, zero bool) error {
	f, err := open(path, os.O_RDONLY, direct)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := alignedBuf(bs)
	if err != nil {
		return err
	}
	for done := int64(0); done < length; {
		n := int(min(int64(bs), length-done))
		got, err := f.ReadAt(buf[:n], off+done)
		if got < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read at %d: %w", off+done, err)
		}
		bad := -1
		if zero {
			for i, b := range buf[:n] {
				if b != 0 {
					bad = i
					break
				}
			}
		} else {
			bad = pattern.Mismatch(buf[:n], seed, off+done)
		}
		if bad >= 0 {
			return fmt.Errorf("data differs at byte %d (got %#02x)", off+done+int64(bad), buf[bad])
		}
		done += int64(n)
	}
	return nil
}

// blkZeroout is BLKZEROOUT, _IO(0x12, 127): the kernel zeroes the range with
// WRITE_ZEROES requests when the device offers them, else with plain writes.
const blkZeroout = 0x127f

func zeroout(path string, off, length int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := ioctlZeroout(f.Fd(), uint64(off), uint64(length)); err != nil {
		return fmt.Errorf("BLKZEROOUT: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return f.Close()
}
