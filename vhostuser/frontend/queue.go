package frontend

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

var le = binary.LittleEndian

var (
	aLongTimeAgo = time.Unix(1, 0)
	noDeadline   = time.Time{}
)

// Split ring flags (VIRTIO 1.2 §2.7.5, §2.7.10), for RawDesc.
const (
	DescFlagNext     = 1
	DescFlagWrite    = 2
	DescFlagIndirect = 4

	usedFlagNoNotify = 1
)

// virtio-blk request types and status (VIRTIO 1.2 §5.2.6).
const (
	BlkTIn    = 0
	BlkTOut   = 1
	BlkTFlush = 4
	BlkTGetID = 8

	BlkSOK     = 0
	BlkSIOErr  = 1
	BlkSUnsupp = 2

	blkHeaderSize = 16
	BlkIDLen      = 20
)

// ErrNoSlot: all descriptors or request slots of the queue are in use.
var ErrNoSlot = errors.New("frontend: queue full")

// Desc is one buffer of a chain for Publish.
type Desc struct {
	Addr  uint64 // guest-physical
	Len   uint32
	Write bool // device-writable
}

// RawDesc is a struct virtq_desc as written to the table, for hostile tests.
type RawDesc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// Used is one used-ring element.
type Used struct{ ID, Len uint32 }

// Queue is the driver side of one split ring in the fake guest memory.
type Queue struct {
	f     *Frontend
	Index int
	Size  uint16

	descOff, availOff, usedOff int
	kick, call                 *os.File

	availIdx uint16 // next avail.idx to publish
	usedSeen uint16 // used entries consumed
	free     []uint16
	chains   [][]uint16 // descriptors of the chain headed by each index

	// blk request slots: header, data (maxIO) and status per slot.
	slotOff  []int
	freeSlot []int
	slotOf   map[uint16]int
	maxIO    int
	stash    map[uint16]Used

	// Packed ring state (VIRTIO_F_RING_PACKED negotiated before the queue
	// was laid out; see packed.go). availIdx is then the next ring slot.
	packed    bool
	availWrap bool
	usedPos   uint16 // next slot the device writes a used descriptor to
	usedWrap  bool
	freeDescs int
	pnum      []uint16 // ring descriptors of the chain with each buffer id
	startBase uint32   // base sent at the last start (QEMU resends it after a crash)
}

// NewQueue lays out ring index of the given size in guest memory with
// kick and call eventfds and inflight request slots of maxIO bytes.
func (f *Frontend) NewQueue(index int, size uint16, inflight, maxIO int) (q *Queue, err error) {
	if size == 0 || size&(size-1) != 0 || size > vhostuser.MaxQueueSize {
		return nil, fmt.Errorf("frontend: queue size %d not a power of two", size)
	}
	n := int(size)
	q = &Queue{f: f, Index: index, Size: size, maxIO: maxIO, chains: make([][]uint16, n),
		slotOf: map[uint16]int{}, stash: map[uint16]Used{}}
	if f.Features&vhostuser.FeatureRingPacked != 0 {
		if err := q.layoutPacked(inflight); err != nil {
			return nil, err
		}
		return q, nil
	}
	// The trailing 2 bytes of padding keep used_event/avail_event inside
	// whole 32-bit words (ring_unsafe.go).
	if q.descOff, err = f.Alloc(16*n, 4096); err != nil {
		return nil, err
	}
	if q.availOff, err = f.Alloc(6+2*n+2, 4); err != nil {
		return nil, err
	}
	if q.usedOff, err = f.Alloc(6+8*n+2, 4096); err != nil {
		return nil, err
	}
	if err := q.allocSlots(inflight); err != nil {
		return nil, err
	}
	// Rings may be re-used memory: start from a clean state.
	clear(f.Mem[q.availOff : q.availOff+6+2*n+2])
	clear(f.Mem[q.usedOff : q.usedOff+6+8*n+2])
	if err := q.openFDs(); err != nil {
		return nil, err
	}
	return q, nil
}

