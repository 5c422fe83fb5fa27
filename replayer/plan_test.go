package replayer

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/trace"
)

// TestIntervalsMatchNaive checks the interval set against a byte map.
func TestIntervalsMatchNaive(t *testing.T) {
	const space = 4096
	rng := rand.New(rand.NewPCG(1, 2))
	var s intervals
	covered := make([]bool, space)
	for range 5000 {
		a := rng.Int64N(space - 1)
		b := a + 1 + rng.Int64N(min(64, space-a-1)+1)
		want := true
		for i := a; i < b; i++ {
			want = want && covered[i]
		}
		if got := s.contains(a, b); got != want {
			t.Fatalf("contains(%d, %d) = %v, want %v", a, b, got, want)
		}
		if rng.IntN(2) == 0 {
			s.add(a, b)
			for i := a; i < b; i++ {
				covered[i] = true
			}
		}
	}
	// The set stays disjoint and sorted, with no touching neighbours left unmerged.
	prev := int64(-1)
	s.t.Ascend(func(v span) bool {
		if v.start <= prev || v.end <= v.start {
			t.Fatalf("interval [%d, %d) after one ending at %d", v.start, v.end, prev)
		}
		prev = v.end
		return true
	})
}

// TestPlanHugeTrace: a trace beyond DefaultMaxFrames plans, truncated and
// counted, instead of failing or running for minutes.
func TestPlanHugeTrace(t *testing.T) {
	a := newTestBlob(t, 21, 1<<20)
	n := DefaultMaxFrames + 1000
	frames := make([]trace.Frame, n)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range frames {
		frames[i] = trace.Frame{Offset: rng.Int64N(1<<20-4096) &^ 511, Length: 4096}
	}
	p, err := NewPlan(&trace.Trace{Frames: frames}, []Layer{a.layer(&recorder{})}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Stats.Truncated != 1000 || p.Stats.Matched != DefaultMaxFrames {
		t.Fatalf("stats %+v: want %d matched and 1000 truncated", p.Stats, DefaultMaxFrames)
	}
	if p.Stats.Bytes <= 0 || p.Stats.Bytes > int64(len(a.bytes)) {
		t.Fatalf("plan covers %d bytes of a %d-byte blob", p.Stats.Bytes, len(a.bytes))
	}
}

// BenchmarkNewPlan plans a trace of 100,000 random 4 KiB reads.
func BenchmarkNewPlan(b *testing.B) {
	tb := newTestBlob(b, 22, 8<<20)
	rng := rand.New(rand.NewPCG(5, 6))
	frames := make([]trace.Frame, 100_000)
	for i := range frames {
		frames[i] = trace.Frame{Offset: rng.Int64N(8<<20-4096) &^ 4095, Length: 4096}
	}
	layers := []Layer{tb.layer(&recorder{})}
	b.ResetTimer()
	for range b.N {
		if _, err := NewPlan(&trace.Trace{Frames: frames}, layers, Options{}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(frames)), "ns/frame")
}

// coalesced is a coalescer over layers blobs that has been given in, in order.
func coalesced(layers int, mergeSize, mergeGap int64, in []Range) *coalescer {
	c := newCoalescer(layers, mergeSize, mergeGap)
	for _, r := range in {
		c.add(r)
	}
	return c
}

// TestCoalescerMergesIntoEarlierRanges: a range joins any earlier range
// of its blob within the gap, not only the last one, picks the earliest
// when several qualify, and respects the gap and the merge size.
func TestCoalescerMergesIntoEarlierRanges(t *testing.T) {
	const k = 1 << 10
	c := coalesced(2, 1<<20, 8*k, []Range{
		{0, 0, 4 * k},           // A
		{0, 20 * k, 24 * k},     // B: 16 KiB from A, on its own
		{1, 0, 4 * k},           // another blob
		{0, 10 * k, 14 * k},     // within 8 KiB of A and of B: into A, the earlier
		{0, 33 * k, 36 * k},     // 9 KiB past B: on its own
		{0, 100 * k, 1100 * k},  // D
		{0, 1104 * k, 1200 * k}, // D would outgrow the merge size
		{1, 4 * k, 8 * k},       // touches the other blob's range
		{0, 2 * k, 6 * k},       // inside A as merged: A unchanged
	})
	want := []Range{{0, 0, 14 * k}, {0, 20 * k, 24 * k}, {1, 0, 8 * k}, {0, 33 * k, 36 * k},
		{0, 100 * k, 1100 * k}, {0, 1104 * k, 1200 * k}}
	if !slices.Equal(c.ranges, want) {
		t.Fatalf("ranges\n%v, want\n%v", c.ranges, want)
	}
	// The frames' own bytes, without the gap A was merged over (6-10 KiB).
	if got, want := c.coveredBytes(), int64((10+4+3+1000+96+8)*k); got != want {
		t.Fatalf("covered %d bytes, want %d", got, want)
	}
}

// TestCoalescerNeverLate: on random traces, the bytes of every frame are
// covered by ranges that were in the plan when the frame came, so merging
// only ever brings bytes forward; and no merge passes the merge size.
func TestCoalescerNeverLate(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for round := range 20 {
		const space = 1 << 22
		mergeSize, gap := int64(64<<10+rng.IntN(1<<20)), int64(rng.IntN(64<<10))
		c := newCoalescer(2, mergeSize, gap)
		type arrival struct {
			r Range
			n int // ranges in the plan once it was added
		}
		var in []arrival
		for range 1000 {
			start := rng.Int64N(space)
			r := Range{Layer: rng.IntN(2), Start: start, End: start + 1 + rng.Int64N(32<<10)}
			c.add(r)
			in = append(in, arrival{r, len(c.ranges)})
		}
		for i, r := range c.ranges {
			if r.End-r.Start > max(mergeSize, 32<<10+1) {
				t.Fatalf("round %d: range %d is %d bytes, merge size %d", round, i, r.End-r.Start, mergeSize)
			}
		}
		for _, a := range in {
			var cov intervals
			for _, r := range c.ranges[:a.n] {
				if r.Layer == a.r.Layer {
					cov.add(r.Start, r.End)
				}
			}
			if !cov.contains(a.r.Start, a.r.End) {
				t.Fatalf("round %d: %+v is not covered by the first %d ranges", round, a.r, a.n)
			}
		}
	}
}

// TestCoalescerEarlierRangesStaySmall: a range that is not the last takes
// in later ones only up to mergeEarlierSize; the last grows to MergeSize.
func TestCoalescerEarlierRangesStaySmall(t *testing.T) {
	const k = 1 << 10
	c := coalesced(1, 1<<20, 8*k, []Range{
		{0, 0, 200 * k},
		{0, 1024 * k, 1028 * k},
		{0, 204 * k, 300 * k},   // the first would grow to 300 KiB
		{0, 1032 * k, 1124 * k}, // the last grows
	})
	want := []Range{{0, 0, 200 * k}, {0, 1024 * k, 1124 * k}, {0, 204 * k, 300 * k}}
	if !slices.Equal(c.ranges, want) {
		t.Fatalf("ranges\n%v, want\n%v", c.ranges, want)
	}
}

// TestCoalescerFrameInsideARange: a frame in the gap a range was merged
// over joins that range, which does not grow, even when an earlier range
// is within reach too.
func TestCoalescerFrameInsideARange(t *testing.T) {
	const k = 1 << 10
	c := coalesced(1, 1<<20, 8*k, []Range{
		{0, 0, 8 * k},       // A
		{0, 17 * k, 20 * k}, // B: 9 KiB from A, on its own
		{0, 26 * k, 40 * k}, // into B, over 20-26 KiB
		{0, 12 * k, 14 * k}, // within reach of both: into A, the earlier
		{0, 22 * k, 24 * k}, // in B's gap, and within 8 KiB of A: B, unchanged
	})
	want := []Range{{0, 0, 14 * k}, {0, 17 * k, 40 * k}}
	if !slices.Equal(c.ranges, want) {
		t.Fatalf("ranges\n%v, want\n%v", c.ranges, want)
	}
}

// TestStartupSpan: the span ends when nine tenths of the bytes have been
// read, not with a straggler; untimed frames give none.
func TestStartupSpan(t *testing.T) {
	var firsts []firstAccess
	for i := range 10 {
		firsts = append(firsts, firstAccess{int64(i+1) * int64(time.Second), 1000})
	}
	firsts = append(firsts, firstAccess{100 * int64(time.Second), 1000}) // read long after
	if got := startupSpan(firsts); got != 10*time.Second {
		t.Errorf("span %v, want 10s", got)
	}
	if got := startupSpan([]firstAccess{{0, 4096}, {0, 512}}); got != 0 {
		t.Errorf("untimed frames: span %v, want 0", got)
	}
	if got := startupSpan(nil); got != 0 {
		t.Errorf("no frames: span %v, want 0", got)
	}
}
