package vhostuser

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// session is the state of one front-end connection.
//
// Locking model (go-fuse dispatchMu, virtiofsd vu_dispatch_rwlock): one
// goroutine (run) reads the socket and handles messages one at a time, so
// control state needs no lock against itself. mu is the dispatch lock:
// the control goroutine takes it for writing while it changes anything a
// queue worker reads (guest memory, a ring's queue, call/err fds); workers
// take it for reading while they drain a batch. Request processing thus
// never shares a lock across queues on the data path, and a mapping is
// unmapped only after every worker has left it.
type session struct {
	id   uint64
	opts Options
	ev   Events
	w    *wireConn

	offered    uint64 // virtio features offered
	acked      uint64 // virtio features from SET_FEATURES
	featuresOK bool   // SET_FEATURES received
	protoAcked uint64 // protocol features from SET_PROTOCOL_FEATURES
	status     uint8  // SET_STATUS

	// replyFD is an fd to attach to the reply being built (GET_INFLIGHT_FD),
	// owned by the session until run has sent and closed it.
	replyFD int

	mu sync.RWMutex
	// reqs counts the requests in flight on every queue (drain.go); the
	// control path and Monitor.Quiesce drain it before touching what
	// requests use.
	reqs *requestGate
	mem  *guestMem // +checklocks:mu (written under mu, read by workers under RLock)
	// rings has one slot per offered queue; a slot stays nil until a
	// message names that ring (ring), so queues the front-end never sets
	// up cost one pointer each. Only the control goroutine reads or
	// writes the slice and its slots.
	rings []*ring
	// backend is the channel from SET_BACKEND_REQ_FD (backend.go): set
	// and closed by the control goroutine, used by ConfigNotifier callers.
	backend atomic.Pointer[backendChannel]
	// inflight is the buffer from SET_INFLIGHT_FD, nil without one. Only
	// the control goroutine reads it; queues hold their region's slice,
	// so it is replaced only while no ring is started.
	inflight *inflightMap
	// logState is the dirty log (dirtylog.go).
	logState
	// ctx is the Serve context: it ends a wait for Options.Gate.
	ctx context.Context
	// snap is the negotiated state for Monitor (status.go), replaced by
	// the control goroutine after each message.
	snap atomic.Pointer[sessionSnap]
}

// ring is one virtqueue's vhost-user state (vhost-user spec, "Ring states").
type ring struct {
	index   int
	num     uint16 // 0 until SET_VRING_NUM
	addr    VringAddr
	addrSet bool
	base    uint32 // next avail index (split) or packed indices (PackedBase) for the next start

	enabled atomic.Bool // SET_VRING_ENABLE, or SET_FEATURES without bit 30

	// Written under mu (write), read by the worker under mu (read).
	q      virtqueue.Queue // non-nil while started
	callFD int             // -1: none
	errFD  int             // -1: none

	w *worker // non-nil while started; control goroutine only
}

func newSession(id uint64, c *net.UnixConn, opts Options) *session {
	s := &session{
		id:      id,
		opts:    opts,
		ev:      opts.Events,
		w:       newWireConn(c),
		offered: blk.Features(opts.Disk, opts.Blk) | FeatureVersion1 | FeatureEventIdx | FeatureIndirectDesc | FeatureRingPacked | FeatureProtocolFeatures,
		replyFD: -1,
		reqs:    newRequestGate(),
	}
	s.logFD = -1
	s.offered |= FeatureLogAll
	s.rings = make([]*ring, opts.NumQueues)
	return s
}

