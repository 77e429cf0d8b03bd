package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// struct virtio_blk_outhdr (VIRTIO 1.2 §5.2.6), the first bytes of the
// device-readable buffers.
const (
	hdrType   = 0 // le32
	hdrIoprio = 4 // le32, reserved; ignored
	hdrSector = 8 // le64, 512-byte units
	hdrSize   = 16
)

// struct virtio_blk_discard_write_zeroes (VIRTIO 1.2 §5.2.6).
const (
	segSector     = 0  // le64
	segNumSectors = 8  // le32
	segFlags      = 12 // le32
	segSize       = 16

	segFlagUnmap = 1 << 0
)

// idLen is the size of the GET_ID answer: 20 bytes, NUL-padded, no NUL when
// the serial is exactly 20 bytes long (VIRTIO 1.2 §5.2.6).
const idLen = 20

// maxDataBytes bounds an IN/OUT transfer, as QEMU's BDRV_REQUEST_MAX_SECTORS
// does; it also keeps the used length (data + status) inside a uint32.
const maxDataBytes = (1<<31 - 1) &^ (SectorSize - 1)

// Handler executes virtio-blk requests against one Disk. Use one per queue
// worker; it is not safe for concurrent use. Its scratch buffer list is
// reused, so steady-state Handle calls do not allocate.
type Handler struct {
	disk     Disk
	opts     Options
	logical  uint64
	discard  Discarder   // nil: DISCARD not offered
	zeroes   WriteZeroer // nil: WRITE_ZEROES not offered
	serialID [idLen]byte
	data     [][]byte // scratch: sub-slices of the guest buffers carrying data
	err      error

	stop <-chan struct{} // closed when the queue stops (SetStop)

	cached   CachedReader // nil: the Disk is not one (coldread.go)
	readMode readMode     // how the request being handled reads IN data
	probe    coldProbe    // which inline reads ask whether data is cached

	stats    *QueueStats // nil: not counting (CountInto)
	reqType  uint32      // type of the request being handled, for stats
	reqBytes uint64      // data bytes it moved, for stats
	sampler  sampler     // which requests' latency is timed (statsample.go)
}

// NewHandler returns a Handler for d. Optional Disk upgrades are looked up
// here, once, and only used on a writable device, matching Features.
func NewHandler(d Disk, o Options) *Handler {
	o = o.withDefaults()
	h := &Handler{disk: d, opts: o, logical: sectorSizeOf(d)}
	h.cached, _ = d.(CachedReader)
	if !o.ReadOnly {
		h.discard = discarderOf(d)
		h.zeroes = writeZeroerOf(d)
	}
	copy(h.serialID[:], o.Serial)
	return h
}

// Err reports why the most recent Handle did not complete with
// VIRTIO_BLK_S_OK, or nil. It is meant for the caller's (rate-limited) log.
func (h *Handler) Err() error { return h.err }

// Handle parses and executes one request and writes its status byte.
//
// readable are the device-readable buffers (header, then OUT data or
// discard segments), writable the device-writable ones (IN data, then the
// status byte as the very last byte). Any split of these bytes across
// buffers is accepted: VIRTIO 1.2 §2.7.4 ("message framing") forbids the
// device from assuming a layout, and QEMU's qtest sends header+data in one
// descriptor and data+status in another.
//
// It returns the used length: bytes written to the guest, status included.
// It returns 0 when there is no writable byte to hold a status; the caller
// then completes the chain with used length 0. It also returns 0, with Err
// wrapping ErrStopped and no status written, for a request held for host
// space when the queue stopped (nospace.go): the caller must not complete
// that one.
func (h *Handler) Handle(readable, writable [][]byte) (written uint32) {
	h.readMode = readPlain
	written, _ = h.run(readable, writable)
	return written
}

