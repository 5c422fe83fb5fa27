package lsmt

import "github.com/google/btree"

// memIndex is a writable layer's in-memory index: an ordered set of
// non-overlapping segments where an insert overrides whatever it overlaps,
// trimming partially covered neighbours (upstream's Index0). It does not
// merge neighbours; commit compacts.
type memIndex struct {
	t *btree.BTreeG[Segment]
}

func newMemIndex() memIndex {
	return memIndex{t: btree.NewG(32, func(a, b Segment) bool { return a.Offset < b.Offset })}
}

func (x memIndex) Len() int { return x.t.Len() }

// insert adds s, overriding the ranges it covers.
func (x memIndex) insert(s Segment) {
	if s.Length == 0 {
		return
	}
	var overlapping []Segment
	// The segment starting before s may reach into it.
	x.t.DescendLessOrEqual(Segment{Offset: s.Offset}, func(prev Segment) bool {
		if prev.End() > s.Offset {
			overlapping = append(overlapping, prev)
		}
		return false
	})
	x.t.AscendRange(Segment{Offset: s.Offset}, Segment{Offset: s.End()}, func(o Segment) bool {
		if len(overlapping) == 0 || overlapping[len(overlapping)-1].Offset != o.Offset {
			overlapping = append(overlapping, o)
		}
		return true
	})
	for _, o := range overlapping {
		x.t.Delete(o)
		if o.Offset < s.Offset { // keep the head
			head := o
			head.Length = uint32(s.Offset - o.Offset)
			x.t.ReplaceOrInsert(head)
		}
		if o.End() > s.End() { // keep the tail
			tail := o
			tail.trimFront(s.End() - o.Offset)
			x.t.ReplaceOrInsert(tail)
		}
	}
	x.t.ReplaceOrInsert(s)
}

// segments returns the index in order.
func (x memIndex) segments() []Segment {
	out := make([]Segment, 0, x.t.Len())
	x.t.Ascend(func(s Segment) bool {
		out = append(out, s)
		return true
	})
	return out
}

// ascendFrom calls fn for each segment that ends after sector, in order,
// until fn returns false.
func (x memIndex) ascendFrom(sector uint64, fn func(Segment) bool) {
	x.t.DescendLessOrEqual(Segment{Offset: sector}, func(prev Segment) bool {
		if prev.End() > sector {
			sector = prev.Offset
		}
		return false
	})
	x.t.AscendGreaterOrEqual(Segment{Offset: sector}, fn)
}