// allocSlots reserves the blk request slots and fills the free list of
// descriptor indices (split) or buffer ids (packed).
func (q *Queue) allocSlots(inflight int) error {
	for i := 0; i < inflight; i++ {
		off, err := q.f.Alloc(blkHeaderSize+q.maxIO+1, 16)
		if err != nil {
			return err
		}
		q.slotOff = append(q.slotOff, off)
		q.freeSlot = append(q.freeSlot, i)
	}
	for i := int(q.Size) - 1; i >= 0; i-- {
		q.free = append(q.free, uint16(i))
	}
	return nil
}

// openFDs creates the kick and call eventfds and registers the queue.
func (q *Queue) openFDs() (err error) {
	if q.kick, err = newEventFD(fmt.Sprintf("kick-%d", q.Index)); err != nil {
		return err
	}
	if q.call, err = newEventFD(fmt.Sprintf("call-%d", q.Index)); err != nil {
		q.kick.Close()
		return err
	}
	q.f.Queues = append(q.f.Queues, q)
	return nil
}

func (q *Queue) close() {
	q.kick.Close()
	q.call.Close()
}

// Addr is the SET_VRING_ADDR payload for the queue (user addresses).
func (q *Queue) Addr() vhostuser.VringAddr {
	return vhostuser.VringAddr{Index: uint32(q.Index), Desc: UVA(q.descOff), Avail: UVA(q.availOff), Used: UVA(q.usedOff)}
}

// KickFD and CallFD are the queue's eventfds (owned by the queue).
func (q *Queue) KickFD() int { return int(q.kick.Fd()) }
func (q *Queue) CallFD() int { return int(q.call.Fd()) }

// AvailIdx is the avail index published so far.
func (q *Queue) AvailIdx() uint16 { return q.availIdx }

// SetDesc writes descriptor i as is.
func (q *Queue) SetDesc(i uint16, d RawDesc) {
	putRawDesc(q.f.Mem[q.descOff+16*int(i%q.Size):], d)
}

// putRawDesc encodes d as a struct virtq_desc at b[0:16].
func putRawDesc(b []byte, d RawDesc) {
	le.PutUint64(b[0:], d.Addr)
	le.PutUint32(b[8:], d.Len)
	le.PutUint16(b[12:], d.Flags)
	le.PutUint16(b[14:], d.Next)
}

// PutAvail publishes head (any value, for hostile tests) in the avail ring
// and kicks the back-end if it asked for kicks.
func (q *Queue) PutAvail(head uint16) {
	n := int(q.Size)
	store16(q.f.Mem, q.availOff+4+2*int(q.availIdx%q.Size), head)
	old := q.availIdx
	q.availIdx++
	// Entry first, then idx (VIRTIO 1.2 §2.7.13.1): store16 is a
	// sequentially consistent atomic.
	store16(q.f.Mem, q.availOff+2, q.availIdx)
	kick := true
	if q.f.Features&vhostuser.FeatureEventIdx != 0 {
		// avail_event sits after the used ring entries (§2.7.10).
		ev := load16(q.f.Mem, q.usedOff+4+8*n)
		kick = uint16(q.availIdx-ev-1) < uint16(q.availIdx-old)
	} else {
		kick = load16(q.f.Mem, q.usedOff)&usedFlagNoNotify == 0
	}
	if kick {
		q.Kick()
	}
}

// Kick writes the kick eventfd.
func (q *Queue) Kick() {
	var b [8]byte
	le.PutUint64(b[:], 1)
	q.kick.Write(b[:])
}

