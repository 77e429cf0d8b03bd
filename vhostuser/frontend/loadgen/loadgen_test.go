package loadgen

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

func TestHistogramPercentilesAreWithinOneBucketOfTheTruth(t *testing.T) {
	var h Histogram
	for v := uint64(1); v <= 100000; v++ {
		h.Record(v * 1000) // 1 µs .. 100 ms, uniform
	}
	for _, p := range []float64{0.5, 0.9, 0.99, 0.999} {
		want := p * 100000 * 1000
		got := float64(h.Percentile(p))
		if math.Abs(got-want)/want > 1.0/subCount {
			t.Errorf("p%v = %v, want %v within %.1f%%", p*100, time.Duration(got), time.Duration(want), 100.0/subCount)
		}
	}
	if h.Max() != 100*time.Millisecond || h.Count() != 100000 {
		t.Errorf("max %v count %d, want 100ms and 100000", h.Max(), h.Count())
	}
	var m Histogram
	m.Record(5)
	m.Merge(&h)
	if m.Count() != 100001 || m.Percentile(0) != 5 {
		t.Errorf("merged: count %d, p0 %v; want 100001 and 5ns", m.Count(), m.Percentile(0))
	}
}

func TestHistogramBucketsCoverEveryValueInOrder(t *testing.T) {
	prev := -1
	for _, v := range []uint64{0, 1, 31, 32, 33, 63, 64, 1000, 1 << 40, math.MaxUint64} {
		b := bucketOf(v)
		if b <= prev || b >= numBuckets {
			t.Fatalf("bucketOf(%d) = %d after %d (of %d)", v, b, prev, numBuckets)
		}
		low, w := bucketRange(b)
		if v < low || v-low >= w {
			t.Errorf("value %d outside its bucket [%d, +%d)", v, low, w)
		}
		prev = b
	}
}

func TestPermutationVisitsEveryOffsetOncePerPass(t *testing.T) {
	for _, n := range []uint64{1, 2, 3, 7, 1000, 1024, 1025} {
		r := newRNG(uint64(n))
		p := newPermutation(n, &r)
		for pass := 0; pass < 2; pass++ {
			seen := make([]bool, n)
			for i := uint64(0); i < n; i++ {
				v := p.next()
				if v >= n || seen[v] {
					t.Fatalf("n=%d pass %d: value %d out of range or repeated", n, pass, v)
				}
				seen[v] = true
			}
		}
	}
}

func TestTaggedSectorsCatchWrongSectorSeedOrBody(t *testing.T) {
	b := make([]byte, 4*SectorSize)
	FillTagged(b, 100, 7)
	if err := CheckTagged(b, 100, 7); err != nil {
		t.Fatalf("fresh tags: %v", err)
	}
	for name, check := range map[string]func() error{
		"shifted by one sector": func() error { return CheckTagged(b[SectorSize:], 100, 7) },
		"other seed":            func() error { return CheckTagged(b, 100, 8) },
		"flipped body byte": func() error {
			c := append([]byte(nil), b...)
			c[3*SectorSize+300] ^= 1
			return CheckTagged(c, 100, 7)
		},
	} {
		if err := check(); !errors.Is(err, ErrVerify) {
			t.Errorf("%s: got %v, want ErrVerify", name, err)
		}
	}
}

func TestStatCPUIsUtimePlusStimeEvenWithParenthesesInTheName(t *testing.T) {
	line := "1234 (qemu (x) d) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 4 0\n"
	got, err := parseStatCPU([]byte(line))
	if err != nil || got != 3250*time.Millisecond {
		t.Errorf("parseStatCPU = %v, %v; want 3.25s", got, err)
	}
	for _, bad := range []string{"1234 qemu S 1", "1 (x) S 1 2 3", "1 (x) S 1 2 3 4 5 6 7 8 9 10 -1 5 0"} {
		if _, err := parseStatCPU([]byte(bad)); !errors.Is(err, ErrBadStat) {
			t.Errorf("parseStatCPU(%q) = %v, want ErrBadStat", bad, err)
		}
	}
	if _, err := ProcessCPU(os.Getpid()); err != nil {
		t.Errorf("own /proc stat: %v", err)
	}
}

