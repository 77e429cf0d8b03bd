// Package loadgen is a vhost-user-blk load generator: it drives any
// back-end socket with no guest, the way fio with libblkio's
// virtio-blk-vhost-user driver would (vhost-user.md §6.2). It is built on
// the Go front-end in vhostuser/frontend: memfd guest memory, one
// SET_MEM_TABLE region, split rings and kick/call eventfds, and GET_CONFIG
// for the capacity.
//
// Each queue is driven by its own goroutine, locked to an OS thread, that
// keeps IODepth requests in flight: it stages every free slot, publishes
// them with one avail idx store and at most one kick, then reaps all the
// completions the used ring holds before sleeping on the call eventfd.
// EVENT_IDX is used when the back-end offers it. Latencies go into a
// fixed-bucket histogram; nothing allocates per request.
//
// A queue may interleave a FLUSH after every FlushEvery data requests, in
// flight beside the others as a guest's journal commit would be. A
// Background stream runs beside the main one on queues of its own with
// its own pattern and statistics, to show how one stream is served while
// another loads the back-end (cached reads while another queue allocates).
//
// Each worker goroutine owns its ring and its counters; the only shared
// state while a phase runs is the stop flag and the progress counters
// (atomics). Results are read after every worker has returned.
package loadgen

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors.
var (
	ErrConfig   = errors.New("loadgen: invalid configuration")
	ErrVerify   = errors.New("loadgen: data verification failed")
	ErrBackend  = errors.New("loadgen: back-end misbehaved")
	ErrIOStatus = errors.New("loadgen: request failed")
	ErrBadStat  = errors.New("loadgen: unreadable /proc stat")
)

// Mode is the access pattern.
type Mode int

const (
	RandRead Mode = iota
	RandWrite
	SeqRead
	SeqWrite
	RandRW
)

var modeNames = [...]string{"randread", "randwrite", "read", "write", "randrw"}

