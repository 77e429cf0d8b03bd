package vhostuser_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// dimm is a hot-plugged memory region: its own memfd, placed above 4 GiB
// in guest-physical space and elsewhere in the front-end's address space.
type dimm struct {
	fd  int
	mem []byte
	reg vhostuser.MemRegion
}

const (
	dimmGPA = 1 << 32
	dimmUVA = 0x7f5600000000
)

func newDimm(t *testing.T, gpa uint64, size int) *dimm {
	t.Helper()
	fd, err := unix.MemfdCreate("test-dimm", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m); unix.Close(fd) })
	return &dimm{fd: fd, mem: m, reg: vhostuser.MemRegion{GuestPhysAddr: gpa, Size: uint64(size), UserAddr: dimmUVA + gpa - dimmGPA}}
}

// readInto publishes a one-page read of sector into the guest-physical
// buffer at gpa (header and status in the main region) and returns the
// used element and the status byte.
func readInto(t *testing.T, f *frontend.Frontend, q *frontend.Queue, sector, gpa uint64) (frontend.Used, byte) {
	t.Helper()
	r := newGuestReq(t, f, frontend.BlkTIn, sector, 0)
	if _, err := q.Publish([]frontend.Desc{{Addr: r.hdrGPA, Len: 16}, {Addr: gpa, Len: 4096, Write: true}, {Addr: r.statusGPA, Len: 1, Write: true}}); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	u, err := q.WaitUsed(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return u, f.Mem[r.status]
}

func TestHotpluggedRegionServesIOAndIsNeverTouchedAfterRemoval(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	if f.ProtocolFeatures&vhostuser.ProtoConfigureMemSlots == 0 {
		t.Fatal("CONFIGURE_MEM_SLOTS not offered")
	}
	if n, err := f.GetMaxMemSlots(); err != nil || n != vhostuser.MaxMemSlots {
		t.Fatalf("GET_MAX_MEM_SLOTS = %d, %v; want %d", n, err, vhostuser.MaxMemSlots)
	}
	// Through WriteVec (the disk's lock): the ring's worker is running.
	fill := make([]byte, 4096)
	for i := range fill {
		fill[i] = byte(i*7 + 1)
	}
	must(t, s.disk.WriteVec([][]byte{fill}, 8*512))
	want := s.disk.bytes(8*512, 4096)
	d := newDimm(t, dimmGPA, 1<<20)
	if err := f.AddMemReg(d.reg, d.fd); err != nil {
		t.Fatalf("ADD_MEM_REG: %v", err)
	}
	q := f.Queues[0]
	if u, st := readInto(t, f, q, 8, dimmGPA+3*4096); st != 0 || u.Len != 4097 {
		t.Fatalf("read into the added region: status %d, used len %d", st, u.Len)
	}
	if !bytes.Equal(d.mem[3*4096:4*4096], want) {
		t.Fatal("data read into the added region differs from the disk")
	}

	if err := f.RemMemReg(d.reg); err != nil {
		t.Fatalf("REM_MEM_REG: %v", err)
	}
	for i := range d.mem {
		d.mem[i] = 0xaa
	}
	u, st := readInto(t, f, q, 8, dimmGPA+3*4096)
	if u.Len != 0 || st != 0xff {
		t.Fatalf("read into the removed region: used len %d, status %#x; want 0 and untouched", u.Len, st)
	}
	if i := firstNot(d.mem, 0xaa); i >= 0 {
		t.Fatalf("removed region written at %d", i)
	}
	if err := <-s.ev.failed; !errors.Is(err, virtqueue.ErrInvalidChain) {
		t.Fatalf("RequestFailed = %v, want ErrInvalidChain", err)
	}
	// Plugged again (QEMU re-adds a DIMM at the same place): served again.
	if err := f.AddMemReg(d.reg, d.fd); err != nil {
		t.Fatalf("ADD_MEM_REG again: %v", err)
	}
	if u, st := readInto(t, f, q, 8, dimmGPA); st != 0 || u.Len != 4097 || !bytes.Equal(d.mem[:4096], want) {
		t.Fatalf("read into the re-added region: status %d, used len %d", st, u.Len)
	}
}

// While requests into a region run, REM_MEM_REG waits for the batch in
// flight; after its reply no request reads or writes the region: the
// bytes stay as the front-end put them, whatever was in flight.
func TestNoRequestTouchesARegionAfterRemMemRegIsAnswered(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{MaxInflight: 8})
	d := newDimm(t, dimmGPA, 1<<20)
	if err := f.AddMemReg(d.reg, d.fd); err != nil {
		t.Fatal(err)
	}
	// Through WriteVec (the disk's lock): the ring's worker is running.
	fill := make([]byte, 4096)
	for i := range fill {
		fill[i] = byte(i + 3)
	}
	must(t, s.disk.WriteVec([][]byte{fill}, 0))
	q := f.Queues[0]
	stop := make(chan struct{})
	done := make(chan int)
	go func() {
		// Keep 8 reads into the region in flight until told to stop,
		// then reap what is still outstanding.
		hdrs := make([]*guestReq, 8)
		for i := range hdrs {
			hdrs[i] = newGuestReq(t, f, frontend.BlkTIn, 0, 0)
		}
		publish := func(i int) {
			r := hdrs[i]
			if _, err := q.Publish([]frontend.Desc{{Addr: r.hdrGPA, Len: 16}, {Addr: dimmGPA + uint64(i)*4096, Len: 4096, Write: true}, {Addr: r.statusGPA, Len: 1, Write: true}}); err != nil {
				t.Error(err)
			}
		}
		for i := range hdrs {
			publish(i)
		}
		q.Kick()
		outstanding, n := 8, 0
		for outstanding > 0 {
			u, err := q.WaitUsed(context.Background())
			if err != nil {
				t.Error(err)
				break
			}
			outstanding--
			n++
			select {
			case <-stop:
			default:
				publish(int(n % 8))
				outstanding++
				q.Kick()
			}
			_ = u
		}
		done <- n
	}()
	// Let some reads complete into the region first.
	for i := range 200 {
		_ = i
		if d.mem[0] == 3 {
			break
		}
		unix.Nanosleep(&unix.Timespec{Nsec: 1e6}, nil)
	}
	if err := f.RemMemReg(d.reg); err != nil {
		t.Fatal(err)
	}
	for i := range d.mem {
		d.mem[i] = 0xaa
	}
	close(stop)
	n := <-done
	if i := firstNot(d.mem, 0xaa); i >= 0 {
		t.Fatalf("region written at offset %d after REM_MEM_REG was answered (%d requests)", i, n)
	}
}

