package recorder

import (
	"math/rand/v2"
	"testing"
)

// TestSectorSetMatchesBools checks both operations against a plain []bool over ranges that
// cross word and page boundaries.
func TestSectorSetMatchesBools(t *testing.T) {
	const limit = 3<<pageShift + 100
	rng := rand.New(rand.NewPCG(1, 2))
	s := newSectorSet(limit)
	ref := make([]bool, limit)
	for i := range 20000 {
		x := rng.Uint64N(limit)
		to := min(limit, x+1+rng.Uint64N(300))
		if i%50 == 0 { // long ranges over whole pages
			to = min(limit, x+rng.Uint64N(3<<pageShift))
		}
		wantClear := to
		for y := x; y < to; y++ {
			if !ref[y] {
				wantClear = y
				break
			}
		}
		if got := s.firstClear(x, to); got != wantClear {
			t.Fatalf("op %d: firstClear(%d, %d) = %d, want %d", i, x, to, got, wantClear)
		}
		if rng.IntN(2) == 0 {
			continue
		}
		wantStop := to
		for y := x; y < to; y++ {
			if ref[y] {
				wantStop = y
				break
			}
			ref[y] = true
		}
		if got := s.addUntilSet(x, to); got != wantStop {
			t.Fatalf("op %d: addUntilSet(%d, %d) = %d, want %d", i, x, to, got, wantStop)
		}
	}
	for y := range uint64(limit) {
		if s.firstClear(y, y+1) == y == ref[y] {
			t.Fatalf("sector %d: set disagrees with the reference", y)
		}
	}
	if n := s.pagesInUse(); n != 4 {
		t.Errorf("%d pages in use, want 4", n)
	}
	s.reset()
	if got := s.firstClear(0, limit); got != 0 {
		t.Errorf("after reset, firstClear(0, limit) = %d", got)
	}
}
