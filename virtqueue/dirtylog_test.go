package virtqueue_test

import (
	"math"
	"sync"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

func marked(bits []byte) []uint64 {
	var out []uint64
	for i, b := range bits {
		for bit := range 8 {
			if b&(1<<bit) != 0 {
				out = append(out, uint64(i*8+bit))
			}
		}
	}
	return out
}

func TestDirtyLogMarksEveryPageTheRangeTouchesAndNothingElse(t *testing.T) {
	for _, tc := range []struct {
		name   string
		gpa, n uint64
		want   []uint64
	}{
		{"one byte", 4096*5 + 17, 1, []uint64{5}},
		{"last byte of a page", 4096*6 - 1, 1, []uint64{5}},
		{"straddles two pages", 4096*6 - 1, 2, []uint64{5, 6}},
		{"crosses a bitmap byte", 4096 * 6, 4096 * 4, []uint64{6, 7, 8, 9}},
		{"a whole bitmap byte and more", 0, 4096*9 + 1, []uint64{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
		{"clipped at the end of the bitmap", 4096 * 30, 4096 * 10, []uint64{30, 31}},
		{"beyond the bitmap", 4096 * 32, 4096, nil},
		{"wraps around 2^64", math.MaxUint64 - 10, 100, nil},
		{"empty", 4096, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bits := make([]byte, 4) // 32 pages
			virtqueue.NewDirtyLog(bits).MarkGPA(tc.gpa, tc.n)
			got := marked(bits)
			if len(got) != len(tc.want) {
				t.Fatalf("marked %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("marked %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// Marks from many goroutines on the same bitmap bytes are never lost (the
// OR is atomic, not a read-modify-write of the byte).
func TestConcurrentDirtyLogMarksAreNeverLost(t *testing.T) {
	bits := make([]byte, 64)
	l := virtqueue.NewDirtyLog(bits[1:61]) // unaligned start: neighbours share words
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := uint64(g); p < 60*8; p += 8 {
				l.MarkGPA(p*4096, 1)
			}
		}()
	}
	wg.Wait()
	for i, b := range bits {
		want := byte(0xff)
		if i == 0 || i >= 61 {
			want = 0
		}
		if b != want {
			t.Fatalf("bitmap byte %d = %#x, want %#x", i, b, want)
		}
	}
}

func TestHostGPAFindsTheGuestAddressOfAMappedSlice(t *testing.T) {
	a, b := make([]byte, 8192), make([]byte, 4096)
	m, err := virtqueue.NewMemory([]virtqueue.Region{
		{GuestPhysAddr: 0x10000, UserAddr: 0x7000000, Data: a},
		{GuestPhysAddr: 0x40000, UserAddr: 0x9000000, Data: b},
	})
	if err != nil {
		t.Fatal(err)
	}
	if g, ok := m.HostGPA(a[100:200]); !ok || g != 0x10000+100 {
		t.Fatalf("HostGPA(a[100:]) = %#x, %t", g, ok)
	}
	if g, ok := m.HostGPA(b[4095:]); !ok || g != 0x40000+4095 {
		t.Fatalf("HostGPA(b[4095:]) = %#x, %t", g, ok)
	}
	if _, ok := m.HostGPA(make([]byte, 10)); ok {
		t.Fatal("HostGPA found a slice outside guest memory")
	}
	if g, ok := m.UserGPA(0x9000000 + 12); !ok || g != 0x40000+12 {
		t.Fatalf("UserGPA = %#x, %t", g, ok)
	}
	if _, ok := m.UserGPA(0x9000000 + 4096); ok {
		t.Fatal("UserGPA translated an address past its region")
	}
}

func BenchmarkDirtyLogMark64KiB(b *testing.B) {
	l := virtqueue.NewDirtyLog(make([]byte, 1<<16))
	b.SetBytes(64 << 10)
	for i := 0; b.Loop(); i++ {
		l.MarkGPA(uint64(i%1024)*(64<<10), 64<<10)
	}
}