// run handles messages until the connection ends. io.EOF between messages
// is an orderly end (nil).
func (s *session) run() error {
	for {
		m, err := s.w.readMessage()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		reply, err := s.handle(m)
		if me, ok := s.ev.(MessageEvents); ok {
			me.MessageHandled(s.id, m.spec.name, err)
		}
		s.publish()
		m.closeFDs()
		fd := s.replyFD
		s.replyFD = -1
		ackWanted := s.protoAcked&ProtoReplyAck != 0 && m.hdr.Flags&FlagNeedReply != 0
		if err != nil && !errors.Is(err, errRefused) {
			closeFD(&fd)
			if ackWanted && !m.spec.reply {
				// Best effort: tell the front-end why it is being dropped.
				_ = s.w.writeReply(m.hdr.Request, le.AppendUint64(nil, 1))
			}
			return err
		}
		switch {
		case m.spec.reply:
			err = s.w.writeReplyFD(m.hdr.Request, reply, fd)
			closeFD(&fd)
		case ackWanted:
			// REPLY_ACK: u64 0 on success, non-zero on failure, only for
			// requests without an explicit reply (spec "REPLY_ACK").
			var status uint64
			if err != nil {
				status = 1
			}
			err = s.w.writeReply(m.hdr.Request, le.AppendUint64(nil, status))
		default:
			err = nil
		}
		if err != nil {
			return err
		}
	}
}

// teardown stops every worker (after its in-flight requests complete),
// closes every fd and unmaps guest memory.
func (s *session) teardown() {
	s.closeBackend()
	live := s.liveRings()
	for _, r := range live {
		s.stopRing(r)
	}
	s.mu.Lock()
	mem, inf := s.mem, s.inflight
	s.mem, s.inflight = nil, nil
	for _, r := range live {
		closeFD(&r.callFD)
		closeFD(&r.errFD)
	}
	s.mu.Unlock()
	mem.unmap()
	inf.unmap()
	s.closeLog()
}

func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