// run is Handle; done is false only for a read TryHandle leaves undone.
func (h *Handler) run(readable, writable [][]byte) (written uint32, done bool) {
	h.err = nil
	// The status byte is the last byte of the device-writable part
	// (QEMU virtio-blk-handler.c: iov_discard_back of in_iov).
	si := len(writable) - 1
	for si >= 0 && len(writable[si]) == 0 {
		si--
	}
	if si < 0 {
		h.err = fmt.Errorf("%w: no device-writable byte for the status", ErrBadRequest)
		return 0, true
	}
	last := writable[si]
	status := &last[len(last)-1]
	in := writable[:si]
	inTail := last[:len(last)-1]

	var (
		slot   Op
		weight uint64 // 0: latency not timed
		start  time.Duration
	)
	if h.stats != nil {
		h.reqType, h.reqBytes = ^uint32(0), 0
		slot = peekOp(readable)
		if weight = h.sampler.take(slot); weight != 0 {
			start = monotonic()
		}
	}
	n, err := h.execute(readable, in, inTail)
	if errors.Is(err, errNotCached) {
		clear(h.data)
		h.data = h.data[:0]
		return 0, false
	}
	if h.stats != nil {
		var d time.Duration
		if weight != 0 {
			d = monotonic() - start
			h.sampler.timed(slot, d)
		}
		h.stats.record(opOf(h.reqType), h.reqBytes, err != nil, weight, d)
	}
	clear(h.data) // drop references to guest memory until the next request
	h.data = h.data[:0]
	h.err = err
	if errors.Is(err, ErrStopped) {
		// Held for space and its queue stopped (nospace.go): no status,
		// the request stays in flight.
		return 0, true
	}
	*status = Status(err)
	if err != nil {
		// Data bytes may have been partly written; only the status is
		// promised. VIRTIO 1.2 §2.7.8: the device writes at least len bytes.
		return 1, true
	}
	return uint32(n) + 1, true // n <= maxDataBytes, so this cannot wrap
}

// execute runs the request and returns the number of data bytes written to
// the guest.
func (h *Handler) execute(readable, in [][]byte, inTail []byte) (uint64, error) {
	var hdr [hdrSize]byte
	got, bi, bo := 0, 0, 0
	for bi < len(readable) && got < hdrSize {
		c := copy(hdr[got:], readable[bi])
		got += c
		if c < len(readable[bi]) {
			bo = c
			break
		}
		bi++
	}
	if got < hdrSize {
		return 0, fmt.Errorf("%w: request header is %d bytes, want %d", ErrBadRequest, got, hdrSize)
	}
	typ := binary.LittleEndian.Uint32(hdr[hdrType:])
	sector := binary.LittleEndian.Uint64(hdr[hdrSector:])
	h.reqType = typ

	switch typ {
	case TypeIn:
		// Data of an IN request is device-writable (VIRTIO 1.2 §5.2.6);
		// data in the readable part means the driver built the chain
		// wrongly, and reading "nothing" would hide it.
		if hasBytesAfter(readable, bi, bo) {
			return 0, fmt.Errorf("%w: IN request with device-readable data", ErrBadRequest)
		}
		h.carveIn(in, inTail)
		return h.readWrite(typ, sector)
	case TypeOut:
		if h.opts.ReadOnly {
			// VIRTIO 1.2 §5.2.6.1: a write on a read-only device fails
			// with IOERR and writes nothing.
			return 0, fmt.Errorf("%w: OUT at sector %d", ErrReadOnly, sector)
		}
		// The only device-writable byte of an OUT request is the status.
		if len(inTail) > 0 || hasBytesAfter(in, 0, 0) {
			return 0, fmt.Errorf("%w: OUT request with device-writable data", ErrBadRequest)
		}
		h.carveOut(readable, bi, bo)
		return h.readWrite(typ, sector)
	case TypeFlush:
		// The spec asks drivers for sector 0 but gives the device no rule;
		// like QEMU we ignore it. A read-only device has nothing to make
		// durable.
		if h.opts.ReadOnly {
			return 0, nil
		}
		h.stats.countFlush()
		if err := h.disk.Flush(); err != nil {
			if err = h.holdForSpace(err, h.disk.Flush); err != nil {
				return 0, fmt.Errorf("blk: FLUSH: %w", err)
			}
		}
		return 0, nil
	case TypeGetID:
		if hasBytesAfter(readable, bi, bo) {
			return 0, fmt.Errorf("%w: GET_ID request with device-readable data", ErrBadRequest)
		}
		h.carveIn(in, inTail)
		h.reqBytes = h.getID()
		return h.reqBytes, nil
	case TypeDiscard, TypeWriteZeroes:
		return 0, h.discardWriteZeroes(typ, readable, bi, bo)
	default:
		return 0, fmt.Errorf("%w: type %d", ErrUnsupported, typ)
	}
}

// hasBytesAfter reports whether bufs hold any byte from offset bo of
// bufs[bi] on.
func hasBytesAfter(bufs [][]byte, bi, bo int) bool {
	for i := bi; i < len(bufs); i++ {
		if (i == bi && len(bufs[i]) > bo) || (i > bi && len(bufs[i]) > 0) {
			return true
		}
	}
	return false
}