func TestRefusedRegionRemovalsKeepTheSessionAndTheTable(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	d := newDimm(t, dimmGPA, 1<<20)
	if err := f.AddMemReg(d.reg, d.fd); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		r    vhostuser.MemRegion
	}{
		{"never added", vhostuser.MemRegion{GuestPhysAddr: 1 << 40, Size: 4096, UserAddr: 1 << 44}},
		{"size differs", vhostuser.MemRegion{GuestPhysAddr: d.reg.GuestPhysAddr, Size: 4096, UserAddr: d.reg.UserAddr}},
		{"user address differs", vhostuser.MemRegion{GuestPhysAddr: d.reg.GuestPhysAddr, Size: d.reg.Size, UserAddr: d.reg.UserAddr + 4096}},
		{"the region the ring lives in", f.Region()},
	} {
		if err := f.RemMemReg(tc.r); !errors.Is(err, frontend.ErrNack) {
			t.Fatalf("%s: REM_MEM_REG = %v, want refused", tc.name, err)
		}
	}
	// Both regions still serve.
	if u, st := readInto(t, f, f.Queues[0], 0, dimmGPA); st != 0 || u.Len != 4097 {
		t.Fatalf("read into the kept region: status %d, len %d", st, u.Len)
	}
	if res, err := f.Queues[0].Read(context.Background(), 0, 512); err != nil || res.Status != 0 {
		t.Fatalf("read into the main region: %v, status %d", err, res.Status)
	}
	// The older QEMU's REM_MEM_REG with the region's fd is accepted.
	if err := f.RemMemReg(d.reg, d.fd); err != nil {
		t.Fatalf("REM_MEM_REG with an fd: %v", err)
	}
}

