package vhostuser

import (
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
)

// Monitor reports the state of the vhost-user device for a control
// socket: whether a front-end is connected, what it negotiated, which
// queues run. Give one to Options.Monitor; Status is safe to call from any
// goroutine, connected or not.
//
// One Monitor may be shared by the Serve calls of one device on several
// sockets (serve --socket-path A --socket-path B, a migration on one
// host): it keeps every connection being served, each with the socket it
// came in on, and Status reports each socket's front-end in Frontends.
//
// The connection goroutine publishes an immutable snapshot of its
// negotiated state after every message it handles (an atomic pointer
// swap; control messages are rare), so Status never touches state the
// connection goroutine owns; whether a ring is enabled or broken is read
// live from its atomics.
type Monitor struct {
	mu      sync.Mutex
	sockets []string    // every socket served or connected to, in first-seen order; under mu
	live    []*attached // connections being served, in attach order; under mu
	total   uint64      // connections served, under mu
}

// attached is a connection the Monitor reports.
type attached struct {
	s      *session
	since  time.Time
	socket string
}

// QueueStatus is one ring the front-end set up.
type QueueStatus struct {
	Index   int    `json:"index"`
	Size    uint16 `json:"size"`
	Started bool   `json:"started"` // SET_VRING_KICK received, worker running
	Enabled bool   `json:"enabled"`
	Broken  bool   `json:"broken"` // a ring-level error stopped it
}

// DeviceStatus is what Monitor.Status reports. Its top-level fields
// describe the active front-end: the one whose rings run (with a
// RingGate, its owner), else the one that connected last. Frontends has
// one entry per socket seen, connected or not, and one more per extra
// connection on a socket (ServeConn).
type DeviceStatus struct {
	Connected        bool             `json:"connected"`
	Conn             uint64           `json:"conn,omitempty"`
	ConnectedFor     time.Duration    `json:"connected_for_ns,omitempty"`
	Connections      uint64           `json:"connections"` // served since start, this one included
	FeaturesAcked    bool             `json:"features_acked"`
	Features         uint64           `json:"features"`
	FeatureNames     []string         `json:"feature_names"`
	ProtocolFeatures uint64           `json:"protocol_features"`
	ProtocolNames    []string         `json:"protocol_feature_names"`
	DeviceStatus     uint8            `json:"device_status"` // SET_STATUS
	Queues           []QueueStatus    `json:"queues"`
	Frontends        []FrontendStatus `json:"frontends"`
}

// FrontendStatus is one socket's front-end.
type FrontendStatus struct {
	Socket           string        `json:"socket"`
	Connected        bool          `json:"connected"`
	Active           bool          `json:"active"` // the one DeviceStatus's top-level fields describe
	Conn             uint64        `json:"conn,omitempty"`
	ConnectedFor     time.Duration `json:"connected_for_ns,omitempty"`
	FeaturesAcked    bool          `json:"features_acked"`
	Features         uint64        `json:"features"`
	FeatureNames     []string      `json:"feature_names"`
	ProtocolFeatures uint64        `json:"protocol_features"`
	ProtocolNames    []string      `json:"protocol_feature_names"`
	DeviceStatus     uint8         `json:"device_status"`
	Queues           []QueueStatus `json:"queues"`
}

// Status returns the device's state at this moment.
func (m *Monitor) Status() DeviceStatus {
	m.mu.Lock()
	sockets := slices.Clone(m.sockets)
	live := slices.Clone(m.live)
	total := m.total
	m.mu.Unlock()
	st := DeviceStatus{Connections: total, Queues: []QueueStatus{}, FeatureNames: []string{}, ProtocolNames: []string{},
		Frontends: []FrontendStatus{}}
	active := activeOf(live)
	for _, sock := range sockets {
		n := 0
		for _, a := range live {
			if a.socket == sock {
				st.Frontends = append(st.Frontends, a.status(a == active))
				n++
			}
		}
		if n == 0 {
			st.Frontends = append(st.Frontends, FrontendStatus{Socket: sock, Queues: []QueueStatus{},
				FeatureNames: []string{}, ProtocolNames: []string{}})
		}
	}
	if active == nil {
		return st
	}
	f := active.status(true)
	st.Connected, st.Conn, st.ConnectedFor = true, f.Conn, f.ConnectedFor
	st.FeaturesAcked, st.Features, st.ProtocolFeatures, st.DeviceStatus = f.FeaturesAcked, f.Features, f.ProtocolFeatures, f.DeviceStatus
	st.FeatureNames, st.ProtocolNames, st.Queues = f.FeatureNames, f.ProtocolNames, f.Queues
	return st
}

// activeOf picks the connection whose rings run: the RingGate's owner if
// one is, else the last attached; nil without a connection.
func activeOf(live []*attached) *attached {
	if len(live) == 0 {
		return nil
	}
	for _, a := range live {
		if g := a.s.opts.Gate; g != nil && g.Owner() == a.s.id {
			return a
		}
	}
	return live[len(live)-1]
}