// memDisk is an in-memory blk.Disk; corrupt, when set, rewrites what a
// read returns.
type memDisk struct {
	mu      sync.RWMutex
	data    []byte
	corrupt func(b []byte, off int64)
	// failWrites makes every write fail (the device answers IOERR).
	failWrites bool
	// beforeWrite, when set, runs before each write outside the lock (a
	// hook to hold writes); reads and flushes count the calls.
	beforeWrite func(off int64)
	reads       atomic.Int64
	flushes     atomic.Int64
}

func (d *memDisk) ReadVec(bufs [][]byte, off int64) error {
	d.reads.Add(1)
	d.mu.RLock()
	defer d.mu.RUnlock()
	for _, b := range bufs {
		if off < 0 || off+int64(len(b)) > int64(len(d.data)) {
			return errors.New("memDisk: read out of range")
		}
		copy(b, d.data[off:])
		if d.corrupt != nil {
			d.corrupt(b, off)
		}
		off += int64(len(b))
	}
	return nil
}

func (d *memDisk) WriteVec(bufs [][]byte, off int64) error {
	if d.beforeWrite != nil {
		d.beforeWrite(off)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failWrites {
		return errors.New("memDisk: write failed")
	}
	for _, b := range bufs {
		if off < 0 || off+int64(len(b)) > int64(len(d.data)) {
			return errors.New("memDisk: write out of range")
		}
		off += int64(copy(d.data[off:], b))
	}
	return nil
}

// snapshot copies the disk under its lock: the race detector cannot see
// the ordering the shared ring gives across the two mappings of the memfd.
func (d *memDisk) snapshot() []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]byte(nil), d.data...)
}

func (d *memDisk) Flush() error {
	d.flushes.Add(1)
	return nil
}
func (d *memDisk) Size() int64                { return int64(len(d.data)) }
func (d *memDisk) LogicalSectorSize() uint32  { return 512 }
func (d *memDisk) PhysicalSectorSize() uint32 { return 512 }

// serve runs an in-process vhost-vhdx back-end on a fresh socket.
func serve(t testing.TB, d blk.Disk, queues int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "loadgen")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "s")
	ln, err := vhostuser.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = vhostuser.Serve(ctx, ln, vhostuser.Options{Disk: d, NumQueues: queues})
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		os.RemoveAll(dir)
	})
	return path
}

func TestRunIssuesExactlyTheRequestedIOsAndVerifiesEveryRead(t *testing.T) {
	d := &memDisk{data: make([]byte, 4<<20)}
	sock := serve(t, d, 2)
	for _, eventIdx := range []bool{true, false} {
		res, err := Run(context.Background(), Config{
			Socket: sock, Queues: 2, IODepth: 8, BS: 8192, Mode: RandRW, RWMix: 70,
			IOs: 3001, Verify: true, Seed: 42, PID: os.Getpid(), NoEventIdx: !eventIdx,
		})
		if err != nil {
			t.Fatalf("event_idx=%v: %v", eventIdx, err)
		}
		if res.IOs != 3001 || res.Reads+res.Writes != 3001 || res.Reads == 0 || res.Writes == 0 {
			t.Errorf("event_idx=%v: %d IOs (%d reads, %d writes), want 3001 of both kinds", eventIdx, res.IOs, res.Reads, res.Writes)
		}
		if res.EventIdx != eventIdx || res.Capacity != 4<<20 || res.Latency.Count != 3001 {
			t.Errorf("event_idx=%v: result %+v", eventIdx, res)
		}
		if res.Bytes != 3001*8192 || res.BackendCPUPerIO < 0 {
			t.Errorf("bytes %d, backend CPU %v", res.Bytes, res.BackendCPUPerIO)
		}
	}
	// The pre-fill wrote every sector's tag.
	if err := CheckTagged(d.snapshot(), 0, 42); err != nil {
		t.Errorf("disk after pre-fill: %v", err)
	}
}

