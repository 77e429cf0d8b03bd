package vhostuser_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// pageSet is a set of guest-physical page numbers.
type pageSet map[uint64]bool

func pagesOf(gpa, n uint64) pageSet {
	s := pageSet{}
	for p := gpa / 4096; p <= (gpa+n-1)/4096; p++ {
		s[p] = true
	}
	return s
}

func (s pageSet) add(o pageSet) pageSet {
	maps.Copy(s, o)
	return s
}

func (s pageSet) String() string {
	keys := slices.Sorted(maps.Keys(s))
	return fmt.Sprintf("%#x", keys)
}

// dirtyPages lists the pages marked in log.
func dirtyPages(log *frontend.DirtyLog) pageSet {
	s := pageSet{}
	for i, b := range log.Bits {
		for bit := range 8 {
			if b&(1<<bit) != 0 {
				s[uint64(i)*8+uint64(bit)] = true
			}
		}
	}
	return s
}

func toGPA(uva uint64) uint64 { return uva - frontend.UserBase + frontend.GuestPhysBase }

// migrationLog sets up what QEMU does when a migration starts on running
// rings: SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with
// VHOST_VRING_F_LOG and the used ring's guest address.
func migrationLog(t *testing.T, f *frontend.Frontend) *frontend.DirtyLog {
	t.Helper()
	log, err := frontend.NewDirtyLog(frontend.GuestPhysBase + uint64(len(f.Mem)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(log.Close)
	if err := f.SetLogBase(log.Msg(), log.FD); err != nil {
		t.Fatalf("SET_LOG_BASE: %v", err)
	}
	setLogging(t, f, true)
	return log
}

func setLogging(t *testing.T, f *frontend.Frontend, on bool) {
	t.Helper()
	feats := f.Features &^ vhostuser.FeatureLogAll
	if on {
		feats |= vhostuser.FeatureLogAll
	}
	if err := f.SetFeatures(feats); err != nil {
		t.Fatalf("SET_FEATURES on running rings: %v", err)
	}
	for _, q := range f.Queues {
		a := q.Addr()
		if on {
			a.Flags, a.Log = 1, toGPA(a.Used)
		}
		if err := f.SetVringAddr(a); err != nil {
			t.Fatalf("SET_VRING_ADDR on a running ring: %v", err)
		}
	}
}

// pageReq lays out a request with its header, data and status on pages of
// their own; the data starts 100 bytes into a page and spans 4 pages.
type pageReq struct {
	hdr, data, status uint64 // guest-physical
	dataOff, statOff  int
}

func newPageReq(t *testing.T, f *frontend.Frontend, typ uint32) pageReq {
	t.Helper()
	hdr, err := f.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	data, err := f.Alloc(4*4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	status, err := f.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	le.PutUint32(f.Mem[hdr:], typ)
	le.PutUint64(f.Mem[hdr+8:], 16)
	f.Mem[status] = 0xff
	return pageReq{hdr: frontend.GPA(hdr), data: frontend.GPA(data + 100), status: frontend.GPA(status), dataOff: data + 100, statOff: status}
}

const reqLen = 3 * 4096

func (r pageReq) run(t *testing.T, f *frontend.Frontend, q *frontend.Queue, write bool) {
	t.Helper()
	if _, err := q.Publish([]frontend.Desc{{Addr: r.hdr, Len: 16}, {Addr: r.data, Len: reqLen, Write: !write}, {Addr: r.status, Len: 1, Write: true}}); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	if _, err := q.WaitUsed(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := f.Mem[r.statOff]; st != 0 {
		t.Fatalf("status %d", st)
	}
}

func TestDirtyLogMarksExactlyThePagesTheDeviceWrites(t *testing.T) {
	for _, packed := range []bool{false, true} {
		t.Run(fmt.Sprintf("packed=%t", packed), func(t *testing.T) {
			s := startServer(t, 1)
			f := s.connect(t, frontend.Options{Packed: packed, Features: ^uint64(vhostuser.FeatureLogAll), MemSize: 16 << 20})
			q := f.Queues[0]
			a := q.Addr()
			var ring pageSet
			if packed {
				// Used descriptors are written back into the
				// descriptor ring; the device area holds its flags.
				ring = pagesOf(toGPA(a.Desc), 16*uint64(q.Size)).add(pagesOf(toGPA(a.Used), 4))
			} else {
				ring = pagesOf(toGPA(a.Used), 6+8*uint64(q.Size))
			}
			log := migrationLog(t, f)

			rd := newPageReq(t, f, frontend.BlkTIn)
			log.Clear()
			rd.run(t, f, q, false)
			want := pagesOf(rd.data, reqLen).add(pagesOf(rd.status, 1)).add(ring)
			if got := dirtyPages(log); !maps.Equal(got, want) {
				t.Fatalf("after a read, dirty pages %v; want %v (data, status, ring)", got, want)
			}

			wr := newPageReq(t, f, frontend.BlkTOut)
			log.Clear()
			wr.run(t, f, q, true)
			want = pagesOf(wr.status, 1).add(ring)
			if got := dirtyPages(log); !maps.Equal(got, want) {
				t.Fatalf("after a write, dirty pages %v; want %v (status, ring)", got, want)
			}

			// Logging off again (migration cancelled): nothing marked.
			setLogging(t, f, false)
			log.Clear()
			newPageReq(t, f, frontend.BlkTIn).run(t, f, q, false)
			if got := dirtyPages(log); len(got) != 0 {
				t.Fatalf("LOG_ALL off: dirty pages %v", got)
			}
		})
	}
}

func TestDirtyLogWithoutLogAllMarksNothing(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{Features: ^uint64(vhostuser.FeatureLogAll)})
	log, err := frontend.NewDirtyLog(frontend.GuestPhysBase + uint64(len(f.Mem)))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	if err := f.SetLogBase(log.Msg(), log.FD); err != nil {
		t.Fatal(err)
	}
	newPageReq(t, f, frontend.BlkTIn).run(t, f, f.Queues[0], false)
	if got := dirtyPages(log); len(got) != 0 {
		t.Fatalf("dirty pages %v without LOG_ALL", got)
	}
}

// A front-end that shrinks its log under us breaks the queue that faults
// on it, not the daemon.
func TestTruncatedDirtyLogBreaksTheQueueOnly(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{Features: ^uint64(vhostuser.FeatureLogAll)})
	log := migrationLog(t, f)
	if err := unix.Ftruncate(log.FD, 0); err != nil {
		t.Fatal(err)
	}
	q := f.Queues[0]
	r := newPageReq(t, f, frontend.BlkTIn)
	if _, err := q.Publish([]frontend.Desc{{Addr: r.hdr, Len: 16}, {Addr: r.data, Len: 4096, Write: true}, {Addr: r.status, Len: 1, Write: true}}); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	if ev := <-s.ev.broken; !errors.Is(ev.err, vhostuser.ErrGuestMemory) {
		t.Fatalf("QueueBroken = %v, want ErrGuestMemory", ev.err)
	}
	f.Close()
	s.waitClosed(t)
	f = s.connect(t, frontend.Options{})
	if res, err := f.Queues[0].Read(context.Background(), 0, 512); err != nil || res.Status != 0 {
		t.Fatalf("next connection: %v, status %d", err, res.Status)
	}
}

// Each hostile dirty-log message ends the connection with the error named;
// the server serves the next one.
func TestHostileDirtyLogMessagesEndTheConnectionOnly(t *testing.T) {
	s := startServer(t, 1)
	memfd := func(size int64) int {
		fd, err := unix.MemfdCreate("log", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	regular, err := os.CreateTemp(t.TempDir(), "logfd")
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	noLogShm := ^uint64(vhostuser.ProtoLogShmfd)
	for _, tc := range []struct {
		name  string
		proto uint64
		send  func(f *frontend.Frontend) error
		want  error
	}{
		{"SET_LOG_BASE size 0", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{}, memfd(4096))
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE larger than its file", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: 8192}, memfd(4096))
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE offset past its file", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: 4096, MmapOffset: 4096}, memfd(4096))
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE offset+size wraps", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: 8192, MmapOffset: ^uint64(0) - 4095}, memfd(4096))
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE above the size limit", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: vhostuser.MaxLogSize + 1}, memfd(vhostuser.MaxLogSize+1))
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE with an eventfd", 0, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: 8}, efd)
		}, vhostuser.ErrInvalidMessage},
		{"SET_LOG_BASE without LOG_SHMFD", noLogShm, func(f *frontend.Frontend) error {
			return f.SetLogBase(vhostuser.LogMsg{MmapSize: 4096}, memfd(4096))
		}, vhostuser.ErrState},
		{"SET_LOG_FD with a regular file", 0, func(f *frontend.Frontend) error {
			_, err := f.Call(vhostuser.ReqSetLogFD, nil, int(regular.Fd()))
			return err
		}, vhostuser.ErrInvalidMessage},
		{"SET_VRING_ADDR moving a running ring", 0, func(f *frontend.Frontend) error {
			a := f.Queues[0].Addr()
			a.Flags, a.Used = 1, a.Used+4096
			return f.SetVringAddr(a)
		}, vhostuser.ErrState},
		{"SET_VRING_ADDR unknown flag", 0, func(f *frontend.Frontend) error {
			a := f.Queues[0].Addr()
			a.Flags = 2
			return f.SetVringAddr(a)
		}, vhostuser.ErrInvalidMessage},
		{"SET_FEATURES changing more than LOG_ALL on running rings", 0, func(f *frontend.Frontend) error {
			return f.SetFeatures((f.Features | vhostuser.FeatureLogAll) &^ vhostuser.FeatureEventIdx)
		}, vhostuser.ErrState},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := s.connect(t, frontend.Options{Features: ^uint64(vhostuser.FeatureLogAll), ProtocolFeatures: tc.proto})
			if err := tc.send(f); err == nil {
				t.Fatal("accepted")
			}
			if ev := s.waitClosed(t); !errors.Is(ev.err, tc.want) {
				t.Fatalf("connection ended with %v, want %v", ev.err, tc.want)
			}
		})
	}
	f := s.connect(t, frontend.Options{})
	if res, err := f.Queues[0].Read(context.Background(), 0, 512); err != nil || res.Status != 0 {
		t.Fatalf("next connection: %v, status %d", err, res.Status)
	}
}