// status reads one connection's published snapshot and ring atomics.
func (a *attached) status(active bool) FrontendStatus {
	s := a.s
	f := FrontendStatus{Socket: a.socket, Connected: true, Active: active, Conn: s.id, ConnectedFor: time.Since(a.since),
		Queues: []QueueStatus{}, FeatureNames: []string{}, ProtocolNames: []string{}}
	snap := s.snap.Load()
	if snap == nil {
		return f
	}
	f.FeaturesAcked, f.Features, f.ProtocolFeatures, f.DeviceStatus = snap.featuresOK, snap.acked, snap.proto, snap.status
	f.FeatureNames = bitNames(snap.acked, featureNames)
	f.ProtocolNames = bitNames(snap.proto, protocolNames)
	for _, r := range snap.rings {
		q := QueueStatus{Index: r.index, Size: r.num, Started: r.w != nil, Enabled: r.r.enabled.Load()}
		if r.w != nil {
			q.Broken = r.w.broken.Load()
		}
		f.Queues = append(f.Queues, q)
	}
	return f
}

// listening lists socket (Serve), so Status shows it before any
// front-end connects to it.
func (m *Monitor) listening(socket string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	if !slices.Contains(m.sockets, socket) {
		m.sockets = append(m.sockets, socket)
	}
	m.mu.Unlock()
}

// attach starts reporting s, which came in on socket.
func (m *Monitor) attach(s *session, socket string) {
	if m == nil {
		return
	}
	m.listening(socket)
	m.mu.Lock()
	m.live = append(m.live, &attached{s: s, since: time.Now(), socket: socket})
	m.total++
	m.mu.Unlock()
}

// detach stops reporting s; its socket stays listed, not connected.
func (m *Monitor) detach(s *session) {
	if m == nil {
		return
	}
	m.mu.Lock()
	m.live = slices.DeleteFunc(m.live, func(a *attached) bool { return a.s == s })
	m.mu.Unlock()
}

// sessionSnap is a session's negotiated state as of its last message.
type sessionSnap struct {
	acked, proto uint64
	featuresOK   bool
	status       uint8
	rings        []ringSnap
}

type ringSnap struct {
	index int
	num   uint16
	r     *ring   // for the enabled atomic only
	w     *worker // nil: not started; for the broken atomic only
}

// publish stores a snapshot for Monitor. Control goroutine only.
func (s *session) publish() {
	if s.opts.Monitor == nil {
		return
	}
	snap := &sessionSnap{acked: s.acked, proto: s.protoAcked, featuresOK: s.featuresOK, status: s.status}
	for _, r := range s.rings {
		if r != nil {
			snap.rings = append(snap.rings, ringSnap{index: r.index, num: r.num, r: r, w: r.w})
		}
	}
	s.snap.Store(snap)
}

var featureNames = map[int]string{
	blk.FeatureSizeMax: "SIZE_MAX", blk.FeatureSegMax: "SEG_MAX", blk.FeatureRO: "RO",
	blk.FeatureBlkSize: "BLK_SIZE", blk.FeatureFlush: "FLUSH", blk.FeatureTopology: "TOPOLOGY",
	blk.FeatureConfigWCE: "CONFIG_WCE", blk.FeatureMQ: "MQ", blk.FeatureDiscard: "DISCARD",
	blk.FeatureWriteZeroes: "WRITE_ZEROES",
	28:                     "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX", 30: "PROTOCOL_FEATURES", 32: "VERSION_1",
	34: "RING_PACKED",
}

var protocolNames = map[int]string{
	0: "MQ", 3: "REPLY_ACK", 5: "BACKEND_REQ", 9: "CONFIG", 12: "INFLIGHT_SHMFD",
	13: "RESET_DEVICE", 16: "STATUS",
}

// bitNames names the set bits of v, "bit N" for bits without a name.
func bitNames(v uint64, names map[int]string) []string {
	out := []string{}
	for v != 0 {
		b := bits.TrailingZeros64(v)
		v &^= 1 << b
		if n, ok := names[b]; ok {
			out = append(out, n)
		} else {
			out = append(out, fmt.Sprintf("bit %d", b))
		}
	}
	return out
}

// Quiesce runs f while no request is in progress on any queue of any
// connection and none can start: it drains the request gate of every
// connection being served (drain.go: no queue pops another chain, and
// every request popped before has completed and had its used entry
// published), then holds each one's dispatch lock for writing, until f
// returns. With one device on several sockets that is every
// front-end's queues, not only the one Status shows. Control messages
// from the front-ends wait as well. Without a connected front-end f runs
// with connections held off (a new one waits in attach). Use it to
// replace the disk under a running guest (blk.DiskRef.Swap); keep f
// short: the guest's I/O stalls for as long as it runs. f must not wait
// for a front-end (NotifyConfigChange, say): its messages wait for f.
//
// Lock order: Monitor.mu, then the sessions' mu in attach order; nothing
// that holds a session.mu takes Monitor.mu or another session's mu (a
// control goroutine waiting in RingGate holds none), so taking them all
// cannot deadlock.
func (m *Monitor) Quiesce(f func() error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Workers do I/O without the dispatch lock: hold new requests off and
	// wait for those in flight first, on every connection (drain.go; a
	// drain must not hold a session lock, so all drains come first).
	for _, a := range m.live {
		a.s.reqs.drain()
		defer a.s.reqs.resume()
	}
	for _, a := range m.live {
		a.s.mu.Lock()
		defer a.s.mu.Unlock()
	}
	return f()
}
