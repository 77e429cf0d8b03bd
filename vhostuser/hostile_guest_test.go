package vhostuser_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// guestReq lays out the pieces of a virtio-blk request in fresh guest
// memory for hand-built chains: a 16-byte header, a data buffer and a
// status byte preset to 0xff.
type guestReq struct {
	f                  *frontend.Frontend
	hdr, data, status  int // offsets in f.Mem
	hdrGPA, dataGPA    uint64
	statusGPA, dataLen uint64
	keep               []byte // if set, data must still hold this afterwards
}

func newGuestReq(t *testing.T, f *frontend.Frontend, typ uint32, sector uint64, dataLen int) *guestReq {
	t.Helper()
	r := &guestReq{f: f, dataLen: uint64(dataLen)}
	var err error
	if r.hdr, err = f.Alloc(16, 16); err != nil {
		t.Fatal(err)
	}
	if r.data, err = f.Alloc(max(dataLen, 1), 16); err != nil {
		t.Fatal(err)
	}
	if r.status, err = f.Alloc(1, 1); err != nil {
		t.Fatal(err)
	}
	le.PutUint32(f.Mem[r.hdr:], typ)
	le.PutUint64(f.Mem[r.hdr+8:], sector)
	f.Mem[r.status] = 0xff
	r.hdrGPA, r.dataGPA, r.statusGPA = frontend.GPA(r.hdr), frontend.GPA(r.data), frontend.GPA(r.status)
	return r
}

// withData is the usual three-descriptor chain: the 16-byte header, the
// given data descriptor (chained on to descriptor 2), and the status byte,
// device-writable.
func (r *guestReq) withData(data frontend.RawDesc) []frontend.RawDesc {
	data.Flags, data.Next = data.Flags|fNext, 2
	return []frontend.RawDesc{
		{Addr: r.hdrGPA, Len: 16, Flags: fNext, Next: 1},
		data,
		{Addr: r.statusGPA, Len: 1, Flags: fWrite},
	}
}

// ownData is withData over r's own data buffer, all dataLen bytes, with
// the given flags besides NEXT.
func (r *guestReq) ownData(flags uint16) []frontend.RawDesc {
	return r.withData(frontend.RawDesc{Addr: r.dataGPA, Len: uint32(r.dataLen), Flags: flags})
}

// headerStatus is a chain with no data: a header descriptor of hdrLen
// bytes and the device-writable status byte.
func (r *guestReq) headerStatus(hdrLen uint32) []frontend.RawDesc {
	return []frontend.RawDesc{{Addr: r.hdrGPA, Len: hdrLen, Flags: fNext, Next: 1}, {Addr: r.statusGPA, Len: 1, Flags: fWrite}}
}

// laid returns a case's build: fresh buffers for a request of type typ at
// sector with n data bytes, the chain lay makes of them written at
// descriptors 0.., and head 0 made available.
func laid(typ uint32, sector uint64, n int, lay func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc) func(t *testing.T, f *frontend.Frontend, q *frontend.Queue) *guestReq {
	return func(t *testing.T, f *frontend.Frontend, q *frontend.Queue) *guestReq {
		t.Helper()
		r := newGuestReq(t, f, typ, sector, n)
		for i, d := range lay(t, f, r) {
			q.SetDesc(uint16(i), d)
		}
		q.PutAvail(0)
		return r
	}
}

// table writes descs as an indirect table in fresh guest memory, at an
// address offset by skew bytes from 16-byte alignment.
func table(t *testing.T, f *frontend.Frontend, skew int, descs ...frontend.RawDesc) uint64 {
	t.Helper()
	gpa, err := f.DescTable(skew, descs...)
	if err != nil {
		t.Fatal(err)
	}
	return gpa
}

const (
	fNext     = frontend.DescFlagNext
	fWrite    = frontend.DescFlagWrite
	fIndirect = frontend.DescFlagIndirect
)