// GET_VRING_BASE answers only after the requests in flight completed, so
// their pages are in the log before the front-end syncs it.
func TestGetVringBaseAfterLoggedRequestsLeavesNothingUnmarked(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{Features: ^uint64(vhostuser.FeatureLogAll), MemSize: 16 << 20})
	log := migrationLog(t, f)
	q := f.Queues[0]
	var reqs []pageReq
	for range 4 {
		r := newPageReq(t, f, frontend.BlkTIn)
		reqs = append(reqs, r)
		if _, err := q.Publish([]frontend.Desc{{Addr: r.hdr, Len: 16}, {Addr: r.data, Len: reqLen, Write: true}, {Addr: r.status, Len: 1, Write: true}}); err != nil {
			t.Fatal(err)
		}
	}
	q.Kick()
	base, err := f.GetVringBase(0)
	if err != nil {
		t.Fatal(err)
	}
	done, n := pageSet{}, 0
	for _, r := range reqs {
		if f.Mem[r.statOff] == 0 {
			done.add(pagesOf(r.data, reqLen)).add(pagesOf(r.status, 1))
			n++
		}
	}
	// Every request the ring took (base) completed before the reply.
	if uint32(n) != base {
		t.Fatalf("GET_VRING_BASE = %d with %d requests completed", base, n)
	}
	got := dirtyPages(log)
	for p := range done {
		if !got[p] {
			t.Fatalf("page %#x of a completed request not in the log (base %d)", p, base)
		}
	}
}