// handle executes one validated request and returns the reply body for
// requests that have one.
func (s *session) handle(m *message) ([]byte, error) {
	name := m.spec.name
	if m.spec.proto != 0 && s.protoAcked&m.spec.proto == 0 {
		return nil, fmt.Errorf("%s: protocol feature %#x not negotiated: %w", name, m.spec.proto, ErrState)
	}
	p := m.payload
	switch m.hdr.Request {
	case ReqGetFeatures:
		return le.AppendUint64(nil, s.offered), nil
	case ReqSetFeatures:
		return nil, s.setFeatures(le.Uint64(p))
	case ReqGetProtocolFeatures:
		return le.AppendUint64(nil, ProtocolFeatures), nil
	case ReqSetProtocolFeatures:
		v := le.Uint64(p)
		if v&^uint64(ProtocolFeatures) != 0 {
			return nil, fmt.Errorf("%s: bits %#x not offered: %w", name, v&^uint64(ProtocolFeatures), ErrUnsupported)
		}
		s.protoAcked = v
		return nil, nil
	case ReqSetOwner:
		// Session start; nothing to allocate (spec: "issued when a new
		// connection is established").
		return nil, nil
	case ReqResetOwner, ReqResetDevice:
		// RESET_OWNER is deprecated; both disable all rings and return
		// the device to its initial state. Memory and protocol features
		// survive: ownership is retained (spec "RESET_DEVICE").
		s.reset()
		return nil, nil
	case ReqSetMemTable:
		return nil, s.setMemTable(m)
	case ReqSetLogBase:
		return s.setLogBase(m)
	case ReqSetLogFD:
		return nil, s.setLogFD(m)
	case ReqGetMaxMemSlots:
		return le.AppendUint64(nil, MaxMemSlots), nil
	case ReqAddMemReg:
		return nil, s.addMemReg(m)
	case ReqRemMemReg:
		return nil, s.remMemReg(m)
	case ReqGetQueueNum:
		return le.AppendUint64(nil, uint64(s.opts.NumQueues)), nil
	case ReqSetVringNum:
		return nil, s.setVringNum(p)
	case ReqSetVringAddr:
		return nil, s.setVringAddr(p)
	case ReqSetVringBase:
		st, _ := ParseVringState(p)
		r, err := s.ring(name, st.Index)
		if err != nil {
			return nil, err
		}
		if r.w != nil {
			return nil, fmt.Errorf("%s: ring %d is started: %w", name, st.Index, ErrState)
		}
		// Split rings: the next avail index is 16 bits (spec "Vring
		// descriptor indices"). Packed rings: both positions with their
		// wrap counters in 32 bits (spec "Vring descriptor indices for
		// packed virtqueues"); the indices are checked against the ring
		// size when the ring starts (NewPackedQueue).
		if !s.packed() && st.Num > 0xffff {
			return nil, fmt.Errorf("%s: ring %d base %d > 65535: %w", name, st.Index, st.Num, ErrInvalidMessage)
		}
		r.base = st.Num
		return nil, nil
	case ReqGetVringBase:
		st, _ := ParseVringState(p)
		r, err := s.ring(name, st.Index)
		if err != nil {
			return nil, err
		}
		// Stops the ring after its in-flight requests complete (spec
		// "GET_VRING_BASE"; vhost-user.md §1.7 drain rule).
		s.stopRing(r)
		return AppendVringState(nil, VringState{Index: st.Index, Num: r.base}), nil
	case ReqSetVringKick:
		return nil, s.setVringKick(m)
	case ReqSetVringCall, ReqSetVringErr:
		return nil, s.setVringFD(m)
	case ReqSetVringEnable:
		st, _ := ParseVringState(p)
		r, err := s.ring(name, st.Index)
		if err != nil {
			return nil, err
		}
		if st.Num > 1 {
			return nil, fmt.Errorf("%s: ring %d num %d not 0 or 1: %w", name, st.Index, st.Num, ErrInvalidMessage)
		}
		if st.Num == 0 {
			// Under the write lock: an owner that saw the ring enabled
			// pops under the read lock, so once this returns (and the
			// front-end has its REPLY_ACK) no chain is taken from the
			// disabled ring. A polling owner would otherwise take a
			// request published right after the ack.
			s.mu.Lock()
			r.enabled.Store(false)
			s.mu.Unlock()
			return nil, nil
		}
		r.enabled.Store(true)
		if r.w != nil {
			r.w.wake()
		}
		return nil, nil
	case ReqGetConfig:
		// Built at each read: capacity is the disk's size now, writeback
		// the current cache mode.
		config := blk.Config(s.opts.Disk, s.opts.Blk)
		c, _ := ParseConfig(p)
		end := uint64(c.Offset) + uint64(c.Size)
		if c.Size == 0 || end > uint64(len(config)) {
			// An empty payload signals failure (spec "GET_CONFIG").
			return nil, nil
		}
		return AppendConfig(nil, ConfigMsg{Offset: c.Offset, Flags: c.Flags, Data: config[c.Offset:end]}), nil
	case ReqSetConfig:
		return nil, s.setConfig(p)
	case ReqSetBackendReqFD:
		return nil, s.setBackendReqFD(m)
	case ReqGetInflightFD:
		req, _ := ParseInflight(p)
		fd, reply, err := newInflightFD(req, len(s.rings), s.packed())
		if err != nil {
			return nil, err
		}
		s.replyFD = fd
		return AppendInflight(nil, reply), nil
	case ReqSetInflightFD:
		return nil, s.setInflightFD(m)
	case ReqSetStatus:
		v := le.Uint64(p)
		if v > 0xff {
			return nil, fmt.Errorf("%s: status %#x > 0xff: %w", name, v, ErrInvalidMessage)
		}
		s.status = uint8(v)
		return nil, nil
	case ReqGetStatus:
		return le.AppendUint64(nil, uint64(s.status)), nil
	}
	// Unreachable: checkHeader only admits requests in msgTable.
	return nil, fmt.Errorf("%s: no handler: %w", name, ErrUnsupported)
}

