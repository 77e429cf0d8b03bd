package loadgen

import "math/bits"

// rng is xorshift64*: fast, allocation-free and good enough to spread
// offsets; each queue has its own.
type rng struct{ s uint64 }

func newRNG(seed uint64) rng {
	if seed == 0 {
		seed = 0x2545f4914f6cdd1d
	}
	return rng{seed}
}

func (r *rng) next() uint64 {
	r.s ^= r.s >> 12
	r.s ^= r.s << 25
	r.s ^= r.s >> 27
	return r.s * 0x2545f4914f6cdd1d
}

// below returns a value in [0, n), n > 0 (Lemire's multiply-shift; the
// tiny bias is irrelevant for offsets).
func (r *rng) below(n uint64) uint64 {
	hi, _ := bits.Mul64(r.next(), n)
	return hi
}

// permutation enumerates [0, n) in a scrambled order without storing it:
// a full-period LCG modulo the next power of two m ≥ n, passed through a
// bijection of [0, m) (xor-shift and odd multiply), skipping values ≥ n
// (cycle walking). Every value appears exactly once per n calls.
type permutation struct {
	n, mask uint64
	shift   uint
	x, c    uint64
}

func newPermutation(n uint64, r *rng) permutation {
	k := uint(bits.Len64(n - 1))
	if n <= 1 {
		k = 0
	}
	mask := uint64(1)<<k - 1
	if k == 64 {
		mask = ^uint64(0)
	}
	return permutation{n: n, mask: mask, shift: max(k/2, 1), x: r.next() & mask, c: r.next() | 1}
}

func (p *permutation) next() uint64 {
	if p.n <= 1 {
		return 0
	}
	for {
		// a ≡ 1 (mod 4) and c odd: period m (Hull–Dobell).
		p.x = (p.x*0x5851f42d4c957f2d + p.c) & p.mask
		y := p.x
		y ^= y >> p.shift
		y = (y * 0x9e3779b97f4a7c15) & p.mask
		y ^= y >> p.shift
		if y < p.n {
			return y
		}
	}
}

// picker chooses the offset, length and direction of each request of one
// queue.
type picker struct {
	mode   Mode
	bs     int64
	rwmix  uint64
	rng    rng
	stride int64
	// random: offsets lo+k·stride for k in [0, slots)
	lo    int64
	slots uint64
	perm  *permutation // RandomMap
	// sequential: [start, end), next at pos
	start, end, pos int64
}

func (p *picker) next() (off int64, n int, read bool) {
	switch p.mode {
	case SeqRead, SeqWrite:
		if p.pos >= p.end {
			p.pos = p.start
		}
		off = p.pos
		n = int(min(p.bs, p.end-p.pos))
		p.pos += int64(n)
		return off, n, p.mode == SeqRead
	}
	var k uint64
	if p.perm != nil {
		k = p.perm.next()
	} else {
		k = p.rng.below(p.slots)
	}
	off = p.lo + int64(k)*p.stride
	switch p.mode {
	case RandRead:
		read = true
	case RandRW:
		read = p.rng.below(100) < p.rwmix
	}
	return off, int(p.bs), read
}
