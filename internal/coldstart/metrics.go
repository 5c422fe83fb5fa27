package coldstart

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// demandHistogram is the blob cache's histogram of demand-fetch latency.
const demandHistogram = "obd_blobcache_demand_fetch_seconds"

// maxMetricsBody bounds a scrape.
const maxMetricsBody = 8 << 20

// CacheFigures are the blob cache's counters at a workload's exit.
type CacheFigures struct {
	DemandFetches   int64         // fetches a read led and waited for
	DemandP50       time.Duration // their latency quantiles, from the histogram
	DemandP99       time.Duration
	PrefetchHits    int64 // blocks a read found cached thanks to prefetch
	PrefetchLate    int64 // blocks a read waited for while their prefetch was in flight
	PrefetchedByte  int64
	PrefetchUnused  int64 // prefetched bytes no read took
	ReadaheadBytes  int64 // fetched ahead of sequential readers by the cache
	ReadaheadUnused int64
	// DemandPlanned and DemandUnplanned split the demand-fetched bytes:
	// blocks the replay plan held (its prefetch ran behind the reader) and
	// blocks it did not; DemandPlannedFetches counts the demand fetches
	// with any planned block.
	DemandPlanned, DemandUnplanned int64
	DemandPlannedFetches           int64
	Planned                        int64 // bytes of the cache blocks the plan covers
}

// Bucket is one cumulative histogram bucket: Count observations ≤ LE.
type Bucket struct {
	LE    float64
	Count float64
}

// scrape reads the mount's Prometheus endpoint.
func (m *mounted) scrape(ctx context.Context) (CacheFigures, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+m.state.Metrics+"/metrics", nil)
	if err != nil {
		return CacheFigures{}, err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return CacheFigures{}, fmt.Errorf("coldstart: scrape metrics: %w", err)
	}
	defer res.Body.Close()
	return ParseMetrics(io.LimitReader(res.Body, maxMetricsBody))
}

// counters maps the cache's metric names to the figures they fill.
func (f *CacheFigures) counters() map[string]*int64 {
	const p = "obd_blobcache_"
	return map[string]*int64{
		demandHistogram + "_count":         &f.DemandFetches,
		p + "prefetch_hits_total":          &f.PrefetchHits,
		p + "prefetch_late_total":          &f.PrefetchLate,
		p + "prefetched_bytes_total":       &f.PrefetchedByte,
		p + "prefetch_unused_bytes":        &f.PrefetchUnused,
		p + "readahead_bytes_total":        &f.ReadaheadBytes,
		p + "readahead_unused_bytes":       &f.ReadaheadUnused,
		p + "planned_bytes_total":          &f.Planned,
		p + "demand_planned_bytes_total":   &f.DemandPlanned,
		p + "demand_unplanned_bytes_total": &f.DemandUnplanned,
		p + "demand_planned_fetches_total": &f.DemandPlannedFetches,
	}
}

// ParseMetrics reads the cache's figures out of a Prometheus text
// exposition. Unknown lines are ignored.
func ParseMetrics(r io.Reader) (CacheFigures, error) {
	var f CacheFigures
	var buckets []Bucket
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, value, ok := splitSample(line)
		if !ok {
			continue
		}
		switch name {
		case demandHistogram + "_bucket":
			le, err := strconv.ParseFloat(labelValue(labels, "le"), 64)
			if err != nil {
				return f, fmt.Errorf("coldstart: metrics: bucket %q: %w", line, err)
			}
			buckets = append(buckets, Bucket{LE: le, Count: value})
		default:
			if field, ok := f.counters()[name]; ok {
				*field = int64(value)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return f, fmt.Errorf("coldstart: metrics: %w", err)
	}
	f.DemandP50 = seconds(Quantile(0.5, buckets))
	f.DemandP99 = seconds(Quantile(0.99, buckets))
	return f, nil
}

func seconds(s float64) time.Duration {
	if math.IsNaN(s) || math.IsInf(s, 0) {
		return 0
	}
	return time.Duration(s * float64(time.Second))
}

// splitSample splits `name{labels} value` (labels optional).
func splitSample(line string) (name, labels string, value float64, ok bool) {
	i := strings.LastIndexByte(line, ' ')
	if i < 0 {
		return "", "", 0, false
	}
	v, err := strconv.ParseFloat(line[i+1:], 64)
	if err != nil {
		return "", "", 0, false
	}
	head := line[:i]
	if j := strings.IndexByte(head, '{'); j >= 0 && strings.HasSuffix(head, "}") {
		return head[:j], head[j+1 : len(head)-1], v, true
	}
	return head, "", v, true
}

func labelValue(labels, key string) string {
	for _, kv := range strings.Split(labels, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.TrimSpace(k) == key {
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

// Quantile estimates the q-quantile of a cumulative histogram as
// Prometheus's histogram_quantile does: linear interpolation inside the
// bucket that holds it (the lowest bucket from 0). It returns NaN for an
// empty histogram and the highest finite bound when the quantile falls in
// the +Inf bucket.
func Quantile(q float64, buckets []Bucket) float64 {
	b := append([]Bucket(nil), buckets...)
	sort.Slice(b, func(i, j int) bool { return b[i].LE < b[j].LE })
	if len(b) == 0 || b[len(b)-1].Count == 0 || q < 0 || q > 1 {
		return math.NaN()
	}
	rank := q * b[len(b)-1].Count
	lo, below := 0.0, 0.0
	for _, bk := range b {
		if bk.Count >= rank {
			if math.IsInf(bk.LE, 1) {
				return lo
			}
			if bk.Count == below {
				return bk.LE
			}
			return lo + (bk.LE-lo)*(rank-below)/(bk.Count-below)
		}
		lo, below = bk.LE, bk.Count
	}
	return lo
}
