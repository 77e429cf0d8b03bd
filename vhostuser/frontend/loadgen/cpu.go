package loadgen

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// clockTick is USER_HZ, the unit of /proc/PID/stat times. It is 100 on
// every Linux architecture Go supports (the kernel ABI fixes it for
// user space, whatever CONFIG_HZ is).
const clockTick = 10 * time.Millisecond

// ProcessCPU returns the user+system CPU time of process pid, all threads,
// from /proc/PID/stat (fields 14 and 15). Its resolution is 10 ms.
func ProcessCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU extracts utime+stime from a /proc/PID/stat line. The
// command name (field 2) may hold spaces and parentheses, so fields are
// counted from the last ')'.
func parseStatCPU(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("%w: /proc stat line has no command name", ErrBadStat)
	}
	f := bytes.Fields(b[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("%w: /proc stat line has %d fields after the name", ErrBadStat, len(f))
	}
	var ticks uint64
	for _, s := range f[11:13] {
		v, err := strconv.ParseUint(string(s), 10, 63)
		if err != nil {
			return 0, fmt.Errorf("%w: %v", ErrBadStat, err)
		}
		ticks += v
	}
	if ticks > uint64(1<<62)/uint64(clockTick) {
		return 0, fmt.Errorf("%w: %d ticks", ErrBadStat, ticks)
	}
	return time.Duration(ticks) * clockTick, nil
}

// SelfCPU returns this process's user+system CPU time (getrusage).
func SelfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
