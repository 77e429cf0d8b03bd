package vhdx

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
)

// syncCountingStorage counts the fdatasyncs that reach the file, under
// whatever the image layers on top (latch, coalescing), so the same
// benchmark measures any version of the engine.
type syncCountingStorage struct {
	osStorage
	syncs atomic.Uint64
}

func (s *syncCountingStorage) Sync() error {
	s.syncs.Add(1)
	return s.osStorage.Sync()
}

// BenchmarkAllocatingWrites: G goroutines each issue 4 KiB writes, every one
// the first write into its block of a fresh image on the real disk, with or
// without a Flush after every 32nd write (the guest's flush cadence). It
// reports the fdatasyncs per allocation that reached the file.
func BenchmarkAllocatingWrites(b *testing.B) {
	for _, flushEvery := range []int{0, 32} {
		for _, g := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("flush=%d/G=%d", flushEvery, g), func(b *testing.B) {
				benchAllocating(b, g, flushEvery)
			})
		}
	}
}

func benchAllocating(b *testing.B, goroutines, flushEvery int) {
	// 1 MiB blocks, room for a million allocations (the file stays sparse).
	p := createFile(b, CreateOptions{Size: 1 << 40, BlockSize: mib})
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	cs := &syncCountingStorage{osStorage: osStorage{f}}
	im, err := OpenStorage(cs, OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	defer im.Close()
	// The session's header updates are not what is measured.
	if _, err := im.WriteAt(make([]byte, 4096), 0); err != nil {
		b.Fatal(err)
	}
	buf := pattern(7, 4096)
	var next atomic.Int64
	next.Store(1)
	syncs0 := cs.syncs.Load()
	b.ResetTimer()
	var wg sync.WaitGroup
	var failed atomic.Value
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := next.Add(1) - 1
				if n > int64(b.N) {
					return
				}
				if _, err := im.WriteAt(buf, n*mib); err != nil {
					failed.Store(err)
					return
				}
				if flushEvery > 0 && n%int64(flushEvery) == 0 {
					if err := im.Flush(); err != nil {
						failed.Store(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(cs.syncs.Load()-syncs0)/float64(b.N), "syncs/alloc")
}
