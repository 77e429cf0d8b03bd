// Package virtqueuetest is a driver-side mock of a split virtqueue for tests
// (the Go counterpart of rust-vmm virtio-queue mock.rs). It owns a fake guest
// memory, lays out the descriptor table and the avail and used rings in it,
// and lets a test add descriptor chains, publish them, and read back what the
// device put in the used ring.
//
// The mock plays the guest: it writes ring index words with the same 32-bit
// atomic accesses the device uses, so tests that run driver and device in two
// goroutines are clean under -race. That holds for the default layout; with
// Config.AvailMisaligned the idx word also holds ring[0], which the device
// reads with a plain load, so keep such queues single-goroutine.
//
// Misuse by the test itself (a descriptor index out of range, a buffer
// outside the fake memory) panics with a message, like a testing helper;
// running out of fake memory returns an error.
package virtqueuetest

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// Address bases of the fake guest. Guest-physical addresses start above 0 so
// that address 0 is unmapped. Regions are contiguous in guest-physical space
// but laid out in reverse order, with gaps, in user space, so a device that
// translated ring addresses with the wrong table, or assumed both spaces
// sort alike, fails.
const (
	GuestPhysBase = 0x100000
	UserBase      = 0x7f0000000000
	userGap       = 0x200000
)

// Config shapes the mock queue and its memory.
type Config struct {
	Size       uint16 // queue size; 0 means 16
	Regions    int    // regions the fake guest memory is split into; 0 means 1
	RegionSize int    // bytes per region, a multiple of 16; 0 means 64 KiB
	EventIdx   bool   // VIRTIO_RING_F_EVENT_IDX, passed on in QueueConfig
	// AvailMisaligned places the avail ring at an address that is 2- but
	// not 4-aligned (legal: VIRTIO 1.2 §2.7 only requires 2).
	AvailMisaligned bool
	// Start is the initial avail.idx and used.idx (and QueueConfig.NextAvail),
	// for wraparound tests.
	Start uint16
}

// Desc is one raw struct virtq_desc.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// Buffer describes one buffer of a chain for AddChain.
type Buffer struct {
	// Data, if non-nil, is copied into the buffer and sets its length.
	Data []byte
	// Len is the length when Data is nil.
	Len uint32
	// Write makes the buffer device-writable.
	Write bool
	// Addr, if non-zero, is used as the guest-physical address instead of
	// allocating (Data is then written there when it is in memory).
	Addr uint64
}

// Driver is the mock driver. Not safe for concurrent use by several
// goroutines, but it may run concurrently with the device side.
type Driver struct {
	// Guest is the whole fake guest memory; Regions[i].Data are consecutive
	// sub-slices of it, so Guest[gpa-GuestPhysBase] is the byte at gpa.
	Guest   []byte
	Regions []virtqueue.Region
	Mem     *virtqueue.Memory

	size     uint16
	eventIdx bool
	start    uint16

	descOff, availOff, usedOff int // offsets of the rings in Guest (region 0)
	dataStart, dataNext        int // bump allocator for buffers

	nextDesc uint16 // next descriptor slot AddChain uses (round robin)
	availIdx uint16 // our copy of avail.idx
	usedSeen uint16 // used entries consumed by PopUsed
}

// ErrNoSpace: the fake guest memory has no room for the requested buffer.
var ErrNoSpace = errors.New("virtqueuetest: fake guest memory exhausted")

