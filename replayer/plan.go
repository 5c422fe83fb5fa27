package replayer

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/btree"
	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/trace"
)

// BlobRanger translates a range of a layer's LSMT byte space into the range
// of its blob that holds it. *lsmt.Blob implements it.
type BlobRanger interface {
	BlobRange(off, n int64) (start, end int64, err error)
}

// Prefetcher makes a range of a blob local. *blobcache.Blob implements it.
type Prefetcher interface {
	Prefetch(ctx context.Context, off, n int64) error
}

// Expecter is implemented by a Prefetcher that wants to know the whole
// plan before the prefetching starts (*blobcache.Blob does, to tell a
// prefetch running behind the reader from a read the plan does not know,
// and to hold its own readahead back while the trace brings what the
// reader needs). Run calls Expect for every range of the blob before the
// trace phase and EndExpect once when the trace phase ends (done,
// failed or cancelled), before any full fetch.
type Expecter interface {
	Expect(off, n int64)
	EndExpect()
}

// Layer is one layer of the mounted image, listed bottom first as the
// device stacks them (the baselayer, when present, is layer 0).
type Layer struct {
	Digest    digest.Digest
	LayerSize int64 // size of the LSMT byte space, for bounds checks
	BlobSize  int64 // size of the blob, for the full-fetch phase
	Ranges    BlobRanger
	Blob      Prefetcher
}

// ErrNoMatch is returned when no frame of a trace belongs to the image.
var ErrNoMatch = errors.New("replayer: trace shares no layer with the image")

// Range is one prefetch unit: bytes [Start, End) of layer Layer's blob.
type Range struct {
	Layer      int
	Start, End int64
}

// PlanStats say how a trace mapped onto an image.
type PlanStats struct {
	Frames        int   // frames in the trace
	Matched       int   // frames whose layer the image has
	Unmatched     int   // frames of layers the image lacks (by digest)
	OutOfRange    int   // frames beyond their layer's size, dropped
	Truncated     int   // frames dropped by Options.MaxFrames
	LayersMatched int   // trace layers found in the image
	Ranges        int   // prefetch ranges after coalescing
	Bytes         int64 // blob bytes the ranges cover (each byte once)
	// NeededBytes is the blob bytes the matched frames themselves cover
	// (each byte once): Bytes less the gaps coalescing filled in.
	NeededBytes int64
	// StartupSpan is how long the recorded start-up went on reading data
	// it had not read before: the first access by which the matched frames
	// had read startupShare of their bytes (0 for an upstream trace, which
	// has no times). Not the last first access: a recording runs until the
	// container stops, and a server's later reads trickle in long after
	// its start-up.
	StartupSpan time.Duration
}

// Plan is the ordered prefetch work for one image.
type Plan struct {
	Ranges []Range
	Stats  PlanStats
}

// NewPlan maps t onto layers. Trace layers are matched by digest; a trace
// layer without a digest (an upstream binary trace) matches the image layer
// at the same position, as upstream replays. Bad frames are dropped and
// counted, never fatal: a trace must not fail a mount.
func NewPlan(t *trace.Trace, layers []Layer, opts Options) (*Plan, error) {
	opts = opts.withDefaults()
	match := matchLayers(t, layers)
	p := &Plan{}
	p.Stats.Frames = len(t.Frames)
	for _, m := range match {
		if m >= 0 {
			p.Stats.LayersMatched++
		}
	}
	c := newCoalescer(len(layers), opts.MergeSize, opts.MergeGap)
	var firsts []firstAccess
	for i, f := range t.Frames {
		if opts.MaxFrames > 0 && i >= opts.MaxFrames {
			p.Stats.Truncated = len(t.Frames) - i
			break
		}
		img := -1
		if f.Layer >= 0 && f.Layer < len(match) {
			img = match[f.Layer]
		}
		if img < 0 {
			p.Stats.Unmatched++
			continue
		}
		l := layers[img]
		if f.Offset < 0 || f.Length <= 0 || f.Offset >= l.LayerSize || f.Length > l.LayerSize-f.Offset {
			p.Stats.OutOfRange++
			continue
		}
		start, end, err := l.Ranges.BlobRange(f.Offset, f.Length)
		if err != nil {
			p.Stats.OutOfRange++
			continue
		}
		p.Stats.Matched++
		firsts = append(firsts, firstAccess{f.TimeNS, f.Length})
		c.add(Range{Layer: img, Start: start, End: end})
	}
	p.Ranges = c.ranges
	p.Stats.Ranges = len(p.Ranges)
	p.Stats.Bytes = unionBytes(p.Ranges, len(layers))
	p.Stats.NeededBytes = c.coveredBytes()
	p.Stats.StartupSpan = startupSpan(firsts)
	if p.Stats.Matched == 0 && p.Stats.Frames > 0 {
		return p, fmt.Errorf("%w: %d frames, %d of %d trace layers found", ErrNoMatch,
			p.Stats.Frames, p.Stats.LayersMatched, len(t.Layers))
	}
	return p, nil
}