// carveIn sets h.data to the IN data buffers: every writable byte before the
// status byte. Empty buffers are dropped.
func (h *Handler) carveIn(in [][]byte, tail []byte) {
	for _, b := range in {
		if len(b) > 0 {
			h.data = append(h.data, b)
		}
	}
	if len(tail) > 0 {
		h.data = append(h.data, tail)
	}
}

// carveOut sets h.data to the readable bytes after the header, which ends at
// offset bo of readable[bi].
func (h *Handler) carveOut(readable [][]byte, bi, bo int) {
	for i := bi; i < len(readable); i++ {
		b := readable[i]
		if i == bi {
			b = b[bo:]
		}
		if len(b) > 0 {
			h.data = append(h.data, b)
		}
	}
}

// dataLen is the total length of h.data, saturating instead of wrapping so
// an absurd buffer list fails the size check rather than passing it.
func (h *Handler) dataLen() uint64 {
	var n uint64
	for _, b := range h.data {
		n += uint64(len(b))
		if n > maxDataBytes {
			return maxDataBytes + 1
		}
	}
	return n
}

func (h *Handler) readWrite(typ uint32, sector uint64) (uint64, error) {
	n := h.dataLen()
	if n > maxDataBytes {
		return 0, fmt.Errorf("%w: type %d: data longer than %d bytes", ErrBadRequest, typ, maxDataBytes)
	}
	off, err := h.checkRange(sector, n)
	if err != nil {
		return 0, fmt.Errorf("%w (type %d)", err, typ)
	}
	h.reqBytes = n
	if n == 0 {
		return 0, nil
	}
	if typ == TypeIn {
		if err := h.read(off); err != nil { // coldread.go
			if errors.Is(err, errNotCached) {
				return 0, err
			}
			return 0, fmt.Errorf("blk: IN sector %d, %d bytes: %w", sector, n, err)
		}
		return n, nil
	}
	if err := h.disk.WriteVec(h.data, off); err != nil {
		err = h.holdForSpace(err, func() error { return h.disk.WriteVec(h.data, off) })
		if err != nil {
			return 0, fmt.Errorf("blk: OUT sector %d, %d bytes: %w", sector, n, err)
		}
	}
	return 0, h.writeThrough(typ, sector)
}

// writeThrough makes a completed write durable before its status is
// written when the device is in write-through mode (WriteCache).
func (h *Handler) writeThrough(typ uint32, sector uint64) error {
	if !h.opts.Cache.WriteThrough() {
		return nil
	}
	h.stats.countFlush()
	if err := h.disk.Flush(); err != nil {
		if err = h.holdForSpace(err, h.disk.Flush); err != nil {
			return fmt.Errorf("blk: type %d sector %d: write-through flush: %w", typ, sector, err)
		}
	}
	return nil
}

// checkRange validates n data bytes starting at 512-byte sector `sector` and
// returns the byte offset. It is the one range check of the device, written
// without overflow after QEMU's virtio_blk_sect_range_ok: sector is in
// 512-byte units whatever blk_size is (VIRTIO 1.2 §5.2.6), the length must be
// a multiple of 512 (ibid.) and of the logical sector, and the start must be
// aligned to the logical sector.
func (h *Handler) checkRange(sector, n uint64) (int64, error) {
	if n%SectorSize != 0 || n%h.logical != 0 {
		return 0, fmt.Errorf("%w: length %d is not a multiple of %d", ErrBadRequest, n, h.logical)
	}
	capacity := capacitySectors(h.disk)
	nsec := n >> sectorShift
	if sector > capacity || nsec > capacity-sector {
		return 0, fmt.Errorf("%w: sector %d + %d sectors > capacity %d", ErrOutOfRange, sector, nsec, capacity)
	}
	// sector <= capacity <= MaxInt64>>9, so the shift cannot overflow.
	off := sector << sectorShift
	if off%h.logical != 0 {
		return 0, fmt.Errorf("%w: sector %d is not aligned to %d bytes", ErrBadRequest, sector, h.logical)
	}
	return int64(off), nil
}

// getID writes the serial into h.data: min(20, data length) bytes, NUL
// padded (VIRTIO 1.2 §5.2.6: 20 bytes, no terminator when 20 long). QEMU
// copies fewer bytes into a shorter buffer the same way.
func (h *Handler) getID() uint64 {
	src := h.serialID[:]
	var n uint64
	for _, b := range h.data {
		if len(src) == 0 {
			break
		}
		c := copy(b, src)
		src = src[c:]
		n += uint64(c)
	}
	return n
}