// Publish writes chain into free descriptors, publishes it and returns its
// head.
func (q *Queue) Publish(chain []Desc) (uint16, error) {
	if q.packed {
		return q.publishPacked(chain)
	}
	if len(chain) == 0 || len(chain) > len(q.free) {
		return 0, fmt.Errorf("%w: %d descriptors wanted, %d free", ErrNoSlot, len(chain), len(q.free))
	}
	idx := q.free[len(q.free)-len(chain):]
	q.free = q.free[:len(q.free)-len(chain)]
	idx = append([]uint16(nil), idx...)
	for i, d := range chain {
		var flags, next uint16
		if d.Write {
			flags |= DescFlagWrite
		}
		if i+1 < len(chain) {
			flags |= DescFlagNext
			next = idx[i+1]
		}
		q.SetDesc(idx[i], RawDesc{Addr: d.Addr, Len: d.Len, Flags: flags, Next: next})
	}
	head := idx[0]
	q.chains[head] = idx
	q.PutAvail(head)
	return head, nil
}

// PutUsed writes a used element for buffer id and moves used.idx past it,
// as a device does: for tests that stand in for a back-end that completed
// a request and died before it said so.
func (q *Queue) PutUsed(id uint16, written uint32) {
	used := load16(q.f.Mem, q.usedOff+2)
	e := q.f.Mem[q.usedOff+4+8*int(used%q.Size):]
	le.PutUint32(e, uint32(id))
	le.PutUint32(e[4:], written)
	// Element first, then idx (VIRTIO 1.2 §2.7.8.2): store16 is a
	// sequentially consistent atomic.
	store16(q.f.Mem, q.usedOff+2, used+1)
}

// PopUsed returns the next used element, if any, and frees its chain.
func (q *Queue) PopUsed() (Used, bool) {
	if q.packed {
		return q.popUsedPacked()
	}
	n := int(q.Size)
	if load16(q.f.Mem, q.usedOff+2) == q.usedSeen {
		return Used{}, false
	}
	e := q.f.Mem[q.usedOff+4+8*int(q.usedSeen%q.Size):]
	u := Used{ID: le.Uint32(e), Len: le.Uint32(e[4:])}
	q.usedSeen++
	// used_event: interrupt us at the next completion (§2.7.10).
	store16(q.f.Mem, q.availOff+4+2*n, q.usedSeen)
	if u.ID < uint32(q.Size) && q.chains[u.ID] != nil {
		q.free = append(q.free, q.chains[u.ID]...)
		q.chains[u.ID] = nil
	}
	return u, true
}

// WaitUsed returns the next used element, waiting on the call eventfd.
func (q *Queue) WaitUsed(ctx context.Context) (Used, error) {
	for {
		if u, ok := q.PopUsed(); ok {
			return u, nil
		}
		if err := waitFile(ctx, q.call); err != nil {
			return Used{}, err
		}
	}
}

// WaitCall waits for the next used-buffer notification on the call
// eventfd, whatever the used ring holds.
func (q *Queue) WaitCall(ctx context.Context) error { return waitFile(ctx, q.call) }

// BlkRequest is one virtio-blk request for Submit/Do.
type BlkRequest struct {
	Type   uint32
	Sector uint64
	Data   []byte // OUT data (device-readable)
	InLen  int    // device-writable data bytes (IN, GET_ID)
}

// BlkResult is a completed request.
type BlkResult struct {
	Head    uint16
	Status  uint8  // 0xff if the device did not write it
	Written uint32 // used length
	Data    []byte // the InLen device-writable bytes
}

