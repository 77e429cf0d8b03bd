package virtqueuetest

import (
	"encoding/binary"
	"fmt"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// PackedDesc is one raw struct pvirtq_desc (VIRTIO 1.2 §2.8.13). Flags are
// NEXT/WRITE/INDIRECT; the mock adds AVAIL and USED for its wrap counter
// unless a raw write asks otherwise.
type PackedDesc struct {
	Addr  uint64
	Len   uint32
	ID    uint16
	Flags uint16
}

// PackedDriver is the driver side of a packed virtqueue over the same fake
// guest memory as Driver: the descriptor ring is where Driver's descriptor
// table is, the driver event suppression area where its avail ring is and
// the device's where its used ring is. Descriptor flags|id words and event
// words are accessed with the 32-bit atomics the device uses.
type PackedDriver struct {
	*Driver

	availIdx  uint16
	availWrap bool
	usedIdx   uint16
	usedWrap  bool

	freeDescs int      // ring slots the driver may still fill
	num       []uint16 // descriptors of the chain with each buffer id in flight; 0: id free
	nextID    uint16
}

// NewPacked builds the fake memory and a fresh packed ring (both wrap
// counters 1). cfg.Start and cfg.AvailMisaligned are ignored.
func NewPacked(cfg Config) (*PackedDriver, error) {
	cfg.Start, cfg.AvailMisaligned = 0, false
	d, err := New(cfg)
	if err != nil {
		return nil, err
	}
	return &PackedDriver{
		Driver:    d,
		availWrap: true,
		usedWrap:  true,
		freeDescs: int(d.size),
		num:       make([]uint16, d.size),
	}, nil
}

// QueueConfig returns what a front-end would send for this queue.
func (p *PackedDriver) QueueConfig() virtqueue.QueueConfig {
	return virtqueue.QueueConfig{
		Packed:        true,
		Size:          p.size,
		DescUserAddr:  p.user(p.descOff),
		AvailUserAddr: p.user(p.availOff),
		UsedUserAddr:  p.user(p.usedOff),
		EventIdx:      p.eventIdx,
		NextAvail:     1 << 15,
		NextUsed:      1 << 15,
	}
}

// NewQueue is virtqueue.NewPackedQueue(p.Mem, p.QueueConfig()).
func (p *PackedDriver) NewQueue() (*virtqueue.PackedQueue, error) {
	return virtqueue.NewPackedQueue(p.Mem, p.QueueConfig())
}

// DescRing returns the raw descriptor ring.
func (p *PackedDriver) DescRing() []byte { return p.DescTable() }

// AvailPos returns the driver's next avail slot and wrap counter.
func (p *PackedDriver) AvailPos() (uint16, bool) { return p.availIdx, p.availWrap }

// AvailFlags returns the AVAIL/USED bits that make a descriptor available
// for driver wrap counter wrap (§2.8.1).
func AvailFlags(wrap bool) uint16 {
	if wrap {
		return virtqueue.PackedDescFlagAvail
	}
	return virtqueue.PackedDescFlagUsed
}

// SetSlot writes ring slot i raw: addr and len with plain stores, then id
// and flags (exactly as given) with one atomic store.
func (p *PackedDriver) SetSlot(i uint16, d PackedDesc) {
	if i >= p.size {
		panic(fmt.Sprintf("virtqueuetest: SetSlot %d, queue size %d", i, p.size))
	}
	b := p.Guest[p.descOff+16*int(i):]
	binary.LittleEndian.PutUint64(b[0:], d.Addr)
	binary.LittleEndian.PutUint32(b[8:], d.Len)
	storeLE32(b[12:], uint32(d.ID)|uint32(d.Flags)<<16)
}

// PutDescs makes descs available as one chain from the avail position:
// NEXT is set on all but the last, AVAIL/USED for the running wrap counter
// on each, and the first descriptor's flags are stored last (§2.8.21). It
// does no id or space bookkeeping: hostile tests use it directly.
func (p *PackedDriver) PutDescs(descs []PackedDesc) {
	first := p.availIdx
	var head PackedDesc
	for i, d := range descs {
		if i+1 < len(descs) {
			d.Flags |= virtqueue.DescFlagNext
		}
		d.Flags |= AvailFlags(p.availWrap)
		if i == 0 {
			head = d
		} else {
			p.SetSlot(p.availIdx, d)
		}
		p.availIdx++
		if p.availIdx == p.size {
			p.availIdx, p.availWrap = 0, !p.availWrap
		}
	}
	p.SetSlot(first, head)
}

func (p *PackedDriver) allocID(n int) (uint16, error) {
	if n == 0 || n > p.freeDescs {
		return 0, fmt.Errorf("virtqueuetest: chain of %d descriptors, %d ring slots free", n, p.freeDescs)
	}
	for k := uint16(0); k < p.size; k++ {
		id := (p.nextID + k) % p.size
		if p.num[id] == 0 {
			p.nextID = (id + 1) % p.size
			p.num[id] = uint16(n)
			p.freeDescs -= n
			return id, nil
		}
	}
	return 0, fmt.Errorf("virtqueuetest: no free buffer id")
}

// AddChain writes bufs as a chain of direct descriptors with a fresh buffer
// id in every descriptor (as Linux does) and makes it available.
func (p *PackedDriver) AddChain(bufs ...Buffer) (uint16, error) {
	descs, err := p.buffersToDescs(bufs)
	if err != nil {
		return 0, err
	}
	id, err := p.allocID(len(descs))
	if err != nil {
		return 0, err
	}
	pd := make([]PackedDesc, len(descs))
	for i, d := range descs {
		pd[i] = PackedDesc{Addr: d.Addr, Len: d.Len, ID: id, Flags: d.Flags}
	}
	p.PutDescs(pd)
	return id, nil
}

// AddDescs makes descs available as one chain under a fresh buffer id,
// which it stores in every descriptor's ID (descs is modified), with the
// bookkeeping PopUsed needs. It does not allocate.
func (p *PackedDriver) AddDescs(descs []PackedDesc) (uint16, error) {
	id, err := p.allocID(len(descs))
	if err != nil {
		return 0, err
	}
	for i := range descs {
		descs[i].ID = id
	}
	p.PutDescs(descs)
	return id, nil
}

// WritePackedTable writes descs as a packed indirect table at gpa.
func (p *PackedDriver) WritePackedTable(gpa uint64, descs []PackedDesc) {
	b := p.Bytes(gpa, 16*len(descs))
	if b == nil {
		panic(fmt.Sprintf("virtqueuetest: indirect table at %#x is outside the fake memory", gpa))
	}
	for i, d := range descs {
		e := b[16*i:]
		binary.LittleEndian.PutUint64(e[0:], d.Addr)
		binary.LittleEndian.PutUint32(e[8:], d.Len)
		binary.LittleEndian.PutUint16(e[12:], d.ID)
		binary.LittleEndian.PutUint16(e[14:], d.Flags)
	}
}

// AddIndirectChain writes bufs into a packed indirect table and makes one
// INDIRECT descriptor pointing at it available.
func (p *PackedDriver) AddIndirectChain(bufs ...Buffer) (uint16, error) {
	descs, err := p.buffersToDescs(bufs)
	if err != nil {
		return 0, err
	}
	pd := make([]PackedDesc, len(descs))
	for i, d := range descs {
		pd[i] = PackedDesc{Addr: d.Addr, Len: d.Len, Flags: d.Flags}
	}
	table, err := p.Alloc(16 * len(pd))
	if err != nil {
		return 0, err
	}
	p.WritePackedTable(table, pd)
	id, err := p.allocID(1)
	if err != nil {
		return 0, err
	}
	p.PutDescs([]PackedDesc{{Addr: table, Len: uint32(16 * len(pd)), ID: id, Flags: virtqueue.DescFlagIndirect}})
	return id, nil
}

// PopUsed returns the next used descriptor the device wrote, if any, and
// frees its buffer id and ring slots.
func (p *PackedDriver) PopUsed() (id uint16, length uint32, ok bool) {
	b := p.Guest[p.descOff+16*int(p.usedIdx):]
	w := loadLE32(b[12:])
	flags := uint16(w >> 16)
	avail, used := flags&virtqueue.PackedDescFlagAvail != 0, flags&virtqueue.PackedDescFlagUsed != 0
	if avail != p.usedWrap || used != p.usedWrap {
		return 0, 0, false
	}
	id, length = uint16(w), binary.LittleEndian.Uint32(b[8:])
	n := uint16(1)
	if id < p.size && p.num[id] != 0 {
		n = p.num[id]
		p.num[id] = 0
		p.freeDescs += int(n)
	}
	next := uint32(p.usedIdx) + uint32(n)
	if next >= uint32(p.size) {
		next -= uint32(p.size)
		p.usedWrap = !p.usedWrap
	}
	p.usedIdx = uint16(next)
	return id, length, true
}

// SetDriverEvent writes the driver event suppression area: off_wrap and
// flags (virtqueue.EventFlag*).
func (p *PackedDriver) SetDriverEvent(offWrap, flags uint16) {
	storeLE32(p.Guest[p.availOff:], uint32(offWrap)|uint32(flags)<<16)
}

// DeviceEvent reads the device event suppression area.
func (p *PackedDriver) DeviceEvent() (offWrap, flags uint16) {
	w := loadLE32(p.Guest[p.usedOff:])
	return uint16(w), uint16(w >> 16)
}
