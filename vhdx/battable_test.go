package vhdx

import (
	"encoding/binary"
	"fmt"
	"math/rand"
	"sync"
	"testing"
)

// batPattern fills the entries of a BAT of n entries (chunk ratio cr) the
// way a case describes; bitmap entries are 0 unless the case sets them.
type batPattern struct {
	name string
	fill func(i uint64, bitmap bool, r *rand.Rand) uint64
}

var batPatterns = []batPattern{
	{"all NOT_PRESENT", func(uint64, bool, *rand.Rand) uint64 { return 0 }},
	{"qemu-img ZERO state", func(_ uint64, bitmap bool, _ *rand.Rand) uint64 {
		if bitmap {
			return 0
		}
		return stateZero
	}},
	{"ZERO state in bitmap entries too", func(uint64, bool, *rand.Rand) uint64 { return stateZero }},
	{"sparse allocations", func(i uint64, bitmap bool, r *rand.Rand) uint64 {
		if bitmap || r.Intn(700) != 0 {
			return stateZero
		}
		return makeBATEntry(stateFullyPresent, (i+8)*mib)
	}},
	{"UNDEFINED without offset", func(_ uint64, bitmap bool, _ *rand.Rand) uint64 {
		if bitmap {
			return 0
		}
		return stateUndefined // 1: no fill, however uniform
	}},
	{"UNMAPPED without offset", func(_ uint64, bitmap bool, _ *rand.Rand) uint64 {
		if bitmap {
			return 0
		}
		return stateUnmapped
	}},
	{"mixed NOT_PRESENT and ZERO", func(_ uint64, bitmap bool, r *rand.Rand) uint64 {
		if bitmap || r.Intn(2) == 0 {
			return 0
		}
		return stateZero
	}},
	{"present sector bitmaps", func(i uint64, bitmap bool, _ *rand.Rand) uint64 {
		if bitmap {
			return makeBATEntry(stateFullyPresent, (i+8)*mib)
		}
		return stateZero
	}},
}

// TestBATTableHoldsEveryEntryOfEveryPagePattern: whatever the pages hold
// (implicit or stored, bitmap entries at any stride, a short last page),
// every entry reads back as it lies in the file, and only pages that are
// not one fill are stored.
func TestBATTableHoldsEveryEntryOfEveryPagePattern(t *testing.T) {
	for _, cr := range []uint64{16, 511, 512, 4096} {
		for _, n := range []uint64{1, 511, 512, 513, 5000, 3*batPageEntries + 17} {
			for _, pat := range batPatterns {
				for _, inPlace := range []bool{true, false} {
					t.Run(fmt.Sprintf("cr%d/n%d/%s/inplace=%v", cr, n, pat.name, inPlace), func(t *testing.T) {
						r := rand.New(rand.NewSource(int64(cr*n + 1)))
						raw := make([]byte, n*8)
						for i := range n {
							binary.LittleEndian.PutUint64(raw[i*8:], pat.fill(i, isBitmapIndex(i, cr), r))
						}
						// The file holds fewer entries than the table when
						// the last chunk's bitmap entry lies past the region.
						onDisk := n - n%3
						tab := newBATTable(n, cr)
						for p := uint64(0); p*batPageEntries < onDisk; p++ {
							end := min((p+1)*batPageEntries, onDisk)
							tab.setPage(p, raw[p*batPageEntries*8:end*8], inPlace)
						}
						for i := range n {
							want := uint64(0)
							if i < onDisk {
								want = binary.LittleEndian.Uint64(raw[i*8:])
							}
							if got := tab.load(i); got != want {
								t.Fatalf("entry %d = %#x, want %#x", i, got, want)
							}
						}
						for p := range tab.pages {
							stored := tab.pages[p].Load() != nil
							first := uint64(p) * batPageEntries
							end := min(first+batPageEntries, onDisk)
							var b []byte
							if first < end {
								b = raw[first*8 : end*8]
							}
							_, uniform := tab.uniformFill(first, b)
							if stored == uniform {
								t.Errorf("page %d: stored %v, one fill %v", p, stored, uniform)
							}
						}
					})
				}
			}
		}
	}
}

// TestStoringTheImplicitValueStoresNoPage: a store that changes nothing
// (the loader refusing nothing, a BAT update writing back what is there)
// costs no memory.
func TestStoringTheImplicitValueStoresNoPage(t *testing.T) {
	tab := newBATTable(4*batPageEntries, 4096)
	tab.fill[1] = stateZero
	tab.store(10, 0)
	tab.store(batPageEntries+3, stateZero)
	for p := range tab.pages {
		if tab.pages[p].Load() != nil {
			t.Fatalf("page %d stored by a store of its implicit value", p)
		}
	}
	tab.store(batPageEntries+3, makeBATEntry(stateFullyPresent, 9*mib))
	if tab.pages[1].Load() == nil {
		t.Fatal("a store of a new value stored no page")
	}
	for k := uint64(0); k < batPageEntries; k++ {
		want := uint64(stateZero)
		if k == 3 {
			want = makeBATEntry(stateFullyPresent, 9*mib)
		}
		if got := tab.load(batPageEntries + k); got != want {
			t.Fatalf("entry %d = %#x after the page was stored, want %#x", batPageEntries+k, got, want)
		}
	}
}

// TestTwoWritersStoringIntoOneImplicitPageKeepBothEntries drives the race
// of the first stores into an implicit page: the second writer builds its
// page before the first publishes, loses the compare-and-swap, and must
// store into the winner's page, not into its own (which nobody sees).
// Readers during the race see each entry's old or new value only.
func TestTwoWritersStoringIntoOneImplicitPageKeepBothEntries(t *testing.T) {
	tab := newBATTable(batPageEntries, 4096)
	tab.fill[0] = stateZero
	a, b := makeBATEntry(stateFullyPresent, 8*mib), makeBATEntry(stateFullyPresent, 9*mib)

	built := make(chan struct{})
	proceed := make(chan struct{})
	batPageBuiltHook = func(p uint64) {
		if p == 0 {
			batPageBuiltHook = nil // only the first writer waits
			close(built)
			<-proceed
		}
	}
	defer func() { batPageBuiltHook = nil }()

	stop := make(chan struct{})
	var readers sync.WaitGroup
	for range 2 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if e := tab.load(1); e != stateZero && e != a {
					t.Errorf("entry 1 read %#x: neither old nor new", e)
				}
				if e := tab.load(2); e != stateZero && e != b {
					t.Errorf("entry 2 read %#x: neither old nor new", e)
				}
			}
		}()
	}
	first := make(chan struct{})
	go func() {
		defer close(first)
		tab.store(1, a) // builds its page, then waits in the hook
	}()
	<-built
	tab.store(2, b) // builds and publishes its own page first
	close(proceed)
	<-first
	close(stop)
	readers.Wait()

	for i, want := range map[uint64]uint64{1: a, 2: b, 3: stateZero} {
		if got := tab.load(i); got != want {
			t.Errorf("entry %d = %#x, want %#x", i, got, want)
		}
	}
}