// setConfig applies a SET_CONFIG. The only writable field is `writeback`
// (VIRTIO 1.2 §5.2.4, with VIRTIO_BLK_F_CONFIG_WCE negotiated; QEMU
// forwards nothing else, vhost-user.md §1.11). A write must have flags 0
// (a front-end write, not migration), lie inside the config, leave every
// other byte as it is and put 0 or 1 in writeback; anything else is
// refused without ending the session (REPLY_ACK status 1) and changes
// nothing. Switching to write-through flushes the disk before the reply,
// so writes completed in write-back mode are durable too.
func (s *session) setConfig(p []byte) error {
	c, _ := ParseConfig(p)
	cur := blk.Config(s.opts.Disk, s.opts.Blk)
	end := uint64(c.Offset) + uint64(c.Size)
	if c.Flags != 0 || end > uint64(len(cur)) {
		return fmt.Errorf("SET_CONFIG: offset %d size %d flags %d: %w", c.Offset, c.Size, c.Flags, errRefused)
	}
	next := bytes.Clone(cur)
	copy(next[c.Offset:end], c.Data)
	for i := range cur {
		if i != blk.ConfigWriteback && next[i] != cur[i] {
			return fmt.Errorf("SET_CONFIG: offset %d size %d changes read-only byte %d: %w", c.Offset, c.Size, i, errRefused)
		}
	}
	wb := next[blk.ConfigWriteback]
	switch {
	case wb == cur[blk.ConfigWriteback]:
		return nil
	case s.acked&(1<<blk.FeatureConfigWCE) == 0:
		return fmt.Errorf("SET_CONFIG: writeback %d without VIRTIO_BLK_F_CONFIG_WCE negotiated: %w", wb, errRefused)
	case wb > 1:
		return fmt.Errorf("SET_CONFIG: writeback %d not 0 or 1: %w", wb, errRefused)
	}
	s.opts.Blk.Cache.SetWriteThrough(wb == 0)
	if ce, ok := s.ev.(CacheEvents); ok {
		ce.WriteCacheChanged(s.id, wb == 0)
	}
	if wb == 0 {
		if err := s.opts.Disk.Flush(); err != nil {
			return fmt.Errorf("SET_CONFIG: write-through: flushing earlier writes: %v: %w", err, errRefused)
		}
	}
	return nil
}

// ring range-checks a wire ring index (style.md §12 item 5) and returns
// its state, creating it on first use.
func (s *session) ring(name string, idx uint32) (*ring, error) {
	if idx >= uint32(len(s.rings)) {
		return nil, fmt.Errorf("%s: ring index %d >= %d queues: %w", name, idx, len(s.rings), ErrInvalidMessage)
	}
	r := s.rings[idx]
	if r == nil {
		r = &ring{index: int(idx), callFD: -1, errFD: -1}
		// Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled
		// (spec "Ring states"), including those first named after
		// SET_FEATURES.
		if s.featuresOK && s.acked&FeatureProtocolFeatures == 0 {
			r.enabled.Store(true)
		}
		s.rings[idx] = r
	}
	return r, nil
}

// liveRings returns the rings a message has named so far.
func (s *session) liveRings() []*ring {
	var rs []*ring
	for _, r := range s.rings {
		if r != nil {
			rs = append(rs, r)
		}
	}
	return rs
}

func (s *session) anyStarted() bool {
	for _, r := range s.liveRings() {
		if r.w != nil {
			return true
		}
	}
	return false
}

func (s *session) setFeatures(v uint64) error {
	if v&^s.offered != 0 {
		return fmt.Errorf("SET_FEATURES: bits %#x not offered: %w", v&^s.offered, ErrUnsupported)
	}
	// Legacy (pre-1.0) drivers are not supported (libvhost-user
	// vu_set_features_exec: "virtio legacy devices aren't supported").
	if v&FeatureVersion1 == 0 {
		return fmt.Errorf("SET_FEATURES: VIRTIO_F_VERSION_1 not set in %#x: %w", v, ErrUnsupported)
	}
	// QEMU toggles VHOST_F_LOG_ALL on running rings when a migration
	// starts or ends (vhost_dev_set_log); nothing else may change then.
	if s.featuresOK && (v^s.acked) == FeatureLogAll {
		s.mu.Lock()
		s.acked = v
		s.updateLogging()
		s.mu.Unlock()
		return nil
	}
	// EVENT_IDX changes how a running ring is driven; QEMU only sets
	// features while the rings are stopped.
	if s.anyStarted() {
		return fmt.Errorf("SET_FEATURES: a ring is started: %w", ErrState)
	}
	s.mu.Lock()
	s.acked = v
	s.updateLogging()
	s.mu.Unlock()
	s.featuresOK = true
	if v&(1<<blk.FeatureConfigWCE) != 0 && v&(1<<blk.FeatureFlush) == 0 {
		// A driver that cannot flush gets a write-through cache
		// (VIRTIO 1.2 §5.2.5: writeback starts at 0 without FLUSH).
		s.opts.Blk.Cache.SetWriteThrough(true)
	}
	if v&FeatureProtocolFeatures == 0 {
		// Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled
		// (spec "Ring states").
		for _, r := range s.liveRings() {
			r.enabled.Store(true)
		}
	}
	return nil
}