// New builds the fake memory, the rings and a virtqueue.Memory over them.
func New(cfg Config) (*Driver, error) {
	if cfg.Size == 0 {
		cfg.Size = 16
	}
	if cfg.Regions == 0 {
		cfg.Regions = 1
	}
	if cfg.RegionSize == 0 {
		cfg.RegionSize = 64 << 10
	}
	if cfg.RegionSize%16 != 0 || cfg.Regions < 0 {
		return nil, fmt.Errorf("virtqueuetest: region size %d is not a multiple of 16", cfg.RegionSize)
	}
	d := &Driver{
		Guest:    make([]byte, cfg.Regions*cfg.RegionSize),
		size:     cfg.Size,
		eventIdx: cfg.EventIdx,
		start:    cfg.Start,
		availIdx: cfg.Start,
		usedSeen: cfg.Start,
	}
	if hostAddr(d.Guest)%16 != 0 {
		return nil, errors.New("virtqueuetest: fake guest memory is not 16-aligned")
	}
	n := int(cfg.Size)
	d.descOff = 0
	d.availOff = align(d.descOff+16*n, 16)
	if cfg.AvailMisaligned {
		d.availOff += 2
	}
	// At least 2 bytes of padding after the avail ring, so the mock's
	// 32-bit accesses to the word holding used_event stay off the used ring.
	d.usedOff = align(d.availOff+6+2*n+2, 16)
	d.dataStart = align(d.usedOff+6+8*n, 64)
	d.dataNext = d.dataStart
	if d.dataStart > cfg.RegionSize {
		return nil, fmt.Errorf("virtqueuetest: rings for size %d need %d bytes, region has %d", n, d.dataStart, cfg.RegionSize)
	}
	for i := 0; i < cfg.Regions; i++ {
		d.Regions = append(d.Regions, virtqueue.Region{
			GuestPhysAddr: GuestPhysBase + uint64(i*cfg.RegionSize),
			UserAddr:      UserBase + uint64((cfg.Regions-1-i)*(cfg.RegionSize+userGap)),
			Data:          d.Guest[i*cfg.RegionSize : (i+1)*cfg.RegionSize : (i+1)*cfg.RegionSize],
		})
	}
	mem, err := virtqueue.NewMemory(d.Regions)
	if err != nil {
		return nil, err
	}
	d.Mem = mem
	d.store16(d.availOff+2, cfg.Start)
	storeLE32(d.Guest[d.usedOff:], uint32(cfg.Start)<<16)
	return d, nil
}

func align(v, a int) int { return (v + a - 1) &^ (a - 1) }

// user returns the front-end user address of Guest[off] for an offset in
// region 0.
func (d *Driver) user(off int) uint64 { return d.Regions[0].UserAddr + uint64(off) }

// GPA returns the guest-physical address of Guest[off].
func GPA(off int) uint64 { return GuestPhysBase + uint64(off) }

// QueueConfig returns the configuration a front-end would send for this
// queue.
func (d *Driver) QueueConfig() virtqueue.QueueConfig {
	return virtqueue.QueueConfig{
		Size:          d.size,
		DescUserAddr:  d.user(d.descOff),
		AvailUserAddr: d.user(d.availOff),
		UsedUserAddr:  d.user(d.usedOff),
		EventIdx:      d.eventIdx,
		NextAvail:     d.start,
	}
}

// NewQueue is virtqueue.NewSplitQueue(d.Mem, d.QueueConfig()).
func (d *Driver) NewQueue() (*virtqueue.SplitQueue, error) {
	return virtqueue.NewSplitQueue(d.Mem, d.QueueConfig())
}

// Size returns the queue size.
func (d *Driver) Size() uint16 { return d.size }

// DescTable, AvailRing and UsedRing return the raw ring bytes (including the
// event fields), for tests and fuzzers that write them directly.
func (d *Driver) DescTable() []byte { return d.Guest[d.descOff : d.descOff+16*int(d.size)] }

// AvailRing returns the avail ring bytes.
func (d *Driver) AvailRing() []byte { return d.Guest[d.availOff : d.availOff+6+2*int(d.size)] }

// UsedRing returns the used ring bytes.
func (d *Driver) UsedRing() []byte { return d.Guest[d.usedOff : d.usedOff+6+8*int(d.size)] }

// DataArea returns the guest-physical range [start, end) the allocator hands
// buffers out from; it may span several regions.
func (d *Driver) DataArea() (start, end uint64) { return GPA(d.dataStart), GPA(len(d.Guest)) }

// Alloc reserves n bytes (8-aligned) in the data area and returns their
// guest-physical address. ResetAlloc starts over.
func (d *Driver) Alloc(n int) (uint64, error) {
	off := align(d.dataNext, 8)
	if n < 0 || n > len(d.Guest)-off {
		return 0, fmt.Errorf("%w: %d bytes wanted, %d left", ErrNoSpace, n, len(d.Guest)-off)
	}
	d.dataNext = off + n
	return GPA(off), nil
}

// ResetAlloc forgets every buffer allocated so far.
func (d *Driver) ResetAlloc() { d.dataNext = d.dataStart }

