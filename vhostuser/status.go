package vhostuser

import (
	"fmt"
	"math/bits"
	"sync"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
)

// Monitor reports the state of the vhost-user device for a control
// socket: whether a front-end is connected, what it negotiated, which
// queues run. Give one to Options.Monitor; Status is safe to call from any
// goroutine, connected or not.
//
// The connection goroutine publishes an immutable snapshot of its
// negotiated state after every message it handles (an atomic pointer
// swap; control messages are rare), so Status never touches state the
// connection goroutine owns; whether a ring is enabled or broken is read
// live from its atomics.
type Monitor struct {
	mu    sync.Mutex
	cur   *session // under mu
	since time.Time
	total uint64 // connections served, under mu
}

// QueueStatus is one ring the front-end set up.
type QueueStatus struct {
	Index   int    `json:"index"`
	Size    uint16 `json:"size"`
	Started bool   `json:"started"` // SET_VRING_KICK received, worker running
	Enabled bool   `json:"enabled"`
	Broken  bool   `json:"broken"` // a ring-level error stopped it
}

// DeviceStatus is what Monitor.Status reports.
type DeviceStatus struct {
	Connected        bool          `json:"connected"`
	Conn             uint64        `json:"conn,omitempty"`
	ConnectedFor     time.Duration `json:"connected_for_ns,omitempty"`
	Connections      uint64        `json:"connections"` // served since start, this one included
	FeaturesAcked    bool          `json:"features_acked"`
	Features         uint64        `json:"features"`
	FeatureNames     []string      `json:"feature_names"`
	ProtocolFeatures uint64        `json:"protocol_features"`
	ProtocolNames    []string      `json:"protocol_feature_names"`
	DeviceStatus     uint8         `json:"device_status"` // SET_STATUS
	Queues           []QueueStatus `json:"queues"`
}

// Status returns the device's state at this moment.
func (m *Monitor) Status() DeviceStatus {
	m.mu.Lock()
	s, since, total := m.cur, m.since, m.total
	m.mu.Unlock()
	st := DeviceStatus{Connections: total, Queues: []QueueStatus{}, FeatureNames: []string{}, ProtocolNames: []string{}}
	if s == nil {
		return st
	}
	st.Connected, st.Conn, st.ConnectedFor = true, s.id, time.Since(since)
	snap := s.snap.Load()
	if snap == nil {
		return st
	}
	st.FeaturesAcked, st.Features, st.ProtocolFeatures, st.DeviceStatus = snap.featuresOK, snap.acked, snap.proto, snap.status
	st.FeatureNames = bitNames(snap.acked, featureNames)
	st.ProtocolNames = bitNames(snap.proto, protocolNames)
	for _, r := range snap.rings {
		q := QueueStatus{Index: r.index, Size: r.num, Started: r.w != nil, Enabled: r.r.enabled.Load()}
		if r.w != nil {
			q.Broken = r.w.broken.Load()
		}
		st.Queues = append(st.Queues, q)
	}
	return st
}

func (m *Monitor) attach(s *session) {
	if m == nil {
		return
	}
	m.mu.Lock()
	m.cur, m.since = s, time.Now()
	m.total++
	m.mu.Unlock()
}

func (m *Monitor) detach(s *session) {
	if m == nil {
		return
	}
	m.mu.Lock()
	if m.cur == s {
		m.cur = nil
	}
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

// Quiesce runs f while no request is in progress on any queue and none
// can start: it drains the connected session's request gate (drain.go:
// no queue pops another chain, and every request popped before has
// completed and had its used entry published), then holds the dispatch
// lock for writing, until f returns. Control messages from the
// front-end wait as well. Without a connected front-end f runs with
// connections held off (a new one waits in attach). Use it to replace the
// disk under a running guest (blk.DiskRef.Swap); keep f short: the guest's
// I/O stalls for as long as it runs. f must not wait for the front-end
// (NotifyConfigChange, say): its messages wait for f.
//
// Lock order: Monitor.mu, then session.mu; nothing that holds session.mu
// takes Monitor.mu.
func (m *Monitor) Quiesce(f func() error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.cur; s != nil {
		// Workers do I/O without the dispatch lock: hold new requests
		// off and wait for those in flight first (drain.go).
		s.reqs.drain()
		defer s.reqs.resume()
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	return f()
}
