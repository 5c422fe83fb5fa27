package device

import "github.com/google/btree"

// span is the byte range [start, end).
type span struct{ start, end int64 }

// spanSet is a set of byte ranges kept as disjoint, non-adjacent spans, so
// a run of writes costs one entry. It is not safe for concurrent mutation.
type spanSet struct {
	t *btree.BTreeG[span]
}

func newSpanSet() spanSet {
	return spanSet{t: btree.NewG(32, func(a, b span) bool { return a.start < b.start })}
}

// add inserts [start, end), merging what it overlaps or touches.
func (s spanSet) add(start, end int64) {
	if start >= end {
		return
	}
	var absorbed []span
	s.t.DescendLessOrEqual(span{start: start}, func(prev span) bool {
		if prev.end >= start {
			absorbed = append(absorbed, prev)
		}
		return false
	})
	s.t.AscendGreaterOrEqual(span{start: start}, func(next span) bool {
		if next.start > end {
			return false
		}
		if len(absorbed) == 0 || absorbed[len(absorbed)-1].start != next.start {
			absorbed = append(absorbed, next)
		}
		return true
	})
	for _, a := range absorbed {
		s.t.Delete(a)
		start, end = min(start, a.start), max(end, a.end)
	}
	s.t.ReplaceOrInsert(span{start: start, end: end})
}

// appendOverlapping appends the spans overlapping [start, end), clipped to
// it, in order.
func (s spanSet) appendOverlapping(dst []span, start, end int64) []span {
	clip := func(x span) span { return span{start: max(x.start, start), end: min(x.end, end)} }
	s.t.DescendLessOrEqual(span{start: start}, func(prev span) bool {
		if prev.end > start {
			dst = append(dst, clip(prev))
		}
		return false
	})
	s.t.AscendRange(span{start: start + 1}, span{start: end}, func(next span) bool {
		dst = append(dst, clip(next))
		return true
	})
	return dst
}

// len is the number of spans.
func (s spanSet) len() int { return s.t.Len() }