// reset stops every ring and forgets ring and feature state.
func (s *session) reset() {
	for _, r := range s.liveRings() {
		s.stopRing(r)
	}
	s.mu.Lock()
	for i, r := range s.rings {
		if r == nil {
			continue
		}
		closeFD(&r.callFD)
		closeFD(&r.errFD)
		s.rings[i] = nil
	}
	s.acked, s.featuresOK, s.status = 0, false, 0
	s.updateLogging()
	s.mu.Unlock()
}

func (s *session) setMemTable(m *message) error {
	regions, err := ParseMemTable(m.payload)
	if err != nil {
		return err
	}
	g, err := mapRegions(regions, m.fds)
	// The fds are closed by the dispatcher right after this returns: the
	// mappings keep the memory alive.
	if err != nil {
		return err
	}
	// installMem quiesces the workers (they drain under the read lock)
	// and re-translates started rings; all or nothing.
	if err := s.installMem(g); err != nil {
		g.unmap()
		return fmt.Errorf("SET_MEM_TABLE: %w", err)
	}
	return nil
}

func (s *session) setVringNum(p []byte) error {
	st, _ := ParseVringState(p)
	r, err := s.ring("SET_VRING_NUM", st.Index)
	if err != nil {
		return err
	}
	// VIRTIO 1.2 §2.7: "Queue Size ... a power of 2 ... maximum 32768".
	if st.Num == 0 || st.Num > MaxQueueSize || bits.OnesCount32(st.Num) != 1 {
		return fmt.Errorf("SET_VRING_NUM: ring %d num %d not a power of two in 1..%d: %w", st.Index, st.Num, MaxQueueSize, ErrInvalidMessage)
	}
	if r.w != nil {
		return fmt.Errorf("SET_VRING_NUM: ring %d is started: %w", st.Index, ErrState)
	}
	r.num = uint16(st.Num) // 32768 fits
	return nil
}

func (s *session) setVringAddr(p []byte) error {
	a, _ := ParseVringAddr(p)
	r, err := s.ring("SET_VRING_ADDR", a.Index)
	if err != nil {
		return err
	}
	if a.Flags&^vringFlagLog != 0 {
		return fmt.Errorf("SET_VRING_ADDR: ring %d flags %#x: %w", a.Index, a.Flags, ErrInvalidMessage)
	}
	// VIRTIO 1.2 §2.7 alignment: descriptor table 16, avail 2, used 4.
	if a.Desc%16 != 0 || a.Avail%2 != 0 || a.Used%4 != 0 {
		return fmt.Errorf("SET_VRING_ADDR: ring %d misaligned desc %#x avail %#x used %#x: %w", a.Index, a.Desc, a.Avail, a.Used, ErrInvalidMessage)
	}
	if r.w != nil {
		// A started ring accepts only a change of the log flag and
		// address (QEMU's vhost_dev_set_log when migration starts or
		// ends), which workers read under the dispatch lock.
		if a.Desc != r.addr.Desc || a.Avail != r.addr.Avail || a.Used != r.addr.Used {
			return fmt.Errorf("SET_VRING_ADDR: ring %d is started: %w", a.Index, ErrState)
		}
		s.mu.Lock()
		r.addr = a
		s.mu.Unlock()
		return nil
	}
	r.addr, r.addrSet = a, true
	// Check the placement now when we can, so the error names this
	// message; SET_VRING_KICK checks again.
	if !s.mem.empty() && r.num != 0 {
		if err := checkRingPlacement(s.mem.mem, r, s.packed()); err != nil {
			return fmt.Errorf("SET_VRING_ADDR: ring %d: %w", a.Index, err)
		}
	}
	return nil
}