// discardWriteZeroes handles DISCARD and WRITE_ZEROES. The readable bytes
// after the header, from offset bo of readable[bi], hold the segments.
func (h *Handler) discardWriteZeroes(typ uint32, readable [][]byte, bi, bo int) error {
	if (typ == TypeDiscard && h.discard == nil) || (typ == TypeWriteZeroes && h.zeroes == nil) {
		if h.opts.ReadOnly {
			return fmt.Errorf("%w: type %d", ErrReadOnly, typ)
		}
		return fmt.Errorf("%w: type %d not offered by this disk", ErrUnsupported, typ)
	}
	// The segments follow the header. They are read in place, twice: all
	// are validated before the first is executed, so a request with one bad
	// segment changes nothing.
	segs := segReader{bufs: readable, bi: bi, bo: bo}
	total := segs.remaining()
	if total%segSize != 0 {
		return fmt.Errorf("%w: type %d with %d bytes of segments, not a multiple of %d", ErrBadRequest, typ, total, segSize)
	}
	count := total / segSize
	if count == 0 {
		return fmt.Errorf("%w: type %d without a segment", ErrBadRequest, typ)
	}
	if count > maxSegments {
		return fmt.Errorf("%w: type %d with %d segments, more than the advertised %d", ErrUnsupported, typ, count, maxSegments)
	}
	for pass := 0; pass < 2; pass++ {
		r := segs
		for i := uint64(0); i < count; i++ {
			var seg [segSize]byte
			r.read(seg[:])
			if err := h.trimSegment(typ, seg[:], pass == 1); err != nil {
				if count > 1 {
					return fmt.Errorf("segment %d of %d: %w", i, count, err)
				}
				return err
			}
		}
	}
	return nil
}

// segReader reads consecutive bytes across a list of buffers, from offset bo
// of bufs[bi]. It copies by value, so a saved reader restarts the walk.
type segReader struct {
	bufs   [][]byte
	bi, bo int
}

func (r *segReader) remaining() uint64 {
	var n uint64
	for i := r.bi; i < len(r.bufs); i++ {
		n += uint64(len(r.bufs[i]))
	}
	return n - uint64(r.bo)
}

// read fills p; the caller checked that enough bytes remain.
func (r *segReader) read(p []byte) {
	for len(p) > 0 && r.bi < len(r.bufs) {
		c := copy(p, r.bufs[r.bi][r.bo:])
		p = p[c:]
		r.bo += c
		if r.bo == len(r.bufs[r.bi]) {
			r.bi, r.bo = r.bi+1, 0
		}
	}
}

// trimSegment validates one segment and, with exec, executes it.
func (h *Handler) trimSegment(typ uint32, seg []byte, exec bool) error {
	sector := binary.LittleEndian.Uint64(seg[segSector:])
	nsec := uint64(binary.LittleEndian.Uint32(seg[segNumSectors:]))
	flags := binary.LittleEndian.Uint32(seg[segFlags:])

	// VIRTIO 1.2 §5.2.6.1: unknown flags → UNSUPP; UNMAP on DISCARD → UNSUPP.
	if flags&^segFlagUnmap != 0 {
		return fmt.Errorf("%w: type %d flags %#x", ErrUnsupported, typ, flags)
	}
	if typ == TypeDiscard && flags&segFlagUnmap != 0 {
		return fmt.Errorf("%w: DISCARD with the UNMAP flag", ErrUnsupported)
	}
	if nsec > maxTrimSectors {
		return fmt.Errorf("%w: type %d of %d sectors exceeds the advertised %d", ErrBadRequest, typ, nsec, maxTrimSectors)
	}
	off, err := h.checkRange(sector, nsec<<sectorShift)
	if err != nil {
		return fmt.Errorf("%w (type %d)", err, typ)
	}
	n := int64(nsec << sectorShift)
	if !exec || n == 0 {
		return nil
	}
	do := func() error {
		if typ == TypeDiscard {
			return h.discard.Discard(off, n)
		}
		return h.zeroes.WriteZeroes(off, n, flags&segFlagUnmap != 0)
	}
	if err = do(); err != nil {
		err = h.holdForSpace(err, do)
	}
	if err != nil {
		return fmt.Errorf("blk: type %d sector %d, %d sectors: %w", typ, sector, nsec, err)
	}
	return h.writeThrough(typ, sector)
}