// Each hostile ADD_MEM_REG ends the connection; the server serves the next.
func TestHostileAddMemRegEndsTheConnectionOnly(t *testing.T) {
	s := startServer(t, 1)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	small := newDimm(t, dimmGPA, 4096)
	for _, tc := range []struct {
		name string
		reg  func(f *frontend.Frontend) (vhostuser.MemRegion, int)
	}{
		{"overlaps the main region in guest space", func(f *frontend.Frontend) (vhostuser.MemRegion, int) {
			return vhostuser.MemRegion{GuestPhysAddr: frontend.GuestPhysBase + 4096, Size: 4096, UserAddr: dimmUVA}, small.fd
		}},
		{"overlaps the main region in user space", func(f *frontend.Frontend) (vhostuser.MemRegion, int) {
			return vhostuser.MemRegion{GuestPhysAddr: dimmGPA, Size: 4096, UserAddr: frontend.UserBase + 8192}, small.fd
		}},
		{"larger than its file", func(f *frontend.Frontend) (vhostuser.MemRegion, int) {
			return vhostuser.MemRegion{GuestPhysAddr: dimmGPA, Size: 8192, UserAddr: dimmUVA}, small.fd
		}},
		{"offset past its file", func(f *frontend.Frontend) (vhostuser.MemRegion, int) {
			return vhostuser.MemRegion{GuestPhysAddr: dimmGPA, Size: 4096, UserAddr: dimmUVA, MmapOffset: 4096}, small.fd
		}},
		{"an eventfd", func(f *frontend.Frontend) (vhostuser.MemRegion, int) {
			return vhostuser.MemRegion{GuestPhysAddr: dimmGPA, Size: 4096, UserAddr: dimmUVA}, efd
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := s.connect(t, frontend.Options{})
			r, fd := tc.reg(f)
			if err := f.AddMemReg(r, fd); err == nil {
				t.Fatal("ADD_MEM_REG accepted")
			}
			if ev := s.waitClosed(t); !errors.Is(ev.err, vhostuser.ErrGuestMemory) {
				t.Fatalf("connection ended with %v, want ErrGuestMemory", ev.err)
			}
		})
	}
	// Protocol feature not negotiated.
	f := s.connect(t, frontend.Options{ProtocolFeatures: ^uint64(vhostuser.ProtoConfigureMemSlots)})
	if err := f.AddMemReg(small.reg, small.fd); err == nil {
		t.Fatal("ADD_MEM_REG accepted without CONFIGURE_MEM_SLOTS")
	}
	if ev := s.waitClosed(t); !errors.Is(ev.err, vhostuser.ErrState) {
		t.Fatalf("connection ended with %v, want ErrState", ev.err)
	}
	// The server still serves.
	f = s.connect(t, frontend.Options{})
	if res, err := f.Queues[0].Read(context.Background(), 0, 512); err != nil || res.Status != 0 {
		t.Fatalf("next connection: %v, status %d", err, res.Status)
	}
}

func TestMoreRegionsThanMaxMemSlotsEndTheConnection(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	d := newDimm(t, dimmGPA, 4096)
	// The main region is slot 1; 508 more fill the table.
	for i := range vhostuser.MaxMemSlots - 1 {
		r := vhostuser.MemRegion{GuestPhysAddr: dimmGPA + uint64(i)*4096, Size: 4096, UserAddr: dimmUVA + uint64(i)*4096}
		if err := f.AddMemReg(r, d.fd); err != nil {
			t.Fatalf("ADD_MEM_REG %d: %v", i, err)
		}
	}
	if res, err := f.Queues[0].Read(context.Background(), 0, 512); err != nil || res.Status != 0 {
		t.Fatalf("read with %d regions: %v, status %d", vhostuser.MaxMemSlots, err, res.Status)
	}
	r := vhostuser.MemRegion{GuestPhysAddr: dimmGPA + 1<<30, Size: 4096, UserAddr: dimmUVA + 1<<30}
	if err := f.AddMemReg(r, d.fd); err == nil {
		t.Fatal("region 510 accepted")
	}
	if ev := s.waitClosed(t); !errors.Is(ev.err, vhostuser.ErrGuestMemory) {
		t.Fatalf("connection ended with %v, want ErrGuestMemory", ev.err)
	}
}

// firstNot returns the index of the first byte of b that is not v, or -1.
func firstNot(b []byte, v byte) int {
	for i, x := range b {
		if x != v {
			return i
		}
	}
	return -1
}