// startupShare is the share of a trace's bytes whose first access
// StartupSpan waits for.
const startupShare = 0.9

// firstAccess is a frame's first access and its length.
type firstAccess struct{ ns, n int64 }

// startupSpan is the time by which the frames had read startupShare of
// their bytes.
func startupSpan(firsts []firstAccess) time.Duration {
	var total int64
	for _, f := range firsts {
		total += f.n
	}
	slices.SortStableFunc(firsts, func(a, b firstAccess) int { return cmp.Compare(a.ns, b.ns) })
	var sum int64
	for _, f := range firsts {
		if sum += f.n; float64(sum) >= startupShare*float64(total) {
			return time.Duration(f.ns)
		}
	}
	return 0
}

// unionBytes is the number of blob bytes the ranges cover: coalescing can
// grow a range over bytes an earlier one has, so the ranges may overlap.
func unionBytes(ranges []Range, layers int) int64 {
	sets := make([]intervals, layers)
	for _, r := range ranges {
		sets[r.Layer].add(r.Start, r.End)
	}
	var n int64
	for i := range sets {
		n += sets[i].bytes()
	}
	return n
}

// coveredBytes is the bytes of the frames added, each byte once.
func (c *coalescer) coveredBytes() int64 {
	var n int64
	for i := range c.covered {
		n += c.covered[i].bytes()
	}
	return n
}

// matchLayers returns, for each trace layer, the image layer it is (or -1).
// Frames may name layers beyond t.Layers when a binary trace came without
// a layer list; those match by position.
func matchLayers(t *trace.Trace, layers []Layer) []int {
	n := len(t.Layers)
	for _, f := range t.Frames {
		n = max(n, f.Layer+1)
	}
	n = min(n, trace.MaxLayers)
	byDigest := make(map[digest.Digest]int, len(layers))
	for i, l := range layers {
		if l.Digest != "" {
			byDigest[l.Digest] = i
		}
	}
	match := make([]int, n)
	for i := range match {
		match[i] = -1
		if i < len(t.Layers) && t.Layers[i].Digest != "" {
			if j, ok := byDigest[t.Layers[i].Digest]; ok {
				match[i] = j
			}
			continue
		}
		if i < len(layers) {
			match[i] = i
		}
	}
	return match
}

// coalescer builds the ordered range list: a frame's range merges into an
// earlier range of the same blob when they overlap or lie within MergeGap
// and the result stays within the size limits below; a frame whose bytes
// earlier frames already covered is dropped. Any earlier range will do,
// not only the last: a start-up reads files that lie side by side in the
// blob at different moments, and small ranges fetched apart cost a request
// each (the Django start-up's 996
// ranges took 585-596 requests when only neighbours in the trace merged,
// 380-400 when any do; its replay 10.8 -> 9.1 s at 25 Mbit/s with the
// other changes of that day). The merged range keeps the earlier one's
// place, so the later bytes arrive early, never late.
type coalescer struct {
	ranges    []Range
	covered   []intervals // per layer: the bytes the frames added cover
	byStart   []*btree.BTreeG[planned]
	mergeSize int64
	mergeGap  int64
}

// planned is a range of the plan in its layer's byStart tree.
type planned struct {
	start, end int64
	idx        int // in coalescer.ranges
}