// BenchmarkWorkerDirtyLog measures a 4 KiB read through a whole session
// with dirty logging off (LOG_ALL not acked: one nil test per chain and
// per batch) and on (data, status and used ring pages marked).
func BenchmarkWorkerDirtyLog(b *testing.B) {
	for _, on := range []bool{false, true} {
		b.Run(fmt.Sprintf("logging=%t", on), func(b *testing.B) {
			s := startServerBench(b, newMemDisk(testDiskSize))
			f, err := frontend.Dial(s)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			if err := f.Setup(frontend.Options{Features: ^uint64(vhostuser.FeatureLogAll)}); err != nil {
				b.Fatal(err)
			}
			if on {
				log, err := frontend.NewDirtyLog(frontend.GuestPhysBase + uint64(len(f.Mem)))
				if err != nil {
					b.Fatal(err)
				}
				defer log.Close()
				if err := f.SetLogBase(log.Msg(), log.FD); err != nil {
					b.Fatal(err)
				}
				if err := f.SetFeatures(f.Features | vhostuser.FeatureLogAll); err != nil {
					b.Fatal(err)
				}
			}
			q := f.Queues[0]
			ctx := context.Background()
			b.SetBytes(4096)
			for b.Loop() {
				if res, err := q.Read(ctx, 0, 4096); err != nil || res.Status != 0 {
					b.Fatalf("read: %v, status %d", err, res.Status)
				}
			}
		})
	}
}

// startServerBench runs Serve of d on one queue on a fresh socket for a
// benchmark and returns the socket path.
func startServerBench(b *testing.B, d blk.Disk) string {
	b.Helper()
	path := b.TempDir() + "/s.sock"
	ln, err := vhostuser.Listen(path)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: d, NumQueues: 1})
	}()
	b.Cleanup(func() { cancel(); <-done })
	return path
}
