package coldstart

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// Summary is a variant's medians over its samples.
type Summary struct {
	Variant   Variant
	N         int
	Start     time.Duration // median
	Min, Max  time.Duration
	LinkBytes int64
	Requests  int64
	DemandP99 time.Duration // median over the samples' p99s
	Demand    int64         // demand fetches, median
	// Ahead is what prefetch and the cache's readahead fetched, and
	// AheadUnused what of it no read took (medians).
	Ahead, AheadUnused int64
}

// Summarize takes the median of each variant's samples.
func (r *Result) Summarize() [numVariants]Summary {
	var out [numVariants]Summary
	for _, v := range Variants {
		var starts, p99s []time.Duration
		var bytes, reqs, demand, ahead, unused []int64
		for _, s := range r.Samples {
			if s.Variant != v {
				continue
			}
			starts = append(starts, s.Start)
			p99s = append(p99s, s.Cache.DemandP99)
			bytes = append(bytes, s.LinkBytes)
			reqs = append(reqs, s.Requests)
			demand = append(demand, s.Cache.DemandFetches)
			ahead = append(ahead, s.Cache.PrefetchedByte+s.Cache.ReadaheadBytes)
			unused = append(unused, s.Cache.PrefetchUnused+s.Cache.ReadaheadUnused)
		}
		sum := Summary{Variant: v, N: len(starts)}
		if len(starts) > 0 {
			sum.Start, sum.DemandP99 = median(starts), median(p99s)
			sum.Min, sum.Max = slices.Min(starts), slices.Max(starts)
			sum.LinkBytes, sum.Requests, sum.Demand = median(bytes), median(reqs), median(demand)
			sum.Ahead, sum.AheadUnused = median(ahead), median(unused)
		}
		out[v] = sum
	}
	return out
}

// median of xs (the lower middle one for an even count, so it is a
// measured value).
func median[T int64 | time.Duration](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[(len(s)-1)/2]
}

// LinkBound is the fastest a cold start can be on the link: the bytes the
// trace says the workload needs at the link's rate, plus one round trip.
func (r *Result) LinkBound() time.Duration {
	if r.Link.BytesPerSecond <= 0 {
		return r.Link.RTT
	}
	return time.Duration(float64(r.TraceBytes)/float64(r.Link.BytesPerSecond)*float64(time.Second)) + r.Link.RTT
}

// Checks are issue #7's targets, evaluated on the medians.
type Checks struct {
	Speedup     float64 // no prefetch / replay; target ≥ 4 (aim 5)
	Bound       time.Duration
	BoundRatio  float64 // replay / max(warm, link bound); target ≤ 1.3
	DemandRatio float64 // replay's demand p99 / no prefetch's; target ≤ 1.5 (0: no demand fetch under replay)
}

// Check computes the checks.
func (r *Result) Check() Checks {
	s := r.Summarize()
	c := Checks{Bound: max(s[Warm].Start, r.LinkBound())}
	if s[Replay].Start > 0 {
		c.Speedup = float64(s[NoPrefetch].Start) / float64(s[Replay].Start)
	}
	if c.Bound > 0 {
		c.BoundRatio = float64(s[Replay].Start) / float64(c.Bound)
	}
	if s[NoPrefetch].DemandP99 > 0 {
		c.DemandRatio = float64(s[Replay].DemandP99) / float64(s[NoPrefetch].DemandP99)
	}
	return c
}

// Pass reports whether every target holds.
func (c Checks) Pass() bool {
	return c.Speedup >= 4 && c.BoundRatio <= 1.3 && c.DemandRatio <= 1.5
}

// WriteMarkdown writes the table of medians and the checks.
func (r *Result) WriteMarkdown(w io.Writer, title string) error {
	s := r.Summarize()
	var b strings.Builder
	fmt.Fprintf(&b, "| %s | start (median) | range | vs no prefetch | over the link | fetched ahead (unused) | requests | demand fetches | demand p99 |\n", title)
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, v := range Variants {
		x := s[v]
		speed := "1.00×"
		if v != NoPrefetch && x.Start > 0 {
			speed = fmt.Sprintf("%.2f×", float64(s[NoPrefetch].Start)/float64(x.Start))
		}
		fmt.Fprintf(&b, "| %s | %s | %s–%s | %s | %s | %s (%s) | %d | %d | %s |\n", v, secs(x.Start), secs(x.Min), secs(x.Max),
			speed, mb(x.LinkBytes), mb(x.Ahead), mb(x.AheadUnused), x.Requests, x.Demand, ms(x.DemandP99))
	}
	c := r.Check()
	fmt.Fprintf(&b, "\nTrace: %d frames, %s of blob; plan: %d ranges, %s with the gaps merged over. Link bound %s (%s at %s + one RTT).\n",
		r.TraceFrames, mb(r.TraceBytes), r.TraceRanges, mb(r.PlanBytes), secs(r.LinkBound()), mb(r.TraceBytes), rateString(r.Link.BytesPerSecond))
	fmt.Fprintf(&b, "Checks: replay %.2f× faster than no prefetch (target ≥ 4×); %.2f× max(warm, link bound) = %s (target ≤ 1.3×); "+
		"demand-miss p99 under replay %.2f× its value without (target ≤ 1.5×).\n",
		c.Speedup, c.BoundRatio, secs(c.Bound), c.DemandRatio)
	_, err := io.WriteString(w, b.String())
	return err
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
func ms(d time.Duration) string   { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }
func mb(n int64) string           { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }

func rateString(bps int64) string {
	if bps <= 0 {
		return "no cap"
	}
	return fmt.Sprintf("%g Mbit/s", float64(bps)*8/1e6)
}
