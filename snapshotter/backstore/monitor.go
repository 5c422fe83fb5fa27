package backstore

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
)

// DefaultStatsInterval is how often the stats file is rewritten.
const DefaultStatsInterval = 2 * time.Second

// Stats is the content of a mount's stats file.
type Stats struct {
	Ref         string          `json:"ref"`
	Mountpoint  string          `json:"mountpoint"`
	Uptime      float64         `json:"uptime_seconds"`
	BytesServed int64           `json:"bytes_served"` // read from the merged disk
	Cache       blobcache.Stats `json:"cache"`
	Layers      []LayerStats    `json:"layers"`
	Replay      *ReplayStats    `json:"replay,omitempty"` // the running or last replay
	// ReplayTotals sum every replay of this server, the running one
	// included; Replay shows only the latest.
	ReplayTotals *ReplayTotals `json:"replay_totals,omitempty"`
}

// LayerStats describe one layer's blob in the cache.
type LayerStats struct {
	Digest       digest.Digest `json:"digest"`
	Size         int64         `json:"size"`
	Local        bool          `json:"local,omitempty"`
	CachedBytes  int64         `json:"cached_bytes"`
	BytesFetched int64         `json:"bytes_fetched"`
}

// ReplayStats describe one replay of a trace, at mount or asked for on the
// control channel.
type ReplayStats struct {
	Source        string             `json:"source"` // trace file or "trace layer"
	Plan          replayer.PlanStats `json:"plan"`
	RangesDone    int64              `json:"ranges_done"`
	RangesFailed  int64              `json:"ranges_failed"`
	BytesDone     int64              `json:"bytes_prefetched"`
	FullBytesDone int64              `json:"full_fetch_bytes"`
	TraceSeconds  float64            `json:"trace_done_seconds,omitempty"`
	FullSeconds   float64            `json:"full_fetch_done_seconds,omitempty"`
	Error         string             `json:"error,omitempty"`
}

// ReplayTotals sum the replays a server ran. A replay asked for on the
// control channel replaces the one Stats.Replay shows, so counters read
// from it would go back; these never do.
type ReplayTotals struct {
	Replays       int64 `json:"replays"` // started
	Errors        int64 `json:"errors"`  // ended with ReplayStats.Error set
	RangesDone    int64 `json:"ranges_done"`
	RangesFailed  int64 `json:"ranges_failed"`
	BytesDone     int64 `json:"bytes_prefetched"`
	FullBytesDone int64 `json:"full_fetch_bytes"`
	SkippedFrames int64 `json:"skipped_frames"`
}

// add adds r's progress (not its count or error) to t.
func (t *ReplayTotals) add(r ReplayStats) {
	t.RangesDone += r.RangesDone
	t.RangesFailed += r.RangesFailed
	t.BytesDone += r.BytesDone
	t.FullBytesDone += r.FullBytesDone
	t.SkippedFrames += int64(r.Plan.Unmatched + r.Plan.OutOfRange + r.Plan.Truncated)
}

// monitor gathers a mount's stats for the stats file and Prometheus.
type monitor struct {
	ref, mountpoint string
	img             *Image
	cache           *blobcache.Cache
	started         time.Time
	metricsAddr     string

	mu       sync.Mutex
	replay   *ReplayStats    // the running or last replay
	runStats *replayer.Stats // replay's progress
	running  bool            // replay is not in ended yet
	ended    ReplayTotals    // of the replays that ended, and the count started

	descs map[string]*prometheus.Desc
}

func newMonitor(ref, mountpoint string, img *Image, cache *blobcache.Cache) *monitor {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("obd_"+name, help, nil, prometheus.Labels{"ref": ref})
	}
	return &monitor{ref: ref, mountpoint: mountpoint, img: img, cache: cache, started: time.Now(),
		descs: map[string]*prometheus.Desc{
			"served":        d("device_served_bytes_total", "Bytes read from the merged disk."),
			"prefetched":    d("replay_prefetched_bytes_total", "Blob bytes of completed replay ranges."),
			"full":          d("replay_full_fetch_bytes_total", "Blob bytes fetched by the full-fetch phase."),
			"ranges_done":   d("replay_ranges_done_total", "Replay ranges completed."),
			"ranges_failed": d("replay_ranges_failed_total", "Replay ranges that failed."),
			"skipped":       d("replay_skipped_frames_total", "Trace frames not replayed: layer missing, out of range or over the limit."),
			"trace_seconds": d("replay_trace_done_seconds", "Time from the start of the latest replay to the end of its trace phase (0 while it runs)."),
			"replay_errors": d("replay_errors_total", "Traces that could not be replayed."),
		}}
}