// Each case is one hostile guest request on a fresh connection, built
// descriptor by descriptor (VIRTIO 1.2 §2.7 rules a driver MUST follow,
// §5.2.6 virtio-blk request rules; vhost-user.md §5.5). Afterwards the disk
// is untouched, the connection still serves a flush (unless the ring was
// broken), ends cleanly, and the server serves the next connection.
func TestHostileGuestRequestGetsErrorAndServerServesNext(t *testing.T) {
	s := startServer(t, 1)
	capacitySectors := uint64(testDiskSize / 512)
	const (
		noStatus  = -1 // the device must not write the status byte
		anyError  = -2 // IOERR or UNSUPP
		broken    = -3 // ring-level violation: QueueBroken
		statusOK  = 0
		unsupp    = 2
		lenNoData = 1 // used length of a completed request with no IN data
	)
	cases := []struct {
		name       string
		build      func(t *testing.T, f *frontend.Frontend, q *frontend.Queue) *guestReq // nil: no request
		wantStatus int
		wantLen    uint32
	}{
		{"descriptor address outside guest memory", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.withData(frontend.RawDesc{Addr: frontend.GPA(64 << 20), Len: 512})
		}), noStatus, 0},
		{"buffer running past the end of the region", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.withData(frontend.RawDesc{Addr: frontend.GPA(len(f.Mem) - 256), Len: 512})
		}), noStatus, 0},
		{"looping chain", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{{Addr: r.hdrGPA, Len: 16, Flags: fNext, Next: 1}, {Addr: r.dataGPA, Len: 512, Flags: fNext, Next: 0}}
		}), noStatus, 0},
		{"next index beyond the ring", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{{Addr: r.hdrGPA, Len: 16, Flags: fNext, Next: 40000}}
		}), noStatus, 0},
		{"chain longer than the ring (through an indirect table)", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			descs := []frontend.RawDesc{{Addr: r.hdrGPA, Len: 16, Flags: fNext, Next: 1}}
			for i := 1; i < 20; i++ {
				descs = append(descs, frontend.RawDesc{Addr: r.dataGPA, Len: 16, Flags: fNext, Next: uint16(i + 1)})
			}
			descs = append(descs, frontend.RawDesc{Addr: r.statusGPA, Len: 1, Flags: fWrite})
			return []frontend.RawDesc{{Addr: table(t, f, 0, descs...), Len: uint32(16 * len(descs)), Flags: fIndirect}}
		}), noStatus, 0},
		{"nested indirect table", laid(frontend.BlkTIn, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			inner := table(t, f, 0, r.headerStatus(16)...)
			outer := table(t, f, 0, frontend.RawDesc{Addr: inner, Len: 32, Flags: fIndirect})
			return []frontend.RawDesc{{Addr: outer, Len: 16, Flags: fIndirect}}
		}), noStatus, 0},
		{"indirect table length not a multiple of 16", laid(frontend.BlkTIn, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{{Addr: table(t, f, 0, r.headerStatus(16)...), Len: 24, Flags: fIndirect}}
		}), noStatus, 0},
		{"indirect descriptor with NEXT set too", laid(frontend.BlkTIn, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{
				{Addr: table(t, f, 0, r.headerStatus(16)...), Len: 32, Flags: fIndirect | fNext, Next: 1},
				{Addr: r.statusGPA, Len: 1, Flags: fWrite},
			}
		}), noStatus, 0},
		{"indirect table at an address not 16-aligned is still read correctly", laid(frontend.BlkTIn, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{{Addr: table(t, f, 8, r.ownData(fWrite)...), Len: 48, Flags: fIndirect}}
		}), statusOK, 512 + 1},
		{"device-readable buffer after a device-writable one", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return []frontend.RawDesc{
				{Addr: r.hdrGPA, Len: 16, Flags: fNext, Next: 1},
				{Addr: r.statusGPA, Len: 1, Flags: fWrite | fNext, Next: 2},
				{Addr: r.dataGPA, Len: 512},
			}
		}), noStatus, 0},
		{"request header shorter than 16 bytes", laid(frontend.BlkTOut, 0, 0, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.headerStatus(8)
		}), anyError, lenNoData},
		{"status byte in a device-readable buffer", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			descs := r.ownData(0)
			descs[2].Flags = 0
			return descs
		}), noStatus, 0},
		{"IN into device-readable buffers", laid(frontend.BlkTIn, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			copy(f.Mem[r.data:], pattern(5, 512))
			r.keep = pattern(5, 512)
			return r.ownData(0)
		}), anyError, lenNoData},
		{"OUT data in device-writable buffers", laid(frontend.BlkTOut, 0, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			copy(f.Mem[r.data:], pattern(6, 512))
			return r.ownData(fWrite)
		}), anyError, lenNoData},
		{"write past the capacity", laid(frontend.BlkTOut, capacitySectors-1, 1024, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			copy(f.Mem[r.data:], pattern(7, 1024))
			return r.ownData(0)
		}), anyError, lenNoData},
		{"write at a sector near 2^64", laid(frontend.BlkTOut, 1<<64-1, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.ownData(0)
		}), anyError, lenNoData},
		{"read whose byte offset wraps 2^64", laid(frontend.BlkTIn, 1<<55, 512, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.ownData(fWrite)
		}), anyError, lenNoData},
		{"write of a length not a multiple of 512", laid(frontend.BlkTOut, 0, 100, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.ownData(0)
		}), anyError, lenNoData},
		{"unknown request type", laid(0x7777, 0, 0, func(t *testing.T, f *frontend.Frontend, r *guestReq) []frontend.RawDesc {
			return r.headerStatus(16)
		}), unsupp, lenNoData},
		{"head index beyond the ring in the avail ring", func(t *testing.T, f *frontend.Frontend, q *frontend.Queue) *guestReq {
			q.PutAvail(300)
			return nil
		}, broken, 0},
		{"avail index jumping past the ring size", func(t *testing.T, f *frontend.Frontend, q *frontend.Queue) *guestReq {
			q.SetAvailIdx(q.AvailIdx() + 100)
			return nil
		}, broken, 0},
	}
	ctx := context.Background()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := s.dial(t)
			if err := f.Setup(smallSetup); err != nil {
				t.Fatal(err)
			}
			q := f.Queues[0]
			r := tc.build(t, f, q)
			if tc.wantStatus == broken {
				if b := <-s.ev.broken; b.queue != 0 {
					t.Fatalf("queue %d broken, want 0", b.queue)
				}
			} else {
				u, err := q.WaitUsed(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if u.ID != 0 || u.Len != tc.wantLen {
					t.Errorf("used {id %d len %d}, want {id 0 len %d}", u.ID, u.Len, tc.wantLen)
				}
				st := f.Mem[r.status]
				if r.keep != nil && !bytes.Equal(f.Mem[r.data:r.data+len(r.keep)], r.keep) {
					t.Error("the device wrote into a device-readable buffer")
				}
				switch {
				case tc.wantStatus == noStatus && st != 0xff:
					t.Errorf("status byte written (%d) where the device may not write", st)
				case tc.wantStatus == anyError && (st == statusOK || st == 0xff):
					t.Errorf("status %d, want an error status", st)
				case tc.wantStatus >= 0 && int(st) != tc.wantStatus:
					t.Errorf("status %d, want %d", st, tc.wantStatus)
				}
				// The queue goes on.
				r, err := q.Flush(ctx)
				mustOK(t, "flush after the hostile request", r, err)
			}
			if !bytes.Equal(s.disk.bytes(0, testDiskSize), make([]byte, testDiskSize)) {
				t.Error("the hostile request changed the disk")
			}
			f.Close()
			if c := s.waitClosed(t); c.err != nil {
				t.Errorf("connection ended with %v, want a clean end", c.err)
			}
			s.checkServes(t)
		})
	}
}
