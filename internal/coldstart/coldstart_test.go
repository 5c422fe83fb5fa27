package coldstart

import (
	"bytes"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/wanproxy"
)

func TestQuantile(t *testing.T) {
	b := []Bucket{{0.1, 10}, {0.2, 60}, {0.4, 100}, {math.Inf(1), 100}}
	for _, c := range []struct{ q, want float64 }{
		{0.05, 0.05}, // inside the first bucket, from 0
		{0.5, 0.18},  // rank 50: 40 of the 50 in (0.1, 0.2]
		{0.99, 0.395},
		{1, 0.4},
	} {
		if got := Quantile(c.q, b); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := Quantile(0.99, []Bucket{{0.1, 1}, {math.Inf(1), 5}}); got != 0.1 {
		t.Errorf("quantile in the +Inf bucket = %v, want the highest bound", got)
	}
	if !math.IsNaN(Quantile(0.5, nil)) || !math.IsNaN(Quantile(0.5, []Bucket{{1, 0}})) {
		t.Error("quantile of an empty histogram is not NaN")
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP obd_blobcache_demand_fetch_seconds Latency.
# TYPE obd_blobcache_demand_fetch_seconds histogram
obd_blobcache_demand_fetch_seconds_bucket{le="0.064"} 0
obd_blobcache_demand_fetch_seconds_bucket{le="0.128"} 50
obd_blobcache_demand_fetch_seconds_bucket{le="0.256"} 100
obd_blobcache_demand_fetch_seconds_bucket{le="+Inf"} 100
obd_blobcache_demand_fetch_seconds_sum 12.5
obd_blobcache_demand_fetch_seconds_count 100
obd_blobcache_prefetch_hits_total 7
obd_blobcache_prefetch_late_total 3
obd_blobcache_prefetched_bytes_total 1.048576e+06
obd_blobcache_planned_bytes_total 2e+06
obd_blobcache_demand_planned_bytes_total 65536
obd_blobcache_demand_planned_fetches_total 2
obd_blobcache_demand_unplanned_bytes_total 16384
garbage line
`
	f, err := ParseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	want := CacheFigures{DemandFetches: 100, DemandP50: 128 * time.Millisecond, DemandP99: 253440 * time.Microsecond,
		PrefetchHits: 7, PrefetchLate: 3, PrefetchedByte: 1 << 20,
		Planned: 2e6, DemandPlanned: 64 << 10, DemandPlannedFetches: 2, DemandUnplanned: 16 << 10}
	if f != want {
		t.Fatalf("got %+v\nwant %+v", f, want)
	}
	if _, err := ParseMetrics(strings.NewReader(`obd_blobcache_demand_fetch_seconds_bucket{le="x"} 1`)); err == nil {
		t.Error("a bad bucket bound parsed")
	}
}

func sampleResult() *Result {
	r := &Result{Link: wanproxy.Options{BytesPerSecond: 25_000_000 / 8, RTT: 40 * time.Millisecond}, TraceBytes: 25_000_000}
	starts := map[Variant][]time.Duration{
		NoPrefetch:   {30 * time.Second, 28 * time.Second, 40 * time.Second},
		Replay:       {9 * time.Second, 10 * time.Second, 8500 * time.Millisecond},
		FullPrefetch: {45 * time.Second, 44 * time.Second, 46 * time.Second},
		Warm:         {time.Second, 1200 * time.Millisecond, 900 * time.Millisecond},
	}
	for round := range 3 {
		for _, v := range Variants {
			r.Samples = append(r.Samples, Sample{Variant: v, Round: round, Start: starts[v][round], LinkBytes: int64(v+1) * 1e6,
				Cache: CacheFigures{DemandP99: time.Duration(100+int(v)*10) * time.Millisecond}})
		}
	}
	return r
}

func TestSummaryAndChecks(t *testing.T) {
	r := sampleResult()
	s := r.Summarize()
	if s[NoPrefetch].Start != 30*time.Second || s[Replay].Start != 9*time.Second || s[Warm].Min != 900*time.Millisecond || s[NoPrefetch].N != 3 {
		t.Fatalf("summary %+v", s)
	}
	if got := r.LinkBound(); got != 8040*time.Millisecond {
		t.Fatalf("link bound %v, want 8.04 s (25 MB at 3.125 MB/s + 40 ms)", got)
	}
	c := r.Check()
	if math.Abs(c.Speedup-30.0/9) > 1e-9 || math.Abs(c.BoundRatio-9/8.04) > 1e-9 || math.Abs(c.DemandRatio-1.1) > 1e-9 {
		t.Fatalf("checks %+v", c)
	}
	if c.Pass() {
		t.Fatal("a 3.3× speedup passed the ≥ 4× check")
	}
	var md bytes.Buffer
	if err := r.WriteMarkdown(&md, "img"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| trace replay | 9.00 s | 8.50 s–10.00 s | 3.33× |", "Link bound 8.04 s", "3.33× faster"} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("markdown lacks %q:\n%s", want, md.String())
		}
	}
}

func TestWriteChart(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteChart(&buf, "test", sampleResult().Summarize()); err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(&buf)
	if err != nil {
		t.Fatal(err)
	}
	// The no-prefetch bar (red) reaches further right than the replay bar (green).
	row := func(i int) int { return chartTop + i*(barHeight+barGap) + 3 }
	last := func(y int) int {
		x := chartLeft + 1
		for ; x < chartWidth; x++ {
			if r, g, b, _ := img.At(x, y).RGBA(); r == 0xffff && g == 0xffff && b == 0xffff {
				break
			}
		}
		return x
	}
	if nop, rep := last(row(0)), last(row(1)); nop <= rep || rep <= chartLeft+2 {
		t.Fatalf("bars end at x=%d (no prefetch) and x=%d (replay)", nop, rep)
	}
	if got := tickStep(45); got != 10 {
		t.Errorf("tickStep(45) = %v", got)
	}
}

func TestKeptTrace(t *testing.T) {
	dir := t.TempDir()
	full, empty, unfinished := filepath.Join(dir, "full.pb"), filepath.Join(dir, "empty.pb"), filepath.Join(dir, "unfinished.pb")
	for path, data := range map[string][]byte{full: {1}, full + ".ok": nil, empty: nil, empty + ".ok": nil, unfinished: {1}} {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		path string
		want bool
	}{{"", false}, {filepath.Join(dir, "none.pb"), false}, {empty, false}, {unfinished, false}, {full, true}} {
		if got, err := keptTrace(c.path); err != nil || got != c.want {
			t.Errorf("keptTrace(%q) = %v, %v; want %v", c.path, got, err, c.want)
		}
	}
}