// Bytes returns the fake guest bytes [gpa, gpa+n), or nil if any of them is
// outside the fake memory.
func (d *Driver) Bytes(gpa uint64, n int) []byte {
	if gpa < GuestPhysBase || n < 0 {
		return nil
	}
	off := gpa - GuestPhysBase
	if off > uint64(len(d.Guest)) || uint64(n) > uint64(len(d.Guest))-off {
		return nil
	}
	return d.Guest[off : off+uint64(n)]
}

// Contains reports whether b lies entirely inside the fake guest memory.
func (d *Driver) Contains(b []byte) bool {
	if len(b) == 0 {
		return true
	}
	lo, p := hostAddr(d.Guest), hostAddr(b)
	return p >= lo && p-lo <= uintptr(len(d.Guest)) && uintptr(len(b)) <= uintptr(len(d.Guest))-(p-lo)
}

// SetDesc writes descriptor i of the descriptor table.
func (d *Driver) SetDesc(i uint16, desc Desc) {
	if i >= d.size {
		panic(fmt.Sprintf("virtqueuetest: SetDesc index %d, queue size %d", i, d.size))
	}
	putDesc(d.Guest[d.descOff+16*int(i):], desc)
}

func putDesc(b []byte, desc Desc) {
	binary.LittleEndian.PutUint64(b[0:], desc.Addr)
	binary.LittleEndian.PutUint32(b[8:], desc.Len)
	binary.LittleEndian.PutUint16(b[12:], desc.Flags)
	binary.LittleEndian.PutUint16(b[14:], desc.Next)
}

// WriteTable writes descs as an indirect descriptor table at gpa.
func (d *Driver) WriteTable(gpa uint64, descs []Desc) {
	b := d.Bytes(gpa, 16*len(descs))
	if b == nil {
		panic(fmt.Sprintf("virtqueuetest: indirect table at %#x is outside the fake memory", gpa))
	}
	for i, desc := range descs {
		putDesc(b[16*i:], desc)
	}
}

// AllocTable allocates and writes an indirect table and returns its address.
func (d *Driver) AllocTable(descs []Desc) (uint64, error) {
	gpa, err := d.Alloc(16 * len(descs))
	if err != nil {
		return 0, err
	}
	d.WriteTable(gpa, descs)
	return gpa, nil
}

// buffersToDescs allocates and fills the buffers and returns unlinked
// descriptors for them.
func (d *Driver) buffersToDescs(bufs []Buffer) ([]Desc, error) {
	descs := make([]Desc, len(bufs))
	for i, b := range bufs {
		n := b.Len
		if b.Data != nil {
			n = uint32(len(b.Data))
		}
		addr := b.Addr
		if addr == 0 {
			var err error
			if addr, err = d.Alloc(int(n)); err != nil {
				return nil, err
			}
		}
		if b.Data != nil {
			if dst := d.Bytes(addr, len(b.Data)); dst != nil {
				copy(dst, b.Data)
			}
		}
		descs[i] = Desc{Addr: addr, Len: n}
		if b.Write {
			descs[i].Flags = virtqueue.DescFlagWrite
		}
	}
	return descs, nil
}

// AddChain writes bufs as a chain of direct descriptors (taken round robin
// from the table, so at most Size descriptors may be in flight), puts its
// head in the avail ring and publishes it. It returns the head index.
func (d *Driver) AddChain(bufs ...Buffer) (uint16, error) {
	if len(bufs) == 0 || len(bufs) > int(d.size) {
		return 0, fmt.Errorf("virtqueuetest: chain of %d buffers, queue size %d", len(bufs), d.size)
	}
	descs, err := d.buffersToDescs(bufs)
	if err != nil {
		return 0, err
	}
	head := d.nextDesc
	for i := range descs {
		idx := d.nextDesc
		d.nextDesc = (d.nextDesc + 1) & (d.size - 1)
		if i+1 < len(descs) {
			descs[i].Flags |= virtqueue.DescFlagNext
			descs[i].Next = d.nextDesc
		}
		d.SetDesc(idx, descs[i])
	}
	d.PublishHead(head)
	return head, nil
}

