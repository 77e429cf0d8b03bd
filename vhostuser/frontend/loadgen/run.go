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
	rings    []*frontend.BlkRing
	capacity int64 // bytes
	blkSize  int64 // logical block size
	qsize    uint16
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
	if uint64(c.Queues) > f.QueueNum {
		return fmt.Errorf("%w: back-end has %d queues, --queues %d", ErrConfig, f.QueueNum, c.Queues)
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
	if feats&blkFeatRO != 0 && (c.Mode != RandRead && c.Mode != SeqRead) {
		return fmt.Errorf("%w: the device is read-only and --rw %s writes", ErrConfig, c.Mode)
	}
	if err := f.SetFeatures(feats); err != nil {
		return fmt.Errorf("SET_FEATURES: %w", err)
	}
	bufSize := (c.BS + 4095) &^ 4095
	perQueue := 3*4096 + 24*int(d.qsize) + c.IODepth*(bufSize+32) + 8192
	if err := f.CreateMemory((c.Queues*perQueue + 2<<20) &^ (1<<20 - 1)); err != nil {
		return err
	}
	if err := f.SetMemTable(); err != nil {
		return fmt.Errorf("SET_MEM_TABLE: %w", err)
	}
	for i := 0; i < c.Queues; i++ {
		q, err := f.NewQueue(i, d.qsize, 0, 0)
		if err != nil {
			return err
		}
		r, err := f.NewBlkRing(q, c.IODepth, c.BS)
		if err != nil {
			return err
		}
		if err := f.StartQueue(q); err != nil {
			return fmt.Errorf("start queue %d: %w", i, err)
		}
		d.rings = append(d.rings, r)
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
	if c.Stride == 0 {
		c.Stride = int64(c.BS)
	}
	d, err := connect(&c)
	if err != nil {
		return nil, err
	}
	defer d.f.Close()
	if c.Range == 0 || c.Range > d.capacity {
		if c.Range > d.capacity {
			return nil, fmt.Errorf("%w: --range %d beyond the %d-byte disk", ErrConfig, c.Range, d.capacity)
		}
		c.Range = d.capacity
	}
	if int64(c.BS)%d.blkSize != 0 || c.Stride%d.blkSize != 0 {
		return nil, fmt.Errorf("%w: --bs %d and --stride %d must be multiples of the device's %d-byte blocks", ErrConfig, c.BS, c.Stride, d.blkSize)
	}
	if int64(c.BS) > c.Range {
		return nil, fmt.Errorf("%w: --bs %d larger than the %d-byte range", ErrConfig, c.BS, c.Range)
	}
	if c.Verify && c.Mode.reads() {
		pre := c
		pre.Mode, pre.Runtime, pre.Progress = SeqWrite, 0, nil
		if _, err := d.phase(ctx, &pre, true); err != nil {
			return nil, fmt.Errorf("verify pre-fill: %w", err)
		}
	}
	return d.phase(ctx, &c, false)
}

// phase runs one workload on every ring. fill writes each queue's share
// of the range exactly once (the --verify pre-fill).
func (d *device) phase(ctx context.Context, c *Config, fill bool) (*Result, error) {
	ws := make([]*worker, len(d.rings))
	for i, r := range d.rings {
		w, err := newWorker(c, r, i, fill)
		if err != nil {
			return nil, err
		}
		ws[i] = w
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
					for _, w := range ws {
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
	for _, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(base, deadline, &stop)
		}()
	}
	wg.Wait()
	elapsed := time.Since(base)
	own := SelfCPU() - own0
	close(progressDone)
	progressWG.Wait()

	var h Histogram
	res := &Result{
		RW: c.Mode.String(), BS: c.BS, Queues: c.Queues, IODepth: c.IODepth, Range: c.Range,
		Capacity: d.capacity, EventIdx: d.f.Features&vhostuser.FeatureEventIdx != 0,
		QueueSize: int(d.qsize), Verified: c.Verify, Seconds: elapsed.Seconds(), BackendCPUPerIO: -1,
	}
	if c.Mode == RandRW {
		res.RWMix = c.RWMix
	}
	var kicks, waits uint64
	for _, w := range ws {
		if w.err != nil {
			return nil, fmt.Errorf("queue %d: %w", w.index, w.err)
		}
		h.Merge(&w.hist)
		res.Reads += w.reads
		res.Writes += w.writes
		res.Bytes += w.bytes
		kicks += w.kicks
		waits += w.waits
	}
	res.IOs = res.Reads + res.Writes
	res.Latency = summarize(&h)
	if res.IOs > 0 && elapsed > 0 {
		res.IOPS = float64(res.IOs) / elapsed.Seconds()
		res.MiBps = float64(res.Bytes) / (1 << 20) / elapsed.Seconds()
		res.KicksPerIO = float64(kicks) / float64(res.IOs)
		res.WaitsPerIO = float64(waits) / float64(res.IOs)
		res.OwnCPUPerIO = float64(own) / 1e3 / float64(res.IOs)
		if beOK {
			if be1, err := ProcessCPU(c.PID); err == nil {
				res.BackendCPUPerIO = float64(be1-beCPU0) / 1e3 / float64(res.IOs)
			}
		}
	}
	return res, nil
}

// worker drives one ring.
type worker struct {
	c     *Config
	index int
	ring  *frontend.BlkRing
	pick  picker
	quota uint64 // requests to issue; 0: until the deadline
	fill  bool

	hist   Histogram
	start  []int64 // submit time per slot, ns since base
	sector []uint64
	nbytes []int
	read   []bool
	busy   []bool
	free   []int
	reaped []int

	reads, writes, bytes uint64
	kicks, waits         uint64
	progIOs, progBytes   atomic.Uint64
	err                  error
}

func newWorker(c *Config, r *frontend.BlkRing, index int, fill bool) (*worker, error) {
	n := c.IODepth
	w := &worker{
		c: c, index: index, ring: r, fill: fill,
		start: make([]int64, n), sector: make([]uint64, n), nbytes: make([]int, n),
		read: make([]bool, n), busy: make([]bool, n), free: make([]int, 0, n), reaped: make([]int, n),
	}
	for i := n - 1; i >= 0; i-- {
		w.free = append(w.free, i)
		if !c.Verify {
			// Non-zero data, so no back-end can take a zero-detection
			// shortcut on writes.
			b := r.Data(i)
			rg := newRNG(c.Seed + uint64(i) + 1)
			for j := 0; j+8 <= len(b); j += 8 {
				le.PutUint64(b[j:], rg.next())
			}
		}
	}
	rg := newRNG(c.Seed ^ uint64(index+1)*0x9e3779b97f4a7c15)
	p := picker{mode: c.Mode, bs: int64(c.BS), rwmix: uint64(c.RWMix), stride: c.Stride}
	Q := int64(c.Queues)
	if c.Mode.random() {
		slots := uint64((c.Range-int64(c.BS))/c.Stride + 1)
		p.slots = slots
		if c.RandomMap {
			// Each queue gets its own share of the offsets, so together
			// they visit each one once per pass.
			lo := slots * uint64(index) / uint64(Q)
			hi := slots * uint64(index+1) / uint64(Q)
			if hi == lo {
				return nil, fmt.Errorf("%w: %d offsets for %d queues with --randommap", ErrConfig, slots, Q)
			}
			p.lo = int64(lo) * c.Stride
			p.slots = hi - lo
			perm := newPermutation(p.slots, &rg)
			p.perm = &perm
		}
	} else {
		share := c.Range / Q
		if !fill {
			share -= share % int64(c.BS)
		} else {
			share -= share % SectorSize
		}
		if share < int64(c.BS) && !fill || share == 0 {
			return nil, fmt.Errorf("%w: range %d split over %d queues leaves less than --bs %d each", ErrConfig, c.Range, Q, c.BS)
		}
		p.start = share * int64(index)
		p.end = p.start + share
		if index == int(Q)-1 && fill {
			p.end = c.Range
		}
		p.pos = p.start
		if fill {
			w.quota = uint64((p.end - p.start + int64(c.BS) - 1) / int64(c.BS))
		}
	}
	p.rng = rg
	w.pick = p
	if !fill && c.IOs > 0 {
		w.quota = c.IOs / uint64(Q)
		if uint64(index) < c.IOs%uint64(Q) {
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
				off, n, read := w.pick.next()
				sector := uint64(off) / SectorSize
				typ := uint32(frontend.BlkTOut)
				if read {
					typ = frontend.BlkTIn
				} else if c.Verify {
					FillTagged(r.Data(slot)[:n], sector, c.Seed)
				}
				r.Prepare(slot, typ, sector, n)
				w.start[slot], w.sector[slot], w.nbytes[slot], w.read[slot], w.busy[slot] = now, sector, n, read, true
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
		var nb uint64
		for _, slot := range w.reaped[:k] {
			if slot < 0 || !w.busy[slot] {
				w.err = fmt.Errorf("%w: used ring returned a head that is not in flight", ErrBackend)
				return
			}
			w.busy[slot] = false
			inflight--
			w.free = append(w.free, slot)
			if st := r.Status(slot); st != frontend.BlkSOK {
				w.err = fmt.Errorf("%w: %s of %d bytes at sector %d: virtio status %d", ErrIOStatus, dir(w.read[slot]), w.nbytes[slot], w.sector[slot], st)
				continue
			}
			if w.read[slot] && c.Verify {
				if err := CheckTagged(r.Data(slot)[:w.nbytes[slot]], w.sector[slot], c.Seed); err != nil {
					w.err = err
					continue
				}
			}
			w.hist.Record(uint64(t - w.start[slot]))
			if w.read[slot] {
				w.reads++
			} else {
				w.writes++
			}
			nb += uint64(w.nbytes[slot])
		}
		w.bytes += nb
		w.progIOs.Add(uint64(k))
		w.progBytes.Add(nb)
	}
}

func dir(read bool) string {
	if read {
		return "read"
	}
	return "write"
}