// checkRingPlacement requires the three ring parts to lie inside one
// region each (VIRTIO 1.2 §2.7 sizes).
func checkRingPlacement(mem *virtqueue.Memory, r *ring, packed bool) error {
	n := uint64(r.num)
	parts := [...]struct {
		name      string
		uva, size uint64
	}{
		{"descriptor table", r.addr.Desc, 16 * n},
		{"avail ring", r.addr.Avail, 6 + 2*n},
		{"used ring", r.addr.Used, 6 + 8*n},
	}
	if packed {
		// VIRTIO 1.2 §2.8.10: the driver and device event suppression
		// areas are 4 bytes each.
		parts[1].name, parts[1].size = "driver event suppression area", virtqueue.EventSuppressSize
		parts[2].name, parts[2].size = "device event suppression area", virtqueue.EventSuppressSize
	}
	for _, pt := range parts {
		if _, err := mem.UserSlice(pt.uva, pt.size); err != nil {
			return fmt.Errorf("%s at %#x+%d outside guest memory: %v: %w", pt.name, pt.uva, pt.size, err, ErrGuestMemory)
		}
	}
	return nil
}

// packed reports whether the rings use the packed layout
// (VIRTIO_F_RING_PACKED acked; QEMU sets features before configuring rings).
func (s *session) packed() bool { return s.acked&FeatureRingPacked != 0 }

// newQueue builds a split or packed queue for r on the current memory,
// tracking its requests in r's inflight region if the front-end set one.
// base is the vring base (split: next avail index; packed: PackedBase).
// Preconditions: s.mem != nil; if workers may run, mu is held for writing.
func (s *session) newQueue(r *ring, base uint32) (q virtqueue.Queue, err error) {
	packed := s.packed()
	if err := checkRingPlacement(s.mem.mem, r, packed); err != nil {
		return nil, err
	}
	region, err := s.inflight.queue(r.index, r.num, packed)
	if err != nil {
		return nil, err
	}
	err = guardFault(func() error {
		var e error
		q, e = virtqueue.NewQueue(s.mem.mem, virtqueue.QueueConfig{
			Size:          r.num,
			DescUserAddr:  r.addr.Desc,
			AvailUserAddr: r.addr.Avail,
			UsedUserAddr:  r.addr.Used,
			EventIdx:      s.acked&FeatureEventIdx != 0,
			NoIndirect:    s.acked&FeatureIndirectDesc == 0,
			Packed:        packed,
			NextAvail:     uint16(base),
			NextUsed:      uint16(base >> 16),
			Inflight:      region,
		})
		return e
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, ErrGuestMemory)
	}
	return q, nil
}

// setInflightFD maps the front-end's inflight buffer (vhost-user.md
// §1.10). QEMU sends it before starting the rings, on the first start with
// the buffer GET_INFLIGHT_FD just created and after every reconnect with
// the one it kept; the rings read it when they start.
func (s *session) setInflightFD(m *message) error {
	req, _ := ParseInflight(m.payload)
	if s.anyStarted() {
		return fmt.Errorf("SET_INFLIGHT_FD: a ring is started: %w", ErrState)
	}
	im, err := mapInflight(req, m.fds[0], len(s.rings), s.packed())
	if err != nil {
		return err
	}
	// The dispatcher closes the fd: the mapping keeps the buffer.
	s.mu.Lock()
	old := s.inflight
	s.inflight = im
	s.mu.Unlock()
	old.unmap()
	return nil
}

