package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// A FuzzServeConnReleasesResources input is a sequence of records, each one
// message sent with one sendmsg:
//
//	kind  u8   bits 0-1: how many fds ride along (0-3);
//	           bits 2-3: what they are: 0 eventfd, 1 memfd, 2 memfd sealed
//	           against shrinking and growing (as GET_INFLIGHT_FD makes),
//	           3 the read end of a pipe (a kind no message accepts)
//	size  u8   memfd size in 4 KiB pages, minus one
//	len   u16  little-endian length of the message bytes
//	msg   len  the message: header and payload, as the fuzzer made them
//
// so the session can take guest memory mappings, inflight mappings, kick,
// call and error fds, and be handed fds it must refuse.
const (
	frKindEventfd = iota
	frKindMemfd
	frKindSealed
	frKindPipe
)

// resourceRecord encodes one record (for seeds).
func resourceRecord(nfds, kind int, pages uint8, msg []byte) []byte {
	b := []byte{byte(nfds) | byte(kind)<<2, pages}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// makeFuzzFD creates one fd of the given kind; the caller closes it after
// sending (the session holds its own copy).
func makeFuzzFD(t *testing.T, kind int, pages uint8) int {
	t.Helper()
	switch kind {
	case frKindEventfd:
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	case frKindMemfd, frKindSealed:
		fd, err := unix.MemfdCreate("fuzz-guest", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(fd, (int64(pages)+1)*4096); err != nil {
			t.Fatal(err)
		}
		if kind == frKindSealed {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
				t.Fatal(err)
			}
		}
		return fd
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	return p[0]
}

// memfdMappings counts this process's mappings of memfds (guest memory the
// harness made, inflight buffers the session made).
func memfdMappings(t *testing.T) int {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatalf("reading /proc/self/maps: %v", err)
	}
	return bytes.Count(maps, []byte("/memfd:"))
}

// FuzzServeConnReleasesResources drives a whole session with messages that
// carry fds (guest memory memfds, eventfds, sealed inflight memfds, pipes)
// and checks the property the daemon's months-long life depends on: when
// the connection ends, every fd and every mapping the session took is
// released. The counts are taken from /proc/self/fd and /proc/self/maps
// before the session starts and after ServeConn has returned and the
// front-end side is closed; the harness closes its own copies of the fds
// right after sending them, and any fd a reply carries as soon as it
// arrives.
func FuzzServeConnReleasesResources(f *testing.F) {
	const v = vhostuser.FlagVersion
	m := func(req vhostuser.Request, flags uint32, p []byte) []byte {
		return append(vhostuser.AppendHeader(nil, vhostuser.Header{Request: req, Flags: flags, Size: uint32(len(p))}), p...)
	}
	const guest = 16 * 4096 // one 64 KiB guest memory region
	negotiate := func(b []byte) []byte {
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqGetFeatures, v, nil))...)
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetFeatures, v, u64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures|1<<blk.FeatureFlush)))...)
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetProtocolFeatures, v, u64(vhostuser.ProtocolFeatures)))...)
		return append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetOwner, v, nil))...)
	}
	memTable := vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{GuestPhysAddr: 0, Size: guest, UserAddr: 1 << 30}})
	ring := func(b []byte, kickKind int) []byte {
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetVringNum, v, vs(0, 64)))...)
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetVringAddr, v, vhostuser.AppendVringAddr(nil,
			vhostuser.VringAddr{Index: 0, Desc: 1 << 30, Avail: 1<<30 + 1024, Used: 1<<30 + 2048})))...)
		b = append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetVringBase, v, vs(0, 0)))...)
		b = append(b, resourceRecord(1, frKindEventfd, 0, m(vhostuser.ReqSetVringCall, v, u64(0)))...)
		b = append(b, resourceRecord(1, frKindEventfd, 0, m(vhostuser.ReqSetVringErr, v, u64(0)))...)
		b = append(b, resourceRecord(1, kickKind, 0, m(vhostuser.ReqSetVringKick, v, u64(0)))...)
		return append(b, resourceRecord(0, 0, 0, m(vhostuser.ReqSetVringEnable, v, vs(0, 1)))...)
	}
	inflight := vhostuser.InflightMsg{MmapSize: 4096, NumQueues: 1, QueueSize: 64}

	// A running queue over mapped guest memory, with an inflight buffer.
	seed := negotiate(nil)
	seed = append(seed, resourceRecord(1, frKindMemfd, guest/4096-1, m(vhostuser.ReqSetMemTable, v, memTable))...)
	seed = append(seed, resourceRecord(0, 0, 0, m(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, inflight)))...)
	seed = append(seed, resourceRecord(1, frKindSealed, 1, m(vhostuser.ReqSetInflightFD, v, vhostuser.AppendInflight(nil, inflight)))...)
	f.Add(ring(seed, frKindEventfd))
	// The memory table replaced twice, then a kick fd of the wrong kind.
	seed = negotiate(nil)
	for i := 0; i < 3; i++ {
		seed = append(seed, resourceRecord(1, frKindMemfd, guest/4096-1, m(vhostuser.ReqSetMemTable, v, memTable))...)
	}
	f.Add(ring(seed, frKindPipe))
	// Too many fds for a message, and an inflight fd that is not sealed.
	seed = negotiate(nil)
	seed = append(seed, resourceRecord(3, frKindEventfd, 0, m(vhostuser.ReqSetVringCall, v, u64(0)))...)
	seed = append(seed, resourceRecord(1, frKindMemfd, 1, m(vhostuser.ReqSetInflightFD, v, vhostuser.AppendInflight(nil, inflight)))...)
	f.Add(seed)

	// The runtime's network poller takes fds the first time it is used;
	// start it before any baseline is taken.
	a, b := socketpair(f)
	a.Close()
	b.Close()

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) > 1<<16 {
			return
		}
		fds0, maps0 := openFDs(t), memfdMappings(t)
		serveFuzzRecords(t, in, nil)
		if added := newFDs(fds0, openFDs(t)); len(added) > 0 {
			t.Fatalf("fds left open after the connection ended: %v", added)
		}
		if maps := memfdMappings(t); maps != maps0 {
			t.Fatalf("%d memfd mappings after the connection ended, %d before it began", maps, maps0)
		}
	})
}