// Submit places r in a request slot and publishes it as header, data and
// status descriptors (the classic three-descriptor layout).
func (q *Queue) Submit(r BlkRequest) (uint16, error) {
	if len(r.Data) > q.maxIO || r.InLen > q.maxIO || (len(r.Data) > 0 && r.InLen > 0) {
		return 0, fmt.Errorf("frontend: request data %d/%d does not fit a %d-byte slot", len(r.Data), r.InLen, q.maxIO)
	}
	if len(q.freeSlot) == 0 {
		return 0, ErrNoSlot
	}
	slot := q.freeSlot[len(q.freeSlot)-1]
	off := q.slotOff[slot]
	m := q.f.Mem
	le.PutUint32(m[off:], r.Type)
	le.PutUint32(m[off+4:], 0)
	le.PutUint64(m[off+8:], r.Sector)
	statusOff := off + blkHeaderSize + q.maxIO
	m[statusOff] = 0xff
	chain := []Desc{{Addr: GPA(off), Len: blkHeaderSize}}
	switch {
	case len(r.Data) > 0:
		copy(m[off+blkHeaderSize:], r.Data)
		chain = append(chain, Desc{Addr: GPA(off + blkHeaderSize), Len: uint32(len(r.Data))})
	case r.InLen > 0:
		clear(m[off+blkHeaderSize : off+blkHeaderSize+r.InLen])
		chain = append(chain, Desc{Addr: GPA(off + blkHeaderSize), Len: uint32(r.InLen), Write: true})
	}
	chain = append(chain, Desc{Addr: GPA(statusOff), Len: 1, Write: true})
	head, err := q.Publish(chain)
	if err != nil {
		return 0, err
	}
	q.freeSlot = q.freeSlot[:len(q.freeSlot)-1]
	q.slotOf[head] = slot
	return head, nil
}

// Reap waits for the next completion of a Submit-ted request.
func (q *Queue) Reap(ctx context.Context, inLen int) (BlkResult, error) {
	for id, u := range q.stash {
		delete(q.stash, id)
		return q.result(u, inLen), nil
	}
	u, err := q.WaitUsed(ctx)
	if err != nil {
		return BlkResult{}, err
	}
	return q.result(u, inLen), nil
}

func (q *Queue) result(u Used, inLen int) BlkResult {
	res := BlkResult{Head: uint16(u.ID), Written: u.Len, Status: 0xff}
	slot, ok := q.slotOf[uint16(u.ID)]
	if !ok {
		return res
	}
	delete(q.slotOf, uint16(u.ID))
	q.freeSlot = append(q.freeSlot, slot)
	off := q.slotOff[slot]
	res.Status = q.f.Mem[off+blkHeaderSize+q.maxIO]
	if inLen > 0 {
		res.Data = append([]byte(nil), q.f.Mem[off+blkHeaderSize:off+blkHeaderSize+inLen]...)
	}
	return res
}

// Do submits r and waits for its completion; completions of other
// requests that arrive meanwhile are kept for Reap.
func (q *Queue) Do(ctx context.Context, r BlkRequest) (BlkResult, error) {
	head, err := q.Submit(r)
	if err != nil {
		return BlkResult{}, err
	}
	if u, ok := q.stash[head]; ok {
		delete(q.stash, head)
		return q.result(u, r.InLen), nil
	}
	for {
		u, err := q.WaitUsed(ctx)
		if err != nil {
			return BlkResult{}, err
		}
		if uint16(u.ID) == head {
			return q.result(u, r.InLen), nil
		}
		q.stash[uint16(u.ID)] = u
	}
}

// Read, Write, Flush and GetID are Do for the common request types.
func (q *Queue) Read(ctx context.Context, sector uint64, n int) (BlkResult, error) {
	return q.Do(ctx, BlkRequest{Type: BlkTIn, Sector: sector, InLen: n})
}

func (q *Queue) Write(ctx context.Context, sector uint64, data []byte) (BlkResult, error) {
	return q.Do(ctx, BlkRequest{Type: BlkTOut, Sector: sector, Data: data})
}

func (q *Queue) Flush(ctx context.Context) (BlkResult, error) {
	return q.Do(ctx, BlkRequest{Type: BlkTFlush})
}

func (q *Queue) GetID(ctx context.Context) (BlkResult, error) {
	return q.Do(ctx, BlkRequest{Type: BlkTGetID, InLen: BlkIDLen})
}
