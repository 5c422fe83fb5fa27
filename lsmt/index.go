package lsmt

import "io"

// segmentIndex is a sorted, non-overlapping segment list with a bucket
// table for fast lookups: the sector space up to the last segment's end is
// cut into power-of-two buckets, about one per segment, and each bucket
// records the first segment ending after its start. A lookup reads one
// bucket and searches only the segments between it and the next, usually
// one or two, so it costs about two cache misses on a million-segment index
// where a plain binary search costs twenty.
type segmentIndex struct {
	segs    []Segment
	buckets []uint32
	shift   uint
}

func newSegmentIndex(segs []Segment) segmentIndex {
	x := segmentIndex{segs: segs}
	if len(segs) == 0 {
		return x
	}
	span := segs[len(segs)-1].End()
	for x.shift = 0; span>>x.shift > uint64(len(segs)); x.shift++ {
	}
	x.buckets = make([]uint32, span>>x.shift+1)
	i := 0
	for b := range x.buckets {
		start := uint64(b) << x.shift
		for i < len(segs) && segs[i].End() <= start {
			i++
		}
		x.buckets[b] = uint32(i)
	}
	return x
}

// find returns the index of the first segment that ends after sector, or
// len(segs) when there is none.
func (x *segmentIndex) find(sector uint64) int {
	b := sector >> x.shift
	if b >= uint64(len(x.buckets)) {
		return len(x.segs)
	}
	lo, hi := int(x.buckets[b]), len(x.segs)
	if b+1 < uint64(len(x.buckets)) {
		hi = int(x.buckets[b+1])
	}
	// Hand-rolled: sort.Search's closure calls cost a third of this hot path.
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if x.segs[m].End() > sector {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

// readMapped reads [off, off+len(p)) of a virtual disk of vsize bytes whose
// index is x, taking data of a segment with tag t from source(t). Holes and
// zeroed segments read as zeros. Reads need not be sector aligned.
func readMapped(p []byte, off, vsize int64, x *segmentIndex, source func(tag uint8) io.ReaderAt) (int, error) {
	if off < 0 {
		return 0, ErrNegativeOffset
	}
	if off >= vsize {
		return 0, io.EOF
	}
	want := len(p)
	if int64(len(p)) > vsize-off {
		p = p[:vsize-off]
	}
	pos := off
	end := off + int64(len(p))
	for i := x.find(uint64(off) / SectorSize); i < len(x.segs) && pos < end; i++ {
		s := x.segs[i]
		segStart := int64(s.Offset) * SectorSize
		if segStart >= end {
			break
		}
		if segStart > pos {
			clear(p[pos-off : segStart-off])
			pos = segStart
		}
		segEnd := min(int64(s.End())*SectorSize, end)
		dst := p[pos-off : segEnd-off]
		if s.Zeroed {
			clear(dst)
		} else {
			src := int64(s.MOffset)*SectorSize + (pos - segStart)
			if err := readFull(source(s.Tag), dst, src); err != nil {
				return int(pos - off), wrapLayerErr(s.Tag, err)
			}
		}
		pos = segEnd
	}
	clear(p[pos-off:])
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}