// AddIndirectChain writes bufs into a freshly allocated indirect table,
// points one direct descriptor at it and publishes that head.
func (d *Driver) AddIndirectChain(bufs ...Buffer) (uint16, error) {
	descs, err := d.buffersToDescs(bufs)
	if err != nil {
		return 0, err
	}
	for i := range descs {
		if i+1 < len(descs) {
			descs[i].Flags |= virtqueue.DescFlagNext
			descs[i].Next = uint16(i + 1)
		}
	}
	table, err := d.AllocTable(descs)
	if err != nil {
		return 0, err
	}
	head := d.nextDesc
	d.nextDesc = (d.nextDesc + 1) & (d.size - 1)
	d.SetDesc(head, Desc{Addr: table, Len: uint32(16 * len(descs)), Flags: virtqueue.DescFlagIndirect})
	d.PublishHead(head)
	return head, nil
}

// PutAvail writes head into the next avail ring slot without publishing it.
// The slot is written with a plain store, ordered before the device's read
// by the atomic avail.idx store in PublishAvail, except when the slot shares
// the 32-bit word the device loads atomically (ring[0] with AvailMisaligned).
func (d *Driver) PutAvail(head uint16) {
	off := d.availOff + 4 + 2*int(d.availIdx&(d.size-1))
	if off&^3 == (d.availOff+2)&^3 {
		d.store16(off, head)
	} else {
		binary.LittleEndian.PutUint16(d.Guest[off:], head)
	}
	d.availIdx++
}

// PublishAvail stores avail.idx, making every PutAvail so far visible. The
// store is atomic and so orders the descriptor and ring writes before it,
// like the driver's write barrier (VIRTIO 1.2 §2.7.13.3).
func (d *Driver) PublishAvail() { d.store16(d.availOff+2, d.availIdx) }

// PublishHead is PutAvail followed by PublishAvail.
func (d *Driver) PublishHead(head uint16) {
	d.PutAvail(head)
	d.PublishAvail()
}

// SetAvailIdx stores an arbitrary avail.idx (for hostile-driver tests); later
// PutAvail calls continue from it.
func (d *Driver) SetAvailIdx(idx uint16) {
	d.availIdx = idx
	d.PublishAvail()
}

// AvailIdx returns the driver's avail.idx.
func (d *Driver) AvailIdx() uint16 { return d.availIdx }

// SetAvailFlags writes avail.flags (VIRTQ_AVAIL_F_NO_INTERRUPT).
func (d *Driver) SetAvailFlags(f uint16) { d.store16(d.availOff, f) }

// SetUsedEvent writes used_event, the avail ring field after ring[Size].
func (d *Driver) SetUsedEvent(v uint16) { d.store16(d.availOff+4+2*int(d.size), v) }

// UsedIdx reads used.idx (atomically, as a driver must).
func (d *Driver) UsedIdx() uint16 { return uint16(loadLE32(d.Guest[d.usedOff:]) >> 16) }

// UsedFlags reads used.flags.
func (d *Driver) UsedFlags() uint16 { return uint16(loadLE32(d.Guest[d.usedOff:])) }

// AvailEvent reads avail_event, the used ring field after ring[Size]. Use it
// only when the device is not running concurrently.
func (d *Driver) AvailEvent() uint16 {
	return binary.LittleEndian.Uint16(d.Guest[d.usedOff+4+8*int(d.size):])
}

// Used returns the used element in slot i mod Size.
func (d *Driver) Used(i uint16) (id, length uint32) {
	off := d.usedOff + 4 + 8*int(i&(d.size-1))
	return binary.LittleEndian.Uint32(d.Guest[off:]), binary.LittleEndian.Uint32(d.Guest[off+4:])
}

// PopUsed returns the next used element the device has published, if any.
func (d *Driver) PopUsed() (id, length uint32, ok bool) {
	if d.UsedIdx() == d.usedSeen {
		return 0, 0, false
	}
	id, length = d.Used(d.usedSeen)
	d.usedSeen++
	return id, length, true
}

// store16 writes a little-endian 16-bit avail ring field with an atomic
// read-modify-write of the aligned 32-bit word holding it. The mock is the
// only writer of the avail ring and of the padding around it, so load+store
// is enough; using the word the device reads atomically keeps -race quiet.
func (d *Driver) store16(off int, v uint16) {
	w := off &^ 3
	word := loadLE32(d.Guest[w:])
	shift := uint(off-w) * 8
	word = word&^(0xffff<<shift) | uint32(v)<<shift
	storeLE32(d.Guest[w:], word)
}