func (s *session) setVringKick(m *message) error {
	v := le.Uint64(m.payload)
	r, err := s.ring("SET_VRING_KICK", uint32(v&VringIndexMask))
	if err != nil {
		return err
	}
	if v&VringNoFDFlag != 0 {
		return fmt.Errorf("SET_VRING_KICK: ring %d without fd (polling): %w", r.index, ErrUnsupported)
	}
	if err := checkNotifyFD(m.fds[0], "kick"); err != nil {
		return fmt.Errorf("SET_VRING_KICK: ring %d: %w", r.index, err)
	}
	// A new kick fd for a started ring restarts it with the new fd.
	s.stopRing(r)
	if s.mem.empty() || r.num == 0 || !r.addrSet {
		return fmt.Errorf("SET_VRING_KICK: ring %d not configured (memory %t, num %d, addr %t): %w",
			r.index, !s.mem.empty(), r.num, r.addrSet, ErrState)
	}
	q, err := s.newQueue(r, r.base)
	if err != nil {
		return fmt.Errorf("SET_VRING_KICK: ring %d: %w", r.index, err)
	}
	// Only one front-end's rings run at a time (handoff.go).
	if err := s.gateAcquire(); err != nil {
		return fmt.Errorf("SET_VRING_KICK: ring %d: %w", r.index, err)
	}
	fd := m.takeFD(0)
	// Non-blocking, so os.NewFile returns a pollable File: Read parks the
	// goroutine and Close unblocks it (style.md §10.5).
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return fmt.Errorf("SET_VRING_KICK: ring %d: fd: %v: %w", r.index, err, ErrInvalidMessage)
	}
	kick := os.NewFile(uintptr(fd), fmt.Sprintf("vhost-user-kick-%d", r.index))
	if s.featuresOK && s.acked&FeatureProtocolFeatures == 0 {
		r.enabled.Store(true)
	}
	if n := q.Resubmits(); n > 0 {
		if re, ok := s.ev.(RecoveryEvents); ok {
			re.QueueRecovered(s.id, r.index, n)
		}
	}
	s.mu.Lock()
	r.q = q
	call := r.callFD
	s.mu.Unlock()
	r.w = startWorker(s, r, kick)
	// A previous back-end may have put completions in the used ring and
	// died before it notified the driver (recovery then finishes them
	// instead of redoing them), and QEMU 7.2 sends SET_VRING_CALL before
	// SET_VRING_KICK, so the notification below in setVringFD never comes
	// after a start there. Notify once per start, as libvhost-user does
	// for every new call fd "in case of I/O hang after reconnecting"; a
	// spurious interrupt is harmless (VIRTIO 1.2 §2.7.10), a lost one
	// hangs the driver.
	if call >= 0 {
		notifyCall(call)
	}
	return nil
}

// notifyCall writes one used-buffer notification to a call eventfd. The
// fd is non-blocking (setVringFD); a failed write is a dropped
// notification, which the driver tolerates.
func notifyCall(fd int) {
	var one [8]byte
	le.PutUint64(one[:], 1)
	_, _ = unix.Write(fd, one[:])
}

func (s *session) setVringFD(m *message) error {
	name := m.spec.name
	v := le.Uint64(m.payload)
	r, err := s.ring(name, uint32(v&VringIndexMask))
	if err != nil {
		return err
	}
	fd := -1
	if v&VringNoFDFlag == 0 {
		role := "call"
		if m.hdr.Request == ReqSetVringErr {
			role = "err"
		}
		if err := checkNotifyFD(m.fds[0], role); err != nil {
			return fmt.Errorf("%s: ring %d: %w", name, r.index, err)
		}
		fd = m.takeFD(0)
		// A full pipe posing as an eventfd must not block a worker that
		// holds the dispatch lock; a failed write is a dropped
		// notification, which the guest tolerates.
		_ = unix.SetNonblock(fd, true)
	}
	s.mu.Lock()
	slot := &r.callFD
	if m.hdr.Request == ReqSetVringErr {
		slot = &r.errFD
	}
	old := *slot
	*slot = fd
	s.mu.Unlock()
	if old >= 0 {
		unix.Close(old)
	}
	// Newer QEMU sends SET_VRING_CALL after SET_VRING_KICK (vhost-user.md
	// §1.13 item 5), so a started ring may already have completed requests
	// whose notification had no fd to go to. Signal the new fd once, as
	// libvhost-user does; setVringKick does the same for the other order.
	if m.hdr.Request == ReqSetVringCall && fd >= 0 && r.w != nil {
		notifyCall(fd)
	}
	return nil
}

// stopRing stops r's worker, if any, after its in-flight requests complete
// and records where the ring stopped. Preconditions: mu not held (the
// worker may be waiting for the read lock).
func (s *session) stopRing(r *ring) {
	if r.w == nil {
		return
	}
	r.w.stopAndWait()
	r.w = nil
	s.mu.Lock()
	r.base = r.q.Base()
	r.q = nil
	s.mu.Unlock()
	s.gateReleaseIfIdle()
}
