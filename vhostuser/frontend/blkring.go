package frontend

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// BlkRing drives a Queue as a virtio-blk driver does under load: a fixed
// number of request slots, each with its own three descriptors (header,
// data, status) written once, so submitting a request only rewrites the
// header, one descriptor's flags and length, and an avail entry. Requests
// are staged with Prepare and made visible together with Publish (one idx
// store, at most one kick); completions are reaped in batches with Reap.
// Nothing allocates after NewBlkRing.
//
// A BlkRing takes over its Queue: do not mix it with Submit, Do or
// Publish on the same Queue. Like a Queue it is driven by one goroutine.
type BlkRing struct {
	q        *Queue
	mem      []byte
	eventIdx bool
	n        int // slots

	hdrOff  []int // per slot: 16-byte header, then the status byte at +16
	dataOff []int // per slot: page-aligned data buffer of maxIO bytes
	maxIO   int

	staged uint16 // avail entries written since the last Publish

	kickFD, callFD int // the Queue's eventfds (blocking mode after StartQueue)
}

// SlotsFor returns how many request slots fit a ring of the given size
// (three descriptors each).
func SlotsFor(size uint16) int { return int(size) / 3 }

// NewBlkRing lays out slots request slots of maxIO-byte buffers in guest
// memory for q, which must be fresh (nothing published yet) and need not
// be started yet. slots must be at most SlotsFor(q.Size).
func (f *Frontend) NewBlkRing(q *Queue, slots, maxIO int) (*BlkRing, error) {
	if q.packed {
		return nil, fmt.Errorf("frontend: BlkRing drives split rings only; queue %d is packed", q.Index)
	}
	if slots < 1 || slots > SlotsFor(q.Size) {
		return nil, fmt.Errorf("frontend: %d request slots do not fit a ring of %d descriptors", slots, q.Size)
	}
	if maxIO < 512 || maxIO%512 != 0 || maxIO > 1<<30 {
		return nil, fmt.Errorf("frontend: request buffer of %d bytes is not a multiple of 512 in 512..1GiB", maxIO)
	}
	if q.availIdx != 0 || len(q.free) != int(q.Size) {
		return nil, fmt.Errorf("frontend: queue %d already in use", q.Index)
	}
	r := &BlkRing{q: q, mem: f.Mem, eventIdx: f.Features&vhostuser.FeatureEventIdx != 0, n: slots, maxIO: maxIO,
		kickFD: int(q.kick.Fd()), callFD: int(q.call.Fd())}
	hdrs, err := f.Alloc(32*slots, 64)
	if err != nil {
		return nil, err
	}
	for i := 0; i < slots; i++ {
		d, err := f.Alloc(maxIO, 4096)
		if err != nil {
			return nil, err
		}
		r.hdrOff = append(r.hdrOff, hdrs+32*i)
		r.dataOff = append(r.dataOff, d)
		h := uint16(3 * i)
		q.SetDesc(h, RawDesc{Addr: GPA(hdrs + 32*i), Len: blkHeaderSize, Flags: DescFlagNext, Next: h + 1})
		q.SetDesc(h+1, RawDesc{Addr: GPA(d), Len: uint32(maxIO), Flags: DescFlagNext, Next: h + 2})
		q.SetDesc(h+2, RawDesc{Addr: GPA(hdrs + 32*i + blkHeaderSize), Len: 1, Flags: DescFlagWrite})
	}
	q.free = q.free[:0] // the descriptors now belong to the slots
	return r, nil
}

// Slots is the number of request slots.
func (r *BlkRing) Slots() int { return r.n }

// EventIdx reports whether VIRTIO_RING_F_EVENT_IDX suppresses kicks and
// interrupts on this ring.
func (r *BlkRing) EventIdx() bool { return r.eventIdx }

// Data is slot's data buffer (maxIO bytes): fill it before Prepare for a
// write, read it after the completion of a read.
func (r *BlkRing) Data(slot int) []byte {
	off := r.dataOff[slot]
	return r.mem[off : off+r.maxIO : off+r.maxIO]
}

// Status is the status byte the device wrote for slot's last request
// (0xff: not written).
func (r *BlkRing) Status(slot int) uint8 { return r.mem[r.hdrOff[slot]+blkHeaderSize] }