// serveFuzzRecords runs one session over the records in `in` and returns
// once ServeConn has returned and both ends are closed. With during set,
// it then sends GET_FEATURES, reads replies until that one's arrives (so
// every earlier message has been handled), and calls during while the
// session is still open.
func serveFuzzRecords(t *testing.T, in []byte, during func()) {
	a, b := socketpair(t)
	drained := make(chan struct{})
	startDrain := func() {
		go func() {
			defer close(drained)
			drainReplies(b)
		}()
	}
	if during == nil {
		startDrain()
	}
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.ServeConn(context.Background(), a, vhostuser.Options{Disk: newMemDisk(1 << 20)})
	}()
	for len(in) >= 4 {
		kind, pages := int(in[0]), in[1]
		n := min(int(binary.LittleEndian.Uint16(in[2:])), len(in)-4)
		msg := in[4 : 4+n]
		in = in[4+n:]
		var fds []int
		for i := 0; i < kind&3; i++ {
			fds = append(fds, makeFuzzFD(t, kind>>2&3, pages))
		}
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		_, _, err := b.WriteMsgUnix(msg, oob, nil)
		for _, fd := range fds {
			unix.Close(fd)
		}
		if err != nil {
			break // the session hung up on an earlier message
		}
	}
	if during != nil {
		syncSession(t, b)
		during()
		startDrain()
	}
	b.CloseWrite()
	<-done // ServeConn closes a, which ends the drain
	<-drained
	b.Close()
}

// drainReplies reads replies until the session hangs up, closing every fd
// a reply carries (GET_INFLIGHT_FD's memfd).
func drainReplies(b *net.UnixConn) {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*8))
	for {
		n, oobn, _, _, err := b.ReadMsgUnix(buf, oob)
		closeRights(oob[:oobn])
		if err != nil || n == 0 {
			return
		}
	}
}

// closeRights closes every fd the SCM_RIGHTS messages in oob carry; oob
// that does not parse carries none this test could close.
func closeRights(oob []byte) {
	if len(oob) == 0 {
		return
	}
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, cm := range cms {
		if fds, err := unix.ParseUnixRights(&cm); err == nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}
}

