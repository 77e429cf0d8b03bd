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
	// Progress, if set, is called about once a second from a separate
	// goroutine while the measured phase runs.
	Progress func(Progress)
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
	case c.Queues < 1 || c.Queues > MaxQueues:
		return fmt.Errorf("%w: --queues %d out of range 1..%d", ErrConfig, c.Queues, MaxQueues)
	case c.IODepth < 1 || c.IODepth > MaxIODepth:
		return fmt.Errorf("%w: --iodepth %d out of range 1..%d", ErrConfig, c.IODepth, MaxIODepth)
	case c.BS < SectorSize || c.BS%SectorSize != 0 || c.BS > MaxBS:
		return fmt.Errorf("%w: --bs %d is not a multiple of 512 in 512..%d", ErrConfig, c.BS, MaxBS)
	case c.Mode < 0 || int(c.Mode) >= len(modeNames):
		return fmt.Errorf("%w: mode %d", ErrConfig, int(c.Mode))
	case c.RWMix < 0 || c.RWMix > 100:
		return fmt.Errorf("%w: --rwmix %d out of range 0..100", ErrConfig, c.RWMix)
	case c.Runtime < 0:
		return fmt.Errorf("%w: negative --runtime", ErrConfig)
	case c.Runtime == 0 && c.IOs == 0:
		return fmt.Errorf("%w: give --runtime or --ios", ErrConfig)
	case c.Range < 0 || c.Range%SectorSize != 0:
		return fmt.Errorf("%w: --range %d is not a multiple of 512", ErrConfig, c.Range)
	case c.Stride < 0 || c.Stride%SectorSize != 0:
		return fmt.Errorf("%w: --stride %d is not a multiple of 512", ErrConfig, c.Stride)
	case c.PID < 0:
		return fmt.Errorf("%w: --pid %d", ErrConfig, c.PID)
	}
	mem := int64(c.Queues) * int64(c.IODepth) * (int64(c.BS) + 4096)
	if mem > maxMem {
		return fmt.Errorf("%w: %d queues × %d requests × %d bytes need more than %d MiB of guest memory", ErrConfig, c.Queues, c.IODepth, c.BS, maxMem>>20)
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
	Range     int64  `json:"range"`
	Capacity  int64  `json:"capacity"`
	EventIdx  bool   `json:"event_idx"`
	QueueSize int    `json:"queue_size"`
	Verified  bool   `json:"verified"`

	Seconds float64 `json:"seconds"`
	IOs     uint64  `json:"ios"`
	Reads   uint64  `json:"reads"`
	Writes  uint64  `json:"writes"`
	Bytes   uint64  `json:"bytes"`
	IOPS    float64 `json:"iops"`
	MiBps   float64 `json:"mib_per_s"`
	Latency Latency `json:"latency"`

	// Notifications per request: kicks sent, and sleeps on the call
	// eventfd (each one needed an interrupt to wake).
	KicksPerIO float64 `json:"kicks_per_io"`
	WaitsPerIO float64 `json:"waits_per_io"`

	// CPU time per request in microseconds; BackendCPUPerIO is -1 when
	// no --pid was given or /proc could not be read.
	BackendCPUPerIO float64 `json:"backend_cpu_us_per_io"`
	OwnCPUPerIO     float64 `json:"own_cpu_us_per_io"`
}