// Prepare stages a request of type typ (BlkTIn, BlkTOut, BlkTFlush) for n
// bytes (at most the ring's maxIO) at sector in slot; it becomes visible
// to the device at the next Publish. slot must not be in flight.
func (r *BlkRing) Prepare(slot int, typ uint32, sector uint64, n int) {
	q, m := r.q, r.mem
	h := r.hdrOff[slot]
	le.PutUint32(m[h:], typ)
	le.PutUint32(m[h+4:], 0)
	le.PutUint64(m[h+8:], sector)
	m[h+blkHeaderSize] = 0xff
	head := uint16(3 * slot)
	hd := q.descOff + 16*int(head)
	if typ == BlkTFlush || n == 0 {
		// Header straight to status: a two-descriptor chain.
		le.PutUint16(m[hd+14:], head+2)
	} else {
		le.PutUint16(m[hd+14:], head+1)
		flags := uint16(DescFlagNext)
		if typ == BlkTIn {
			flags |= DescFlagWrite
		}
		dd := hd + 16
		le.PutUint32(m[dd+8:], uint32(min(n, r.maxIO)))
		le.PutUint16(m[dd+12:], flags)
	}
	slotIdx := q.availOff + 4 + 2*int((q.availIdx+r.staged)%q.Size)
	le.PutUint16(m[slotIdx:], head) // plain store: published by the idx store in Publish
	r.staged++
}

// Publish makes the staged requests visible with one avail idx store and
// kicks the device unless it suppressed the kick (EVENT_IDX avail_event or
// the NO_NOTIFY flag). It reports whether it kicked.
func (r *BlkRing) Publish() bool {
	if r.staged == 0 {
		return false
	}
	q := r.q
	old := q.availIdx
	q.availIdx += r.staged
	r.staged = 0
	// The avail entries were written before this sequentially consistent
	// store (VIRTIO 1.2 §2.7.13.1 steps 3-4).
	store16(r.mem, q.availOff+2, q.availIdx)
	var kick bool
	if r.eventIdx {
		ev := load16(r.mem, q.usedOff+4+8*int(q.Size))
		kick = uint16(q.availIdx-ev-1) < uint16(q.availIdx-old) // vring_need_event
	} else {
		kick = load16(r.mem, q.usedOff)&usedFlagNoNotify == 0
	}
	if kick {
		var one [8]byte
		le.PutUint64(one[:], 1)
		_, _ = unix.Write(r.kickFD, one[:]) // EAGAIN: the counter is already non-zero
	}
	return kick
}

// Reap copies up to len(slots) completed slot numbers into slots and
// returns how many, with the used lengths in lens (same length as slots,
// or nil). Entries naming a head that is not a slot's are reported as -1.
// Reap leaves used_event alone: while the driver keeps reaping without
// sleeping the device need not interrupt it; Wait re-arms.
func (r *BlkRing) Reap(slots []int, lens []uint32) int {
	q, m := r.q, r.mem
	used := load16(m, q.usedOff+2)
	n := 0
	for q.usedSeen != used && n < len(slots) {
		e := q.usedOff + 4 + 8*int(q.usedSeen%q.Size)
		id := le.Uint32(m[e:])
		s := -1
		if id%3 == 0 && id/3 < uint32(r.n) {
			s = int(id / 3)
		}
		slots[n] = s
		if lens != nil {
			lens[n] = le.Uint32(m[e+4:])
		}
		n++
		q.usedSeen++
	}
	return n
}

// Pending reports whether completions are waiting to be reaped.
func (r *BlkRing) Pending() bool { return load16(r.mem, r.q.usedOff+2) != r.q.usedSeen }

// Wait blocks until the device signals the call eventfd or timeoutMS
// passes (-1: no timeout), and consumes the signal. It returns at once if
// completions are already pending. A timeout is not an error.
func (r *BlkRing) Wait(timeoutMS int) error {
	if r.eventIdx {
		// Interrupt at the next completion; then look again so one that
		// landed before the store is not slept through (§2.7.10).
		store16(r.mem, r.q.availOff+4+2*int(r.q.Size), r.q.usedSeen)
	}
	if r.Pending() {
		return nil
	}
	fd := r.callFD
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(pfd, timeoutMS)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll call eventfd: %w", err)
		}
		if n == 0 {
			return nil
		}
		var b [8]byte
		if _, err := unix.Read(fd, b[:]); err != nil && err != unix.EAGAIN {
			return fmt.Errorf("read call eventfd: %w", err)
		}
		return nil
	}
}
