package loadgen

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// Virtio-blk feature bits the generator understands and acks
// (VIRTIO 1.2 §5.2.3). SIZE_MAX and SEG_MAX are not acked: every request
// has one data descriptor of up to BS bytes.
const (
	blkFeatRO        = 1 << 5
	blkFeatBlkSize   = 1 << 6
	blkFeatFlush     = 1 << 9
	blkFeatTopology  = 1 << 10
	blkFeatMQ        = 1 << 12
	acceptedFeatures = vhostuser.FeatureVersion1 | vhostuser.FeatureEventIdx | vhostuser.FeatureProtocolFeatures |
		blkFeatRO | blkFeatBlkSize | blkFeatFlush | blkFeatTopology | blkFeatMQ
	acceptedProtocol = vhostuser.ProtoMQ | vhostuser.ProtoReplyAck | vhostuser.ProtoConfig
	configSize       = 60 // struct virtio_blk_config up to write_zeroes_may_unmap
	stallTimeout     = 30 * time.Second
)

// queueSizeFor is the smallest power of two ring holding depth
// three-descriptor requests, at least QEMU's default of 128.
func queueSizeFor(depth int) uint16 {
	s := 128
	for s < 3*depth {
		s *= 2
	}
	return uint16(s)
}

// device is a negotiated connection.
type device struct {
	f        *frontend.Frontend
	rings    [][]*frontend.BlkRing // per stream (main, background), per queue
	capacity int64                 // bytes
	blkSize  int64                 // logical block size
	qsize    uint16                // the main stream's ring size
}