func TestRunWithRandomMapWritesEachStrideOnce(t *testing.T) {
	d := &memDisk{data: make([]byte, 2<<20)}
	sock := serve(t, d, 1)
	// 64 strides of 32 KiB, a 4 KiB tagged write at the start of each.
	res, err := Run(context.Background(), Config{
		Socket: sock, Queues: 1, IODepth: 4, BS: 4096, Mode: RandWrite, Stride: 32 << 10,
		RandomMap: true, IOs: 64, Verify: true, Seed: 9,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Writes != 64 {
		t.Fatalf("%d writes, want 64", res.Writes)
	}
	data := d.snapshot()
	for i := int64(0); i < 64; i++ {
		off := i * 32 << 10
		if err := CheckTagged(data[off:off+4096], uint64(off/SectorSize), 9); err != nil {
			t.Errorf("stride %d not written: %v", i, err)
		}
	}
}

func TestRunTimedSequentialReadStopsAtTheRuntime(t *testing.T) {
	d := &memDisk{data: make([]byte, 1<<20)}
	sock := serve(t, d, 1)
	res, err := Run(context.Background(), Config{Socket: sock, Queues: 1, IODepth: 2, BS: 64 << 10, Mode: SeqRead, Runtime: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Reads == 0 || res.Writes != 0 || res.Seconds < 0.05 {
		t.Errorf("%d reads, %d writes in %.3fs", res.Reads, res.Writes, res.Seconds)
	}
}

func TestRunReportsCorruptReadsAsVerifyErrors(t *testing.T) {
	d := &memDisk{data: make([]byte, 1<<20)}
	d.corrupt = func(b []byte, off int64) {
		if off <= 512*100 && off+int64(len(b)) > 512*100 {
			b[512*100-off+20] ^= 0xff
		}
	}
	sock := serve(t, d, 1)
	_, err := Run(context.Background(), Config{Socket: sock, Queues: 1, IODepth: 4, BS: 4096, Mode: SeqRead, IOs: 256, Verify: true, Seed: 3})
	if !errors.Is(err, ErrVerify) {
		t.Errorf("got %v, want ErrVerify", err)
	}
}

func TestRunReportsFailedRequestsWithTheirStatus(t *testing.T) {
	d := &memDisk{data: make([]byte, 1<<20), failWrites: true}
	sock := serve(t, d, 1)
	_, err := Run(context.Background(), Config{Socket: sock, Queues: 1, IODepth: 2, BS: 4096, Mode: RandWrite, IOs: 10})
	if !errors.Is(err, ErrIOStatus) {
		t.Errorf("failing disk: got %v, want ErrIOStatus", err)
	}
	_, err = Run(context.Background(), Config{Socket: sock, Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead, IOs: 1, Range: 2 << 20})
	if !errors.Is(err, ErrConfig) {
		t.Errorf("range beyond the disk: got %v, want ErrConfig", err)
	}
}

func TestConfigCheckRefusesOutOfRangeValues(t *testing.T) {
	good := Config{Socket: "s", Queues: 1, IODepth: 1, BS: 4096, IOs: 1}
	if err := good.check(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	for name, mut := range map[string]func(*Config){
		"no socket":     func(c *Config) { c.Socket = "" },
		"zero queues":   func(c *Config) { c.Queues = 0 },
		"deep":          func(c *Config) { c.IODepth = MaxIODepth + 1 },
		"odd bs":        func(c *Config) { c.BS = 4000 },
		"huge bs":       func(c *Config) { c.BS = MaxBS * 2 },
		"rwmix":         func(c *Config) { c.RWMix = 101 },
		"no stop":       func(c *Config) { c.IOs = 0 },
		"odd range":     func(c *Config) { c.Range = 1000 },
		"odd stride":    func(c *Config) { c.Stride = 100 },
		"too much RAM":  func(c *Config) { c.Queues, c.IODepth, c.BS = 64, 256, MaxBS },
		"negative time": func(c *Config) { c.Runtime = -1 },
		"mode":          func(c *Config) { c.Mode = Mode(99) },
		"odd offset":    func(c *Config) { c.Offset = 4000 },
		"huge offset":   func(c *Config) { c.Offset = 1<<63 - 512 },
		"flush-every":   func(c *Config) { c.FlushEvery = -1 },
		"bg depth":      func(c *Config) { c.Background = &Stream{Queues: 1, IODepth: 0, BS: 4096} },
		"bg stride":     func(c *Config) { c.Background = &Stream{Queues: 1, IODepth: 1, BS: 4096, Stride: 7} },
		"queues in all": func(c *Config) { c.Queues, c.Background = MaxQueues, &Stream{Queues: 1, IODepth: 1, BS: 4096} },
		"bg RAM":        func(c *Config) { c.Background = &Stream{Queues: 64, IODepth: 256, BS: MaxBS} },
	} {
		c := good
		mut(&c)
		if err := c.check(); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: got %v, want ErrConfig", name, err)
		}
	}
}

func TestFlushEveryNSendsOneFlushAfterEachNDataRequests(t *testing.T) {
	for _, tc := range []struct {
		name             string
		queues, every    int
		mode             Mode
		ios, wantFlushes uint64
	}{
		// 320 writes on one queue: a FLUSH after the 32nd, 64th, ...,
		// 288th (the run ends with the 320th, before its flush).
		{"randwrite, 1 queue, every 32", 1, 32, RandWrite, 320, 9},
		// 160 per queue: after the 32nd .. 128th on each.
		{"randwrite, 2 queues, every 32", 2, 32, RandWrite, 320, 8},
		// Reads count as requests too.
		{"randrw, 1 queue, every 16", 1, 16, RandRW, 100, 6},
		{"no flushes", 1, 0, RandWrite, 100, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &memDisk{data: make([]byte, 4<<20)}
			sock := serve(t, d, tc.queues)
			res, err := Run(context.Background(), Config{
				Socket: sock, Queues: tc.queues, IODepth: 8, BS: 4096, Mode: tc.mode, RWMix: 70,
				IOs: tc.ios, FlushEvery: tc.every, Seed: 11,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.IOs != tc.ios || res.Flushes != tc.wantFlushes || d.flushes.Load() != int64(tc.wantFlushes) {
				t.Errorf("%d data requests and %d flushes (the disk saw %d); want %d and %d",
					res.IOs, res.Flushes, d.flushes.Load(), tc.ios, tc.wantFlushes)
			}
			if tc.wantFlushes == 0 && res.FlushLatency != nil {
				t.Errorf("flush latency %+v without flushes", res.FlushLatency)
			}
			if tc.wantFlushes > 0 && (res.FlushLatency == nil || res.FlushLatency.Count != tc.wantFlushes || res.Latency.Count != tc.ios) {
				t.Errorf("latency counts: data %d, flush %+v", res.Latency.Count, res.FlushLatency)
			}
		})
	}
}

func TestRWMixSetsTheShareOfReads(t *testing.T) {
	d := &memDisk{data: make([]byte, 4<<20)}
	sock := serve(t, d, 1)
	for _, tc := range []struct {
		mix    int
		lo, hi uint64 // reads out of 4000
	}{{0, 0, 0}, {100, 4000, 4000}, {70, 2600, 3000}, {30, 1000, 1400}} {
		res, err := Run(context.Background(), Config{Socket: sock, Queues: 1, IODepth: 16, BS: 4096, Mode: RandRW, RWMix: tc.mix, IOs: 4000, Seed: 5})
		if err != nil {
			t.Fatal(err)
		}
		if res.Reads < tc.lo || res.Reads > tc.hi || res.Reads+res.Writes != 4000 || res.RWMix != tc.mix {
			t.Errorf("rwmix %d: %d reads, %d writes; want %d..%d reads of 4000", tc.mix, res.Reads, res.Writes, tc.lo, tc.hi)
		}
	}
}

// TestBackgroundStreamHasItsOwnQueueRangeAndStats holds every write of the
// background stream inside the disk until the main stream's reads have
// been served: with a back-end that serves each queue in order, only a
// stream on another queue can be served meanwhile. The two results count
// only their own requests, each in its own range.
func TestBackgroundStreamHasItsOwnQueueRangeAndStats(t *testing.T) {
	const mainReads = 2000
	d := &memDisk{data: make([]byte, 4<<20)}
	release := make(chan struct{})
	var releaseOnce sync.Once
	var outside atomic.Int64
	var gaveUp atomic.Bool
	d.beforeWrite = func(off int64) {
		if off < 2<<20 {
			outside.Add(1) // the pre-fill of the main range, or a stray write
			return
		}
		select {
		case <-release:
		case <-time.After(time.Minute):
			// Not a timing assertion: a safety net so that a back-end
			// serving both streams on one queue fails instead of hanging.
			gaveUp.Store(true)
		}
	}
	go func() {
		// Open the gate once the disk has served half the main reads
		// while background writes were held.
		for d.reads.Load() < mainReads/2 {
			time.Sleep(time.Millisecond)
		}
		releaseOnce.Do(func() { close(release) })
	}()
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	sock := serve(t, d, 2)
	res, err := Run(context.Background(), Config{
		Socket: sock, Queues: 1, IODepth: 8, BS: 4096, Mode: RandRead, Range: 2 << 20, IOs: mainReads,
		Verify: true, Seed: 21,
		Background: &Stream{Queues: 1, IODepth: 4, BS: 4096, Mode: RandWrite, Offset: 2 << 20, Stride: 64 << 10, RandomMap: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	if gaveUp.Load() {
		t.Error("a held background write was released by the safety net, not by the main stream's reads")
	}
	if res.Reads != mainReads || res.Writes != 0 || res.Latency.Count != mainReads {
		t.Errorf("main stream: %d reads, %d writes, %d latencies; want %d reads only", res.Reads, res.Writes, res.Latency.Count, mainReads)
	}
	bg := res.Background
	if bg == nil {
		t.Fatal("no background result")
	}
	if bg.Reads != 0 || bg.Writes == 0 || bg.Offset != 2<<20 || bg.Range != 2<<20 || bg.RW != "randwrite" || bg.BackendCPUPerIO != -1 {
		t.Errorf("background result %+v", bg)
	}
	// The main range was pre-filled once (512 4K writes); every other
	// write the disk saw is in the background range, at a 64K stride.
	if n := outside.Load(); n != 512 {
		t.Errorf("%d writes below 2 MiB, want the 512 of the pre-fill", n)
	}
	data := d.snapshot()
	written := 0
	for off := int64(2 << 20); off < 4<<20; off += 64 << 10 {
		if CheckTagged(data[off:off+4096], uint64(off/SectorSize), 21) == nil {
			written++
		}
	}
	if want := min(bg.Writes, 32); uint64(written) != want {
		t.Errorf("%d strides of the background range tagged, %d background writes", written, bg.Writes)
	}
}

func TestRunRefusesAnOffsetBeyondTheDisk(t *testing.T) {
	d := &memDisk{data: make([]byte, 1<<20)}
	sock := serve(t, d, 2)
	for name, c := range map[string]Config{
		"main":       {Socket: sock, Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead, IOs: 1, Offset: 1 << 20},
		"main range": {Socket: sock, Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead, IOs: 1, Offset: 512 << 10, Range: 1 << 20},
		"background": {Socket: sock, Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead, IOs: 1,
			Background: &Stream{Queues: 1, IODepth: 1, BS: 4096, Offset: 2 << 20}},
	} {
		if _, err := Run(context.Background(), c); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: got %v, want ErrConfig", name, err)
		}
	}
}
