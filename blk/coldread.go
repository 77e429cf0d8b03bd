package blk

import "errors"

// Reads the page cache does not hold.
//
// A queue's owner runs quick requests (reads, overwrites) inline, one
// after another (vhostuser worker.go). A read that has to wait for the
// disk would hold every request behind it, and a queue of cold reads would
// reach the disk one at a time. With a CachedReader the owner calls
// TryHandle: a read whose data is not all in memory is left undone, and
// the owner hands it to a goroutine that may block, which runs it with
// HandleCold.
//
// Asking costs a cached read about a microsecond more (preadv2 with
// RWF_NOWAIT instead of a copy from the image's mapping), so the owner
// does not ask on every read: one read in probeEvery asks, and after a
// miss every read asks until probeSpan reads in a row found their data in
// memory. A cold read between probes still blocks the owner, as every read
// did before; the next miss makes all reads ask.

// CachedReader is an optional Disk upgrade for a reader that must not wait
// for the disk. ReadVecCached reads bufs only if the data is in memory and
// reports false otherwise (bufs then hold anything; nothing is wrong).
// ReadVecCold reads as ReadVec does, in the way that costs least when the
// data must come from the disk.
type CachedReader interface {
	ReadVecCached(bufs [][]byte, off int64) (bool, error)
	ReadVecCold(bufs [][]byte, off int64) error
}

// errNotCached is how readWrite tells run that an inline read missed; it
// never becomes a status.
var errNotCached = errors.New("blk: read data not in memory")

// readMode says how a Handler reads IN data.
type readMode uint8

const (
	readPlain  readMode = iota // Handle: ReadVec
	readInline                 // TryHandle: may leave a cold read undone
	readCold                   // HandleCold: ReadVecCold
)

const (
	// probeEvery: between misses, one inline read in probeEvery asks
	// whether its data is cached.
	probeEvery = 64
	// probeSpan: after a miss, this many inline reads in a row must find
	// their data cached before reads stop asking.
	probeSpan = 1024
)

// coldProbe decides which inline reads ask (see above). Its zero value
// asks at the first read: a queue that just started likely serves an
// image the page cache has not seen. One per Handler: no locking.
type coldProbe struct {
	untilProbe uint32 // reads that do not ask before the next one that does
	span       uint32 // reads left that ask, after a miss
}

// due reports whether this read asks.
func (p *coldProbe) due() bool {
	if p.span > 0 {
		p.span--
		return true
	}
	if p.untilProbe > 0 {
		p.untilProbe--
		return false
	}
	p.untilProbe = probeEvery - 1
	return true
}

func (p *coldProbe) missed() { p.span = probeSpan }

// TryHandle is Handle for a caller that must not wait for the disk: an IN
// request whose data is not all in memory (the Disk is a CachedReader and
// said so) is left undone: done is false, no status is written, nothing is
// counted, and the caller runs the request again with HandleCold. Any
// other request is handled as Handle does (done true).
func (h *Handler) TryHandle(readable, writable [][]byte) (written uint32, done bool) {
	h.readMode = readInline
	return h.run(readable, writable)
}

// HandleCold is Handle for a request TryHandle left undone: its IN data is
// read with ReadVecCold.
func (h *Handler) HandleCold(readable, writable [][]byte) uint32 {
	h.readMode = readCold
	written, _ := h.run(readable, writable)
	return written
}

// read fills h.data from byte offset off as h.readMode says.
func (h *Handler) read(off int64) error {
	switch {
	case h.cached == nil || h.readMode == readPlain:
		return h.disk.ReadVec(h.data, off)
	case h.readMode == readCold:
		return h.cached.ReadVecCold(h.data, off)
	case !h.probe.due():
		return h.disk.ReadVec(h.data, off)
	}
	ok, err := h.cached.ReadVecCached(h.data, off)
	if err == nil && !ok {
		h.probe.missed()
		return errNotCached
	}
	return err
}

// ReadVecCached asks the disk in service; one that is not a CachedReader
// reads with ReadVec and reports true.
func (r *DiskRef) ReadVecCached(bufs [][]byte, off int64) (bool, error) {
	d := r.cur.Load().d
	if c, ok := d.(CachedReader); ok {
		return c.ReadVecCached(bufs, off)
	}
	return true, d.ReadVec(bufs, off)
}

// ReadVecCold asks the disk in service; one that is not a CachedReader
// reads with ReadVec.
func (r *DiskRef) ReadVecCold(bufs [][]byte, off int64) error {
	d := r.cur.Load().d
	if c, ok := d.(CachedReader); ok {
		return c.ReadVecCold(bufs, off)
	}
	return d.ReadVec(bufs, off)
}
