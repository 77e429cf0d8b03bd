package loadgen

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// PwriteConfig describes a run of the bare-write baseline (Pwrite).
type PwriteConfig struct {
	File    string // an existing regular file; its content is overwritten
	BS      int    // bytes per write, a multiple of 512
	Runtime time.Duration
	Seed    uint64
}

// Pwrite is the baseline of the allocated random-overwrite row of make
// bench: one thread that does nothing but BS-sized pwrite(2)s at random
// BS-aligned offsets of File for Runtime. No back-end can overwrite the
// file faster from one queue, whatever its own cost: a buffered write to
// one file holds the inode's lock on ext4, so a second writing thread
// only adds lock hand-offs (docs/benchmarks/profile.md, "Allocated 4K
// randwrite"). How fast such a write is depends on how the page cache
// came to hold the file (the folio size), so the baseline runs on a copy
// made the same way as the back-ends' images.
//
// The result is a Result with RW "randwrite", IODepth 1 and no back-end:
// BackendCPUPerIO is the loop's own CPU time per write (the loop stands
// in for a back-end), OwnCPUPerIO 0.
func Pwrite(ctx context.Context, c PwriteConfig) (*Result, error) {
	if c.BS <= 0 || c.BS%512 != 0 || c.BS > MaxBS {
		return nil, fmt.Errorf("%w: block size %d: want a multiple of 512 up to %d", ErrConfig, c.BS, MaxBS)
	}
	if c.Runtime <= 0 {
		return nil, fmt.Errorf("%w: runtime %v: want more than 0", ErrConfig, c.Runtime)
	}
	// O_WRONLY without O_CREAT or O_TRUNC: the file must exist and keeps
	// its size and its cached pages.
	f, err := os.OpenFile(c.File, os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrConfig, c.File)
	}
	slots := uint64(st.Size()) / uint64(c.BS)
	if slots == 0 {
		return nil, fmt.Errorf("%w: %s (%d bytes) holds no %d-byte block", ErrConfig, c.File, st.Size(), c.BS)
	}
	buf := make([]byte, c.BS)
	r := newRNG(c.Seed)
	for i := 0; i+8 <= len(buf); i += 8 {
		le.PutUint64(buf[i:], r.next())
	}
	fd := int(f.Fd())

	var h Histogram
	cpu0 := SelfCPU()
	start := time.Now()
	deadline := start.Add(c.Runtime)
	last := start
	var n uint64
	for {
		off := int64(r.below(slots)) * int64(c.BS)
		w, err := unix.Pwrite(fd, buf, off)
		if err == nil && w != len(buf) {
			err = fmt.Errorf("short write: %d of %d bytes", w, len(buf))
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return nil, fmt.Errorf("%w: pwrite at %d of %s: %v", ErrIOStatus, off, c.File, err)
		}
		now := time.Now()
		if err == nil {
			n++
			h.Record(uint64(now.Sub(last)))
		}
		last = now
		if !now.Before(deadline) || n%256 == 0 && ctx.Err() != nil {
			break
		}
	}
	secs := last.Sub(start).Seconds()
	cpu := SelfCPU() - cpu0
	res := &Result{
		RW: RandWrite.String(), BS: c.BS, Queues: 1, IODepth: 1,
		Range: int64(slots) * int64(c.BS), Capacity: st.Size(),
		Seconds: secs, IOs: n, Writes: n, Bytes: n * uint64(c.BS),
		Latency: summarize(&h),
	}
	res.setRates(secs)
	res.BackendCPUPerIO = -1
	if n > 0 {
		res.BackendCPUPerIO = float64(cpu.Nanoseconds()) / 1e3 / float64(n)
	}
	return res, nil
}
