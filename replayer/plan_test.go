package replayer

import (
	"math/rand/v2"
	"testing"

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
