package vhdx

import (
	"testing"
)

// BenchmarkLiveMerge measures the engine alone: the merge of a child
// holding 32 MiB (whole 1 MiB blocks, in the page cache) into its parent,
// start to finish, rate unbounded and no guest I/O; bytes/s is the copy
// speed. BenchmarkLiveMergeWriteDuringMerge4K is the cost per 4 KiB write
// through a LiveMerge (the dirty mark) beside BenchmarkChildWrite4K.
func BenchmarkLiveMerge(b *testing.B) {
	o := CreateOptions{Size: 64 * mib, BlockSize: mib}
	const held = 32 * mib
	b.SetBytes(held)
	for b.Loop() {
		b.StopTimer()
		paths := makeChain(b, o, 1, nil)
		top, err := Open(paths[1], OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := top.WriteAt(pattern(1, held), 0); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		p := runLiveMerge(b, top)
		b.StopTimer()
		p.Close()
		b.StartTimer()
	}
}

func benchmarkWrite4K(b *testing.B, merging bool) {
	o := CreateOptions{Size: 64 * mib, BlockSize: mib}
	paths := makeChain(b, o, 1, nil)
	top, err := Open(paths[1], OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := top.WriteAt(pattern(1, 16*mib), 0); err != nil {
		b.Fatal(err)
	}
	var w interface {
		WriteAt([]byte, int64) (int, error)
	} = top
	var m *LiveMerge
	if merging {
		if m, err = StartLiveMerge(top, LiveMergeOptions{}); err != nil {
			b.Fatal(err)
		}
		w = m
	}
	buf := pattern(2, 4096)
	b.SetBytes(4096)
	i := int64(0)
	for b.Loop() {
		if _, err := w.WriteAt(buf, (i*4096)%(16*mib)); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.StopTimer()
	if m != nil {
		m.Abandon()
	}
	top.Close()
}

func BenchmarkChildWrite4K(b *testing.B)                { benchmarkWrite4K(b, false) }
func BenchmarkLiveMergeWriteDuringMerge4K(b *testing.B) { benchmarkWrite4K(b, true) }
