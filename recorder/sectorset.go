package recorder

import "math/bits"

// A sectorSet records which 512-byte sectors of one layer's byte space are already in the
// trace. It is a bitmap split into pages allocated on first touch, so its memory follows the
// bytes a container reads (1/4096 of them), not the layer's size; only the page directory is
// sized by the layer, one pointer per 16 MiB.
type sectorSet struct {
	pages []*bitPage
}

const (
	pageShift = 15 // sectors per page: one 4 KiB page of bits covers 16 MiB
	pageWords = 1 << pageShift / 64
	wordMask  = pageWords - 1
)

type bitPage [pageWords]uint64

// newSectorSet returns a set for sectors [0, limit).
func newSectorSet(limit uint64) sectorSet {
	return sectorSet{pages: make([]*bitPage, (limit+1<<pageShift-1)>>pageShift)}
}

// firstClear returns the first sector in [x, to) not in the set, or to.
func (s *sectorSet) firstClear(x, to uint64) uint64 {
	for x < to {
		p := s.pages[x>>pageShift]
		if p == nil {
			return x
		}
		if w := ^p[x>>6&wordMask] >> (x & 63); w != 0 {
			return min(x+uint64(bits.TrailingZeros64(w)), to)
		}
		x = x | 63 + 1
	}
	return to
}

// addUntilSet adds sectors from x on, stopping before the first one already in the set or at
// to, and returns where it stopped.
func (s *sectorSet) addUntilSet(x, to uint64) uint64 {
	for x < to {
		p := s.pages[x>>pageShift]
		if p == nil {
			p = new(bitPage)
			s.pages[x>>pageShift] = p
		}
		i, b := x>>6&wordMask, x&63
		n := min(64-b, to-x)
		stop := false
		if w := p[i] >> b; w != 0 {
			if tz := uint64(bits.TrailingZeros64(w)); tz < n {
				n, stop = tz, true
			}
		}
		if n > 0 {
			p[i] |= ^uint64(0) >> (64 - n) << b
			x += n
		}
		if stop {
			return x
		}
	}
	return to
}

// reset empties the set, keeping its pages for reuse.
func (s *sectorSet) reset() {
	for _, p := range s.pages {
		if p != nil {
			clear(p[:])
		}
	}
}

// pagesInUse is the number of pages allocated.
func (s *sectorSet) pagesInUse() int {
	n := 0
	for _, p := range s.pages {
		if p != nil {
			n++
		}
	}
	return n
}