func connect(c *Config) (*device, error) {
	f, err := frontend.Dial(c.Socket)
	if err != nil {
		return nil, err
	}
	d := &device{f: f, blkSize: SectorSize, qsize: queueSizeFor(c.IODepth)}
	if err := d.setup(c); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// setup negotiates in the order QEMU's vhost-user-blk uses (as
// frontend.Setup does) with ring slots sized for the run.
func (d *device) setup(c *Config) error {
	f := d.f
	offered, err := f.GetFeatures()
	if err != nil {
		return fmt.Errorf("GET_FEATURES: %w", err)
	}
	feats := offered & acceptedFeatures
	if c.NoEventIdx {
		feats &^= vhostuser.FeatureEventIdx
	}
	if feats&vhostuser.FeatureProtocolFeatures == 0 {
		return fmt.Errorf("%w: no VHOST_USER_F_PROTOCOL_FEATURES, so no GET_CONFIG for the capacity", ErrBackend)
	}
	pf, err := f.GetProtocolFeatures()
	if err != nil {
		return fmt.Errorf("GET_PROTOCOL_FEATURES: %w", err)
	}
	if err := f.SetProtocolFeatures(pf & acceptedProtocol); err != nil {
		return fmt.Errorf("SET_PROTOCOL_FEATURES: %w", err)
	}
	if f.ProtocolFeatures&vhostuser.ProtoConfig == 0 {
		return fmt.Errorf("%w: back-end does not offer the CONFIG protocol feature", ErrBackend)
	}
	f.QueueNum = 1
	if f.ProtocolFeatures&vhostuser.ProtoMQ != 0 {
		if f.QueueNum, err = f.GetQueueNum(); err != nil {
			return fmt.Errorf("GET_QUEUE_NUM: %w", err)
		}
	}
	streams := c.streams()
	total, writes, flushes := 0, false, false
	for _, s := range streams {
		total += s.Queues
		writes = writes || s.Mode != RandRead && s.Mode != SeqRead
		flushes = flushes || s.FlushEvery > 0
	}
	if uint64(total) > f.QueueNum {
		return fmt.Errorf("%w: back-end has %d queues, the run needs %d", ErrConfig, f.QueueNum, total)
	}
	if err := f.SetOwner(); err != nil {
		return fmt.Errorf("SET_OWNER: %w", err)
	}
	cfg, err := f.GetConfig(0, configSize)
	if err != nil {
		return fmt.Errorf("GET_CONFIG: %w", err)
	}
	sectors := le.Uint64(cfg[0:8])
	if sectors == 0 || sectors > 1<<53 {
		return fmt.Errorf("%w: capacity of %d sectors", ErrBackend, sectors)
	}
	d.capacity = int64(sectors) * SectorSize
	if feats&blkFeatBlkSize != 0 {
		bs := int64(le.Uint32(cfg[20:24]))
		if bs < SectorSize || bs > 1<<16 || bs&(bs-1) != 0 {
			return fmt.Errorf("%w: logical block size %d", ErrBackend, bs)
		}
		d.blkSize = bs
	}
	if feats&blkFeatRO != 0 && writes {
		return fmt.Errorf("%w: the device is read-only and the run writes", ErrConfig)
	}
	if feats&blkFeatFlush == 0 && flushes {
		return fmt.Errorf("%w: the device does not offer VIRTIO_BLK_F_FLUSH and --flush-every is set", ErrConfig)
	}
	if err := f.SetFeatures(feats); err != nil {
		return fmt.Errorf("SET_FEATURES: %w", err)
	}
	size := 2 << 20
	for _, s := range streams {
		bufSize := (s.BS + 4095) &^ 4095
		size += s.Queues * (3*4096 + 24*int(queueSizeFor(s.IODepth)) + s.IODepth*(bufSize+32) + 8192)
	}
	if err := f.CreateMemory(size &^ (1<<20 - 1)); err != nil {
		return err
	}
	if err := f.SetMemTable(); err != nil {
		return fmt.Errorf("SET_MEM_TABLE: %w", err)
	}
	qi := 0
	for _, s := range streams {
		var rings []*frontend.BlkRing
		for range s.Queues {
			q, err := f.NewQueue(qi, queueSizeFor(s.IODepth), 0, 0)
			if err != nil {
				return err
			}
			r, err := f.NewBlkRing(q, s.IODepth, s.BS)
			if err != nil {
				return err
			}
			if err := f.StartQueue(q); err != nil {
				return fmt.Errorf("start queue %d: %w", qi, err)
			}
			rings = append(rings, r)
			qi++
		}
		d.rings = append(d.rings, rings)
	}
	return nil
}

// resolve fills in a stream's defaults (Stride = BS, Range = the rest of
// the disk from Offset) and checks it against the device.
func (d *device) resolve(s *Stream, prefix string) error {
	if s.Stride == 0 {
		s.Stride = int64(s.BS)
	}
	if s.Offset >= d.capacity {
		return fmt.Errorf("%w: %soffset %d not below the %d-byte disk", ErrConfig, prefix, s.Offset, d.capacity)
	}
	if s.Range == 0 {
		s.Range = d.capacity - s.Offset
	}
	if s.Range > d.capacity-s.Offset { // both checked in 0..2^62: no overflow
		return fmt.Errorf("%w: %soffset %d + %srange %d beyond the %d-byte disk", ErrConfig, prefix, s.Offset, prefix, s.Range, d.capacity)
	}
	if int64(s.BS)%d.blkSize != 0 || s.Stride%d.blkSize != 0 || s.Offset%d.blkSize != 0 {
		return fmt.Errorf("%w: %sbs %d, %sstride %d and %soffset %d must be multiples of the device's %d-byte blocks",
			ErrConfig, prefix, s.BS, prefix, s.Stride, prefix, s.Offset, d.blkSize)
	}
	if int64(s.BS) > s.Range {
		return fmt.Errorf("%w: %sbs %d larger than the %d-byte range", ErrConfig, prefix, s.BS, s.Range)
	}
	return nil
}

// Run connects to the back-end, optionally pre-fills the range for
// --verify, runs the workload and returns what it measured. A request
// that fails, a verification mismatch or a back-end that stops
// completing requests ends the run with an error.
func Run(ctx context.Context, c Config) (*Result, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	d, err := connect(&c)
	if err != nil {
		return nil, err
	}
	defer d.f.Close()
	streams := c.streams()
	for i := range streams {
		prefix := "--"
		if i > 0 {
			prefix = "--bg-"
		}
		if err := d.resolve(&streams[i], prefix); err != nil {
			return nil, err
		}
	}
	if c.Verify {
		// Pre-fill the range of every stream that reads, each through its
		// own queues, sequentially and exactly once.
		var fill []Stream
		var rings [][]*frontend.BlkRing
		for i, s := range streams {
			if s.Mode.reads() {
				s.Mode, s.FlushEvery, s.IOs = SeqWrite, 0, 0
				fill = append(fill, s)
				rings = append(rings, d.rings[i])
			}
		}
		if len(fill) > 0 {
			pre := c
			pre.Runtime, pre.Progress = 0, nil
			if _, err := d.phase(ctx, &pre, fill, rings, true); err != nil {
				return nil, fmt.Errorf("verify pre-fill: %w", err)
			}
		}
	}
	res, err := d.phase(ctx, &c, streams, d.rings, false)
	if err != nil {
		return nil, err
	}
	main := res[0]
	main.QueueSize = int(d.qsize)
	if len(res) > 1 {
		main.Background = res[1]
	}
	return main, nil
}

// phase runs streams[i] on rings[i], all at once, and returns one result
// per stream. fill writes each queue's share of its stream's range exactly
// once (the --verify pre-fill). Otherwise the phase ends at the deadline,
// or as soon as every queue of any one stream has issued its IOs: the
// streams are measured over the same span.
func (d *device) phase(ctx context.Context, c *Config, streams []Stream, rings [][]*frontend.BlkRing, fill bool) ([]*Result, error) {
	groups := make([][]*worker, len(streams))
	var all []*worker
	for si := range streams {
		for i, r := range rings[si] {
			w, err := newWorker(c, &streams[si], r, len(all), i, fill)
			if err != nil {
				return nil, err
			}
			groups[si] = append(groups[si], w)
			all = append(all, w)
		}
	}
	var beCPU0 time.Duration
	beOK := c.PID > 0
	if beOK {
		var err error
		if beCPU0, err = ProcessCPU(c.PID); err != nil {
			beOK = false
		}
	}
	own0 := SelfCPU()
	base := time.Now()
	var deadline int64
	if c.Runtime > 0 && !fill {
		deadline = int64(c.Runtime)
	}
	var stop atomic.Bool
	ctxStop := context.AfterFunc(ctx, func() { stop.Store(true) })
	defer ctxStop()

	progressDone := make(chan struct{})
	var progressWG sync.WaitGroup
	if c.Progress != nil {
		progressWG.Add(1)
		go func() {
			defer progressWG.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-progressDone:
					return
				case <-t.C:
					var p Progress
					for _, w := range all {
						p.IOs += w.progIOs.Load()
						p.Bytes += w.progBytes.Load()
					}
					p.Elapsed = time.Since(base)
					c.Progress(p)
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for _, g := range groups {
		var left atomic.Int32
		left.Store(int32(len(g)))
		for _, w := range g {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w.run(base, deadline, &stop)
				w.end = time.Since(base)
				// A failed queue ends the run for all; so does the last
				// queue of a stream, unless this is the pre-fill (whose
				// streams each write their whole range).
				if w.err != nil || left.Add(-1) == 0 && !fill {
					stop.Store(true)
				}
			}()
		}
	}
	wg.Wait()
	own := SelfCPU() - own0
	close(progressDone)
	progressWG.Wait()

	for _, w := range all {
		if w.err != nil {
			return nil, fmt.Errorf("queue %d: %w", w.queue, w.err)
		}
	}
	results := make([]*Result, len(groups))
	var ios uint64
	for si, g := range groups {
		results[si] = collect(c, &streams[si], g, d)
		ios += results[si].IOs
	}
	if ios > 0 {
		main := results[0]
		main.OwnCPUPerIO = float64(own) / 1e3 / float64(ios)
		if beOK {
			if be1, err := ProcessCPU(c.PID); err == nil {
				main.BackendCPUPerIO = float64(be1-beCPU0) / 1e3 / float64(ios)
			}
		}
	}
	return results, nil
}

// collect sums what the workers of one stream counted. The stream's span
// ends when its last queue has reaped its last request: a stream that ran
// beside another is not charged for the other's draining.
func collect(c *Config, s *Stream, ws []*worker, d *device) *Result {
	var elapsed time.Duration
	for _, w := range ws {
		elapsed = max(elapsed, w.end)
	}
	var h, fh Histogram
	res := &Result{
		RW: s.Mode.String(), BS: s.BS, Queues: s.Queues, IODepth: s.IODepth, Offset: s.Offset, Range: s.Range,
		Capacity: d.capacity, EventIdx: d.f.Features&vhostuser.FeatureEventIdx != 0,
		QueueSize: int(queueSizeFor(s.IODepth)), Verified: c.Verify, FlushEvery: s.FlushEvery,
		Seconds: elapsed.Seconds(), BackendCPUPerIO: -1,
	}
	if s.Mode == RandRW {
		res.RWMix = s.RWMix
	}
	var kicks, waits uint64
	for _, w := range ws {
		h.Merge(&w.hist)
		fh.Merge(&w.fhist)
		res.Reads += w.reads
		res.Writes += w.writes
		res.Bytes += w.bytes
		res.Flushes += w.flushes
		kicks += w.kicks
		waits += w.waits
	}
	res.IOs = res.Reads + res.Writes
	res.Latency = summarize(&h)
	if res.Flushes > 0 {
		fl := summarize(&fh)
		res.FlushLatency = &fl
	}
	res.setRates(elapsed.Seconds())
	if n := res.IOs + res.Flushes; n > 0 && elapsed > 0 {
		res.KicksPerIO = float64(kicks) / float64(n)
		res.WaitsPerIO = float64(waits) / float64(n)
	}
	return res
}

// worker drives one ring.
type worker struct {
	c     *Config
	s     *Stream
	queue int // virtqueue index
	ring  *frontend.BlkRing
	pick  picker
	quota uint64 // data requests to issue; 0: until the deadline
	fill  bool
	// flushEvery > 0: a FLUSH after every flushEvery data requests;
	// sinceFlush counts them.
	flushEvery, sinceFlush int

	hist   Histogram // data requests
	fhist  Histogram // flushes
	start  []int64   // submit time per slot, ns since base
	sector []uint64
	nbytes []int
	kind   []reqKind
	busy   []bool
	free   []int
	reaped []int

	reads, writes, bytes uint64
	flushes              uint64
	kicks, waits         uint64
	progIOs, progBytes   atomic.Uint64
	err                  error
	end                  time.Duration // when run returned, since base
}

// reqKind is what a slot's request does.
type reqKind uint8

const (
	kindRead reqKind = iota
	kindWrite
	kindFlush
)

func (k reqKind) String() string {
	return [...]string{"read", "write", "flush"}[k]
}

// newWorker prepares queue number queue, the index-th of stream s.
func newWorker(c *Config, s *Stream, r *frontend.BlkRing, queue, index int, fill bool) (*worker, error) {
	n := s.IODepth
	w := &worker{
		c: c, s: s, queue: queue, ring: r, fill: fill,
		start: make([]int64, n), sector: make([]uint64, n), nbytes: make([]int, n),
		kind: make([]reqKind, n), busy: make([]bool, n), free: make([]int, 0, n), reaped: make([]int, n),
	}
	if !fill {
		w.flushEvery = s.FlushEvery
	}
	for i := n - 1; i >= 0; i-- {
		w.free = append(w.free, i)
		if !c.Verify {
			// Non-zero data, so no back-end can take a zero-detection
			// shortcut on writes.
			b := r.Data(i)
			rg := newRNG(c.Seed + uint64(queue*MaxIODepth+i) + 1)
			for j := 0; j+8 <= len(b); j += 8 {
				le.PutUint64(b[j:], rg.next())
			}
		}
	}
	rg := newRNG(c.Seed ^ uint64(queue+1)*0x9e3779b97f4a7c15)
	p := picker{mode: s.Mode, bs: int64(s.BS), rwmix: uint64(s.RWMix), stride: s.Stride, lo: s.Offset}
	Q := int64(s.Queues)
	if s.Mode.random() {
		slots := uint64((s.Range-int64(s.BS))/s.Stride + 1)
		p.slots = slots
		if s.RandomMap {
			// Each queue gets its own share of the offsets, so together
			// they visit each one once per pass.
			lo := slots * uint64(index) / uint64(Q)
			hi := slots * uint64(index+1) / uint64(Q)
			if hi == lo {
				return nil, fmt.Errorf("%w: %d offsets for %d queues with --randommap", ErrConfig, slots, Q)
			}
			p.lo = s.Offset + int64(lo)*s.Stride
			p.slots = hi - lo
			perm := newPermutation(p.slots, &rg)
			p.perm = &perm
		}
	} else {
		share := s.Range / Q
		if !fill {
			share -= share % int64(s.BS)
		} else {
			share -= share % SectorSize
		}
		if share < int64(s.BS) && !fill || share == 0 {
			return nil, fmt.Errorf("%w: range %d split over %d queues leaves less than --bs %d each", ErrConfig, s.Range, Q, s.BS)
		}
		p.start = s.Offset + share*int64(index)
		p.end = p.start + share
		if index == int(Q)-1 && fill {
			p.end = s.Offset + s.Range
		}
		p.pos = p.start
		if fill {
			w.quota = uint64((p.end - p.start + int64(s.BS) - 1) / int64(s.BS))
		}
	}
	p.rng = rg
	w.pick = p
	if !fill && s.IOs > 0 {
		w.quota = s.IOs / uint64(Q)
		if uint64(index) < s.IOs%uint64(Q) {
			w.quota++
		}
	}
	return w, nil
}

func (w *worker) run(base time.Time, deadline int64, stop *atomic.Bool) {
	// One OS thread per queue, as a vCPU would be: the blocking poll on
	// the call eventfd parks only this thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := w.ring
	c := w.c
	var issued uint64
	inflight := 0
	lastDone := int64(time.Since(base))
	for {
		now := int64(time.Since(base))
		stopping := stop.Load() || w.err != nil || (deadline > 0 && now >= deadline) || (w.quota > 0 && issued >= w.quota)
		if !stopping {
			for len(w.free) > 0 && (w.quota == 0 || issued < w.quota) {
				slot := w.free[len(w.free)-1]
				w.free = w.free[:len(w.free)-1]
				if w.flushEvery > 0 && w.sinceFlush >= w.flushEvery {
					w.sinceFlush = 0
					r.Prepare(slot, frontend.BlkTFlush, 0, 0)
					w.start[slot], w.sector[slot], w.nbytes[slot], w.kind[slot], w.busy[slot] = now, 0, 0, kindFlush, true
					inflight++
					continue
				}
				off, n, read := w.pick.next()
				sector := uint64(off) / SectorSize
				typ, kind := uint32(frontend.BlkTOut), kindWrite
				if read {
					typ, kind = frontend.BlkTIn, kindRead
				} else if c.Verify {
					FillTagged(r.Data(slot)[:n], sector, c.Seed)
				}
				r.Prepare(slot, typ, sector, n)
				w.start[slot], w.sector[slot], w.nbytes[slot], w.kind[slot], w.busy[slot] = now, sector, n, kind, true
				w.sinceFlush++
				issued++
				inflight++
			}
			if r.Publish() {
				w.kicks++
			}
		}
		if inflight == 0 {
			if stopping {
				return
			}
			continue
		}
		k := r.Reap(w.reaped, nil)
		if k == 0 {
			w.waits++
			if err := r.Wait(100); err != nil {
				w.err = err
				return
			}
			if int64(time.Since(base))-lastDone > int64(stallTimeout) {
				w.err = fmt.Errorf("%w: no completion for %v with %d requests in flight", ErrBackend, stallTimeout, inflight)
				return
			}
			continue
		}
		t := int64(time.Since(base))
		lastDone = t
		var nb, done uint64
		for _, slot := range w.reaped[:k] {
			if slot < 0 || !w.busy[slot] {
				w.err = fmt.Errorf("%w: used ring returned a head that is not in flight", ErrBackend)
				return
			}
			w.busy[slot] = false
			inflight--
			w.free = append(w.free, slot)
			if st := r.Status(slot); st != frontend.BlkSOK {
				w.err = fmt.Errorf("%w: %s of %d bytes at sector %d: virtio status %d", ErrIOStatus, w.kind[slot], w.nbytes[slot], w.sector[slot], st)
				continue
			}
			lat := uint64(t - w.start[slot])
			switch w.kind[slot] {
			case kindFlush:
				w.fhist.Record(lat)
				w.flushes++
				continue
			case kindRead:
				if c.Verify {
					if err := CheckTagged(r.Data(slot)[:w.nbytes[slot]], w.sector[slot], c.Seed); err != nil {
						w.err = err
						continue
					}
				}
				w.reads++
			default:
				w.writes++
			}
			w.hist.Record(lat)
			done++
			nb += uint64(w.nbytes[slot])
		}
		w.bytes += nb
		w.progIOs.Add(done)
		w.progBytes.Add(nb)
	}
}
