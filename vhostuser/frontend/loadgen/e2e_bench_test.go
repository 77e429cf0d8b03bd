package loadgen

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

// End-to-end benchmarks: the generator drives the real server
// (vhostuser.Serve, blk, vhdx) in the same process over a unix socket, so
// `go test -bench E2E -cpuprofile` profiles both sides of the ring at
// once. One op is one request. They show where the time goes; the
// comparison with qemu-storage-daemon is `make bench`.

// vhdxDisk creates a 64 MiB dynamic VHDX with 1 MiB blocks in a temporary
// directory, all blocks allocated when prefill is set.
func vhdxDisk(b *testing.B, prefill bool) *vhdx.Image {
	b.Helper()
	if prefill {
		return vhdxDiskSized(b, 64<<20, 64<<20)
	}
	return vhdxDiskSized(b, 64<<20, 0)
}

// vhdxDiskSized creates a dynamic VHDX of size bytes with 1 MiB blocks,
// the first prefill bytes allocated.
func vhdxDiskSized(b *testing.B, size, prefill int64) *vhdx.Image {
	b.Helper()
	path := filepath.Join(b.TempDir(), "d.vhdx")
	if err := vhdx.Create(path, vhdx.CreateOptions{Size: uint64(size), Type: vhdx.Dynamic, BlockSize: 1 << 20}); err != nil {
		b.Fatal(err)
	}
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { im.Close() })
	if prefill > 0 {
		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = byte(i*7 + 1)
		}
		for off := int64(0); off < prefill; off += int64(len(buf)) {
			if _, err := im.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	return im
}

func benchE2E(b *testing.B, d blk.Disk, c Config) {
	queues := max(c.Queues, 1)
	if c.Background != nil {
		queues += c.Background.Queues
	}
	c.Socket = serve(b, d, queues)
	c.IOs = uint64(b.N)
	c.Seed = 1
	b.ResetTimer()
	res, err := Run(context.Background(), c)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(res.IOPS, "IOPS")
	b.ReportMetric(res.Latency.P50, "p50-µs")
	b.ReportMetric(res.KicksPerIO, "kicks/op")
	b.ReportMetric(res.WaitsPerIO, "waits/op")
	if res.FlushLatency != nil {
		b.ReportMetric(res.FlushLatency.P99, "flush-p99-µs")
	}
	if bg := res.Background; bg != nil {
		b.ReportMetric(res.Latency.P99, "p99-µs")
		b.ReportMetric(bg.IOPS, "background-IOPS")
	}
}

func BenchmarkE2EMemRandRead4KQD1(b *testing.B) {
	benchE2E(b, &memDisk{data: make([]byte, 64<<20)}, Config{Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead})
}

func BenchmarkE2EMemRandRead4KQD32(b *testing.B) {
	benchE2E(b, &memDisk{data: make([]byte, 64<<20)}, Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandRead})
}

func BenchmarkE2EVHDXRandRead4KQD1(b *testing.B) {
	benchE2E(b, vhdxDisk(b, true), Config{Queues: 1, IODepth: 1, BS: 4096, Mode: RandRead})
}

func BenchmarkE2EVHDXRandRead4KQD32(b *testing.B) {
	benchE2E(b, vhdxDisk(b, true), Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandRead})
}

func BenchmarkE2EVHDXRandWrite4KQD32(b *testing.B) {
	benchE2E(b, vhdxDisk(b, true), Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandWrite})
}

func BenchmarkE2EVHDXRead1MQD8(b *testing.B) {
	benchE2E(b, vhdxDisk(b, true), Config{Queues: 1, IODepth: 8, BS: 1 << 20, Mode: SeqRead})
}

// The issue 12 rows of `make bench`, in process: a FLUSH among the
// requests, and reads of allocated blocks while another queue allocates.

func BenchmarkE2EVHDXRandRW70Flush16QD32(b *testing.B) {
	benchE2E(b, vhdxDisk(b, true), Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandRW, RWMix: 70, FlushEvery: 16})
}

func BenchmarkE2EVHDXRandWriteFreshFlush32QD32(b *testing.B) {
	// 4K at the start of each 1 MiB block: every write allocates until
	// the 4096 blocks are used up.
	benchE2E(b, vhdxDiskSized(b, 4<<30, 0), Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandWrite, Stride: 1 << 20,
		RandomMap: true, FlushEvery: 32})
}

func BenchmarkE2EVHDXReadWhileAllocatingQD32(b *testing.B) {
	benchE2E(b, vhdxDiskSized(b, 4<<30, 64<<20), Config{Queues: 1, IODepth: 32, BS: 4096, Mode: RandRead, Range: 64 << 20,
		Background: &Stream{Queues: 1, IODepth: 32, BS: 4096, Mode: RandWrite, Offset: 64 << 20, Stride: 1 << 20, RandomMap: true}})
}