// startReplay makes rs, whose progress is run, the replay the stats show.
func (m *monitor) startReplay(rs *ReplayStats, run *replayer.Stats) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Replays run one at a time; should one still run, its progress so
	// far stays counted rather than vanish.
	m.endLocked(m.replay)
	m.replay, m.runStats, m.running = rs, run, true
	m.ended.Replays++
}

// endReplay adds the ended replay rs to the totals, with errMsg, if not
// empty, as its error.
func (m *monitor) endReplay(rs *ReplayStats, errMsg string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if errMsg != "" {
		rs.Error = errMsg
		m.ended.Errors++
	}
	m.endLocked(rs)
}

func (m *monitor) endLocked(rs *ReplayStats) {
	if m.running && m.replay == rs {
		m.ended.add(m.currentLocked())
		m.running = false
	}
}

// currentLocked is the running or last replay with its progress.
func (m *monitor) currentLocked() ReplayStats {
	rs := *m.replay
	if r := m.runStats; r != nil {
		rs.RangesDone, rs.RangesFailed = r.RangesDone.Load(), r.RangesFailed.Load()
		rs.BytesDone, rs.FullBytesDone = r.Bytes.Load(), r.FullBytes.Load()
		rs.TraceSeconds = time.Duration(r.TraceDone.Load()).Seconds()
		rs.FullSeconds = time.Duration(r.FullDone.Load()).Seconds()
	}
	return rs
}

func (m *monitor) snapshot() Stats {
	s := Stats{Ref: m.ref, Mountpoint: m.mountpoint, Uptime: time.Since(m.started).Seconds(),
		BytesServed: m.img.BytesServed.Load(), Cache: m.cache.Stats()}
	for _, l := range m.img.Layers {
		ls := LayerStats{Digest: l.Digest, Size: l.Size, Local: l.Cache == nil}
		if l.Cache != nil {
			bs := l.Cache.Stats()
			ls.CachedBytes, ls.BytesFetched = bs.CachedBytes, bs.BytesFetched
		}
		s.Layers = append(s.Layers, ls)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.replay != nil {
		rs := m.currentLocked()
		totals := m.ended
		if m.running {
			totals.add(rs)
		}
		s.Replay, s.ReplayTotals = &rs, &totals
	}
	return s
}

// run rewrites the stats file every interval until ctx ends, then once more.
func (m *monitor) run(ctx context.Context, path string, interval time.Duration, log zerolog.Logger) {
	if interval <= 0 {
		interval = DefaultStatsInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			m.write(path, log)
			return
		case <-t.C:
			m.write(path, log)
		}
	}
}

// write replaces the stats file with a fresh snapshot.
func (m *monitor) write(path string, log zerolog.Logger) {
	b, err := json.MarshalIndent(m.snapshot(), "", "  ")
	if err == nil {
		err = atomicfile.Write(path, b, 0o644)
	}
	if err != nil {
		log.Warn().Err(err).Str("path", path).Msg("stats file")
	}
}

// Describe implements prometheus.Collector.
func (m *monitor) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range m.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *monitor) Collect(ch chan<- prometheus.Metric) {
	s := m.snapshot()
	c := func(name string, v float64) {
		ch <- prometheus.MustNewConstMetric(m.descs[name], prometheus.CounterValue, v)
	}
	c("served", float64(s.BytesServed))
	var t ReplayTotals
	if s.ReplayTotals != nil {
		t = *s.ReplayTotals
	}
	c("prefetched", float64(t.BytesDone))
	c("full", float64(t.FullBytesDone))
	c("ranges_done", float64(t.RangesDone))
	c("ranges_failed", float64(t.RangesFailed))
	c("skipped", float64(t.SkippedFrames))
	c("replay_errors", float64(t.Errors))
	traceSeconds := 0.0
	if s.Replay != nil {
		traceSeconds = s.Replay.TraceSeconds
	}
	ch <- prometheus.MustNewConstMetric(m.descs["trace_seconds"], prometheus.GaugeValue, traceSeconds)
}