func lessPlanned(a, b planned) bool {
	if a.start != b.start {
		return a.start < b.start
	}
	return a.idx < b.idx
}

// mergeEarlierSize bounds a range that takes in a later one and is not
// the last range (the last grows to MergeSize, as a sequential read
// does): every byte it takes in delays the ranges after it, which the
// start-up needs sooner, so it stays within what one request (a cache
// refill window) fetches. On the cold-start benchmark 1 MiB did no
// measurably worse; the bound is there for traces where it would.
const mergeEarlierSize = 256 << 10

// mergeLookback bounds the ranges add examines, nearest first: ranges of
// one blob seldom overlap, so the first one that ends before the new range
// (less the gap) ends the search in practice.
const mergeLookback = 8

func newCoalescer(layers int, mergeSize, mergeGap int64) *coalescer {
	c := &coalescer{covered: make([]intervals, layers), byStart: make([]*btree.BTreeG[planned], layers),
		mergeSize: mergeSize, mergeGap: mergeGap}
	for i := range c.byStart {
		c.byStart[i] = btree.NewG(32, lessPlanned)
	}
	return c
}

func (c *coalescer) add(r Range) {
	cov := &c.covered[r.Layer]
	if cov.contains(r.Start, r.End) {
		return
	}
	cov.add(r.Start, r.End)
	tree := c.byStart[r.Layer]
	best, found := planned{}, false
	seen := 0
	tree.DescendLessOrEqual(planned{start: r.End + c.mergeGap, idx: len(c.ranges)}, func(v planned) bool {
		if seen++; seen > mergeLookback || v.end+c.mergeGap < r.Start {
			return false
		}
		if v.start <= r.Start && r.End <= v.end { // already in a range's span: nothing grows
			best, found = v, true
			return false
		}
		limit := c.mergeSize
		if v.idx != len(c.ranges)-1 {
			limit = min(limit, mergeEarlierSize)
		}
		if max(v.end, r.End)-min(v.start, r.Start) <= limit && (!found || v.idx < best.idx) {
			best, found = v, true
		}
		return true
	})
	if !found {
		tree.ReplaceOrInsert(planned{start: r.Start, end: r.End, idx: len(c.ranges)})
		c.ranges = append(c.ranges, r)
		return
	}
	tree.Delete(best)
	m := &c.ranges[best.idx]
	m.Start, m.End = min(m.Start, r.Start), max(m.End, r.End)
	tree.ReplaceOrInsert(planned{start: m.Start, end: m.End, idx: best.idx})
}

// intervals is a set of disjoint half-open intervals, kept in a B-tree by
// start so that a trace of a million frames plans in O(n log n): a sorted
// slice with inserts in the middle made that quadratic.
type intervals struct{ t *btree.BTreeG[span] }

type span struct{ start, end int64 }

func (s *intervals) init() {
	if s.t == nil {
		s.t = btree.NewG(32, func(a, b span) bool { return a.start < b.start })
	}
}

// bytes is the total length of the intervals.
func (s *intervals) bytes() int64 {
	var n int64
	if s.t != nil {
		s.t.Ascend(func(v span) bool {
			n += v.end - v.start
			return true
		})
	}
	return n
}

func (s *intervals) contains(start, end int64) bool {
	s.init()
	in := false
	s.t.DescendLessOrEqual(span{start: start}, func(v span) bool {
		in = v.end >= end
		return false
	})
	return in
}

func (s *intervals) add(start, end int64) {
	s.init()
	// The interval starting at or before start may reach it; so may those
	// starting up to end.
	var merged []span
	s.t.DescendLessOrEqual(span{start: start}, func(v span) bool {
		if v.end >= start {
			merged = append(merged, v)
		}
		return false
	})
	s.t.AscendGreaterOrEqual(span{start: start}, func(v span) bool {
		if v.start > end {
			return false
		}
		merged = append(merged, v)
		return true
	})
	for _, v := range merged {
		start, end = min(start, v.start), max(end, v.end)
		s.t.Delete(v)
	}
	s.t.ReplaceOrInsert(span{start, end})
}