// syncSession sends GET_FEATURES and reads (closing any fds) until its
// reply arrives: the session has then handled every earlier message.
func syncSession(t *testing.T, b *net.UnixConn) {
	t.Helper()
	msg := vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ReqGetFeatures, Flags: vhostuser.FlagVersion})
	if _, err := b.Write(msg); err != nil {
		t.Fatalf("session ended before the sync: %v", err)
	}
	buf := make([]byte, 64*1024)
	oob := make([]byte, unix.CmsgSpace(4*8))
	var got []byte
	for {
		n, oobn, _, _, err := b.ReadMsgUnix(buf, oob)
		closeRights(oob[:oobn])
		if err != nil || n == 0 {
			t.Fatalf("session ended before the sync reply: %v", err)
		}
		got = append(got, buf[:n]...)
		// Replies are header + payload; walk them.
		for len(got) >= vhostuser.HeaderSize {
			req := binary.LittleEndian.Uint32(got)
			size := int(binary.LittleEndian.Uint32(got[8:]))
			if len(got) < vhostuser.HeaderSize+size {
				break
			}
			got = got[vhostuser.HeaderSize+size:]
			if vhostuser.Request(req) == vhostuser.ReqGetFeatures && len(got) == 0 {
				return
			}
		}
	}
}

// TestResourceSeedsTakeWhatTheFuzzTargetCounts checks that the first seed
// of FuzzServeConnReleasesResources really makes the session hold guest
// memory and inflight mappings and fds (so the target's counts can see a
// leak), and that they are all gone when the connection ends.
func TestResourceSeedsTakeWhatTheFuzzTargetCounts(t *testing.T) {
	const v = vhostuser.FlagVersion
	m := func(req vhostuser.Request, p []byte) []byte {
		return append(vhostuser.AppendHeader(nil, vhostuser.Header{Request: req, Flags: v, Size: uint32(len(p))}), p...)
	}
	inflight := vhostuser.AppendInflight(nil, vhostuser.InflightMsg{MmapSize: 4096, NumQueues: 1, QueueSize: 64})
	var in []byte
	in = append(in, resourceRecord(0, 0, 0, m(vhostuser.ReqSetFeatures, u64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures)))...)
	in = append(in, resourceRecord(0, 0, 0, m(vhostuser.ReqSetProtocolFeatures, u64(vhostuser.ProtocolFeatures)))...)
	in = append(in, resourceRecord(1, frKindMemfd, 15, m(vhostuser.ReqSetMemTable,
		vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{Size: 16 * 4096, UserAddr: 1 << 30}})))...)
	in = append(in, resourceRecord(1, frKindSealed, 1, m(vhostuser.ReqSetInflightFD, inflight))...)
	in = append(in, resourceRecord(1, frKindEventfd, 0, m(vhostuser.ReqSetVringCall, u64(0)))...)
	a, b := socketpair(t) // start the poller before the baseline
	a.Close()
	b.Close()
	// The fds are compared as sets (number and what it names), not
	// counted: an fd an earlier test's goroutine closes meanwhile would
	// make a count fall and hide a leak, or fail a test that leaked
	// nothing.
	fds0, maps0 := openFDs(t), memfdMappings(t)
	serveFuzzRecords(t, in, func() {
		if maps := memfdMappings(t); maps < maps0+2 {
			t.Errorf("%d memfd mappings during the session, want at least %d (guest memory and inflight)", maps, maps0+2)
		}
		// The memfds are closed once mapped (memory.go): the session holds
		// the socket pair and the call eventfd.
		if added := newFDs(fds0, openFDs(t)); len(added) < 3 {
			t.Errorf("%d new fds during the session (%v), want at least 3 (two sockets, the call eventfd)", len(added), added)
		}
	})
	if added, maps := newFDs(fds0, openFDs(t)), memfdMappings(t); len(added) != 0 || maps != maps0 {
		t.Fatalf("after the connection: fds left open %v, %d memfd mappings (before: %d)", added, maps, maps0)
	}
}

// openFDs lists this process's open fds and what each names.
func openFDs(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	fds := make(map[string]string, len(ents))
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // closed since the directory was read
		}
		fds[e.Name()] = target
	}
	return fds
}

// newFDs lists the fds of now that were not open, naming the same thing,
// in before.
func newFDs(before, now map[string]string) []string {
	var added []string
	for fd, target := range now {
		if before[fd] != target {
			added = append(added, fd+" -> "+target)
		}
	}
	slices.Sort(added)
	return added
}