func (m Mode) String() string {
	if m >= 0 && int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode accepts the fio names randread, randwrite, read, write, randrw.
func ParseMode(s string) (Mode, error) {
	for i, n := range modeNames {
		if n == s {
			return Mode(i), nil
		}
	}
	return 0, fmt.Errorf("%w: --rw %q is not one of randread, randwrite, read, write, randrw", ErrConfig, s)
}

func (m Mode) random() bool { return m == RandRead || m == RandWrite || m == RandRW }

// reads reports whether the mode reads at all (for --verify's pre-fill).
func (m Mode) reads() bool { return m != RandWrite && m != SeqWrite }

// Limits on the configuration.
const (
	MaxQueues  = 64
	MaxIODepth = 256 // three descriptors per request in a ring of at most 1024
	MaxBS      = 16 << 20
	maxMem     = 4 << 30
	// maxOffset bounds offsets, ranges and strides so that their sums
	// cannot overflow (a virtio-blk capacity is at most 2^53 bytes here).
	maxOffset     = 1 << 62
	maxFlushEvery = 1 << 20
)

// Config describes one run.
type Config struct {
	Socket  string
	Queues  int  // request queues, one goroutine each
	IODepth int  // requests in flight per queue
	BS      int  // bytes per request, a multiple of 512
	Mode    Mode // access pattern
	RWMix   int  // RandRW: percentage of reads
	Runtime time.Duration
	IOs     uint64 // stop after this many requests in total (0: Runtime only)
	// Range limits I/O to the first Range bytes of the disk (0: all).
	Range int64
	// Stride aligns random offsets (0: BS). With RandomMap each aligned
	// offset of the range is used once, in random order, before any is
	// used again (fio's randommap): --bs 4K --stride 1M --randommap
	// writes each 1 MiB block of a fresh image exactly once.
	Stride    int64
	RandomMap bool
	// Verify tags every written sector with its LBA and Seed and checks
	// every read; when the mode reads, the range is written first.
	Verify bool
	Seed   uint64
	// PID of the back-end, to report its CPU time per request (0: none).
	PID int
	// NoEventIdx refuses VIRTIO_RING_F_EVENT_IDX even if offered.
	NoEventIdx bool
	// Offset is where the range starts: I/O goes to [Offset,
	// Offset+Range), Range 0 meaning up to the end of the disk.
	Offset int64
	// FlushEvery > 0 sends a FLUSH after every FlushEvery data requests
	// (reads and writes) each queue issues. The FLUSH does not wait for
	// the requests before it to complete: like a guest's, it covers the
	// writes completed by the time the device sees it (VIRTIO 1.2
	// §5.2.6), and the queue keeps IODepth requests in flight around it.
	// Flushes are counted apart and not in IOs.
	FlushEvery int
	// Background, if set, runs a second stream at the same time on
	// queues Queues..Queues+Background.Queues-1. The run ends when either
	// stream is done (Runtime, or a stream's IOs); each stream's rates are
	// over its own span, from the start to its own last completion, so
	// neither is charged for the other's draining. Verify applies to it
	// too; Seed is shared.
	Background *Stream
	// Progress, if set, is called about once a second from a separate
	// goroutine while the measured phase runs.
	Progress func(Progress)
}

// Stream is the access pattern of the Background stream; its fields mean
// what Config's fields of the same names mean. IOs 0 means until the main
// stream ends.
type Stream struct {
	Queues     int
	IODepth    int
	BS         int
	Mode       Mode
	RWMix      int
	Offset     int64
	Range      int64
	Stride     int64
	RandomMap  bool
	FlushEvery int
	IOs        uint64
}

// main is the main stream's pattern as a Stream.
func (c *Config) main() Stream {
	return Stream{Queues: c.Queues, IODepth: c.IODepth, BS: c.BS, Mode: c.Mode, RWMix: c.RWMix, Offset: c.Offset,
		Range: c.Range, Stride: c.Stride, RandomMap: c.RandomMap, FlushEvery: c.FlushEvery, IOs: c.IOs}
}

// streams lists the main stream and, if set, the background one.
func (c *Config) streams() []Stream {
	s := []Stream{c.main()}
	if c.Background != nil {
		s = append(s, *c.Background)
	}
	return s
}

// Progress is a running total for live display.
type Progress struct {
	Elapsed time.Duration
	IOs     uint64
	Bytes   uint64
}

func (c *Config) check() error {
	switch {
	case c.Socket == "":
		return fmt.Errorf("%w: no socket", ErrConfig)
	case c.Runtime < 0:
		return fmt.Errorf("%w: negative --runtime", ErrConfig)
	case c.Runtime == 0 && c.IOs == 0:
		return fmt.Errorf("%w: give --runtime or --ios", ErrConfig)
	case c.PID < 0:
		return fmt.Errorf("%w: --pid %d", ErrConfig, c.PID)
	}
	queues := 0
	var mem int64
	for i, s := range c.streams() {
		prefix := "--"
		if i > 0 {
			prefix = "--bg-"
		}
		if err := s.check(prefix); err != nil {
			return err
		}
		queues += s.Queues
		mem += int64(s.Queues) * int64(s.IODepth) * (int64(s.BS) + 4096)
	}
	if queues > MaxQueues {
		return fmt.Errorf("%w: %d queues in all, at most %d", ErrConfig, queues, MaxQueues)
	}
	if mem > maxMem {
		return fmt.Errorf("%w: the requests in flight need more than %d MiB of guest memory", ErrConfig, maxMem>>20)
	}
	return nil
}

// check validates one stream's numbers; prefix names its flags in errors.
// Each is bounded on its own, so the products in Config.check cannot
// overflow.
func (s *Stream) check(prefix string) error {
	switch {
	case s.Queues < 1 || s.Queues > MaxQueues:
		return fmt.Errorf("%w: %squeues %d out of range 1..%d", ErrConfig, prefix, s.Queues, MaxQueues)
	case s.IODepth < 1 || s.IODepth > MaxIODepth:
		return fmt.Errorf("%w: %siodepth %d out of range 1..%d", ErrConfig, prefix, s.IODepth, MaxIODepth)
	case s.BS < SectorSize || s.BS%SectorSize != 0 || s.BS > MaxBS:
		return fmt.Errorf("%w: %sbs %d is not a multiple of 512 in 512..%d", ErrConfig, prefix, s.BS, MaxBS)
	case s.Mode < 0 || int(s.Mode) >= len(modeNames):
		return fmt.Errorf("%w: mode %d", ErrConfig, int(s.Mode))
	case s.RWMix < 0 || s.RWMix > 100:
		return fmt.Errorf("%w: %srwmix %d out of range 0..100", ErrConfig, prefix, s.RWMix)
	case s.Offset < 0 || s.Offset%SectorSize != 0 || s.Offset > maxOffset:
		return fmt.Errorf("%w: %soffset %d is not a multiple of 512 in 0..%d", ErrConfig, prefix, s.Offset, int64(maxOffset))
	case s.Range < 0 || s.Range%SectorSize != 0 || s.Range > maxOffset:
		return fmt.Errorf("%w: %srange %d is not a multiple of 512 in 0..%d", ErrConfig, prefix, s.Range, int64(maxOffset))
	case s.Stride < 0 || s.Stride%SectorSize != 0 || s.Stride > maxOffset:
		return fmt.Errorf("%w: %sstride %d is not a multiple of 512 in 0..%d", ErrConfig, prefix, s.Stride, int64(maxOffset))
	case s.FlushEvery < 0 || s.FlushEvery > maxFlushEvery:
		return fmt.Errorf("%w: %sflush-every %d out of range 0..%d", ErrConfig, prefix, s.FlushEvery, maxFlushEvery)
	}
	return nil
}

// Latency is a latency summary in microseconds.
type Latency struct {
	Mean  float64 `json:"mean_us"`
	P50   float64 `json:"p50_us"`
	P90   float64 `json:"p90_us"`
	P99   float64 `json:"p99_us"`
	P999  float64 `json:"p99_9_us"`
	Max   float64 `json:"max_us"`
	Count uint64  `json:"count"`
}

func summarize(h *Histogram) Latency {
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	return Latency{
		Mean: us(h.Mean()), P50: us(h.Percentile(0.50)), P90: us(h.Percentile(0.90)),
		P99: us(h.Percentile(0.99)), P999: us(h.Percentile(0.999)), Max: us(h.Max()), Count: h.Count(),
	}
}

// Result is what one run measured.
type Result struct {
	RW        string `json:"rw"`
	BS        int    `json:"bs"`
	Queues    int    `json:"queues"`
	IODepth   int    `json:"iodepth"`
	RWMix     int    `json:"rwmix,omitempty"`
	Offset    int64  `json:"offset,omitempty"`
	Range     int64  `json:"range"`
	Capacity  int64  `json:"capacity"`
	EventIdx  bool   `json:"event_idx"`
	QueueSize int    `json:"queue_size"`
	Verified  bool   `json:"verified"`
	// FlushEvery is Config.FlushEvery (0: no flushes).
	FlushEvery int `json:"flush_every,omitempty"`

	Seconds float64 `json:"seconds"`
	IOs     uint64  `json:"ios"`
	Reads   uint64  `json:"reads"`
	Writes  uint64  `json:"writes"`
	Bytes   uint64  `json:"bytes"`
	IOPS    float64 `json:"iops"`
	MiBps   float64 `json:"mib_per_s"`
	Latency Latency `json:"latency"`
	// Flushes completed and their latency (nil when none were sent).
	Flushes      uint64   `json:"flushes,omitempty"`
	FlushLatency *Latency `json:"flush_latency,omitempty"`

	// Notifications per request: kicks sent, and sleeps on the call
	// eventfd (each one needed an interrupt to wake).
	KicksPerIO float64 `json:"kicks_per_io"`
	WaitsPerIO float64 `json:"waits_per_io"`

	// CPU time per request in microseconds; BackendCPUPerIO is -1 when
	// no --pid was given or /proc could not be read. With a Background
	// stream both are divided by the data requests of both streams (the
	// processes' CPU time cannot be split between them), and the
	// background result has -1 and 0.
	BackendCPUPerIO float64 `json:"backend_cpu_us_per_io"`
	OwnCPUPerIO     float64 `json:"own_cpu_us_per_io"`

	// Background is what the background stream measured over the same
	// run (nil without one).
	Background *Result `json:"background,omitempty"`
}

// setRates sets IOPS and MiBps from the counts over secs of running (left
// zero when no time passed).
func (r *Result) setRates(secs float64) {
	if secs > 0 {
		r.IOPS = float64(r.IOs) / secs
		r.MiBps = float64(r.Bytes) / (1 << 20) / secs
	}
}
