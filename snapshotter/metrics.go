package snapshotter

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// Operation names, the "op" label of the operation metrics.
const (
	opStat    = "stat"
	opUpdate  = "update"
	opUsage   = "usage"
	opMounts  = "mounts"
	opPrepare = "prepare"
	opView    = "view"
	opCommit  = "commit"
	opRemove  = "remove"
	opWalk    = "walk"
	opCleanup = "cleanup"
)

// Reasons a trace label request is not acted on: the "reason" label of
// obd_snapshotter_trace_label_problems_total.
const (
	reasonBadPath      = "bad_path"      // no path, relative, missing, not a regular file
	reasonBadTrace     = "bad_trace"     // a file to replay that holds no trace or path list
	reasonNotOverlaybd = "not_overlaybd" // the image has no overlaybd layers
	reasonServer       = "server"        // the image's server refused or could not be asked
	reasonBusy         = "busy"          // the image's server is running another replay
)

// maxStatsFile bounds an image server's stats file read at scrape time.
const maxStatsFile = 4 << 20

type metrics struct {
	ops            *prometheus.CounterVec
	opErrors       *prometheus.CounterVec
	opSeconds      *prometheus.HistogramVec
	serverStart    prometheus.Histogram
	serverFailures prometheus.Counter
	adopted        prometheus.Counter
	// traceLabelProblems counts record/replay label requests not acted
	// on, by reason (the reason* constants).
	traceLabelProblems *prometheus.CounterVec
}

func newMetrics() *metrics {
	return &metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "obd_snapshotter_operations_total", Help: "Snapshotter API calls.",
		}, []string{"op"}),
		opErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "obd_snapshotter_operation_errors_total",
			Help: "Snapshotter API calls that returned an error, by class (already_exists is the normal answer for a remote layer).",
		}, []string{"op", "class"}),
		opSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "obd_snapshotter_operation_seconds", Help: "Snapshotter API call latency.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"op"}),
		serverStart: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "obd_snapshotter_image_server_start_seconds", Help: "Time to start an image server and mount its filesystem.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
		serverFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "obd_snapshotter_image_server_failures_total", Help: "Image servers that failed to start.",
		}),
		adopted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "obd_snapshotter_image_servers_adopted_total", Help: "Running image servers re-adopted at start-up.",
		}),
		traceLabelProblems: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "obd_snapshotter_trace_label_problems_total",
			Help: "Record/replay trace label requests not acted on, by reason (bad_path, bad_trace, not_overlaybd, server, busy); the log says why.",
		}, []string{"reason"}),
	}
}

// track counts one call of op; the returned function, deferred with the
// call's error, records its outcome and latency.
func (m *metrics) track(op string) func(*error) {
	start := time.Now()
	return func(err *error) {
		m.ops.WithLabelValues(op).Inc()
		m.opSeconds.WithLabelValues(op).Observe(time.Since(start).Seconds())
		if *err != nil {
			m.opErrors.WithLabelValues(op, errorClass(*err)).Inc()
		}
	}
}

func errorClass(err error) string {
	switch {
	case errdefs.IsAlreadyExists(err):
		return "already_exists"
	case errdefs.IsNotFound(err):
		return "not_found"
	case errdefs.IsFailedPrecondition(err):
		return "failed_precondition"
	case errdefs.IsInvalidArgument(err):
		return "invalid_argument"
	default:
		return "other"
	}
}

// Collectors returns the snapshotter's Prometheus collectors: its API
// calls, its image servers' life cycle, and each image's fetch and replay
// figures as the image's server last wrote them.
func (s *Snapshotter) Collectors() []prometheus.Collector {
	m := s.metrics
	return []prometheus.Collector{m.ops, m.opErrors, m.opSeconds, m.serverStart, m.serverFailures,
		m.adopted, m.traceLabelProblems, &imageCollector{s: s}}
}

var (
	imageLabels      = []string{"image", "ref"}
	descServerUp     = prometheus.NewDesc("obd_snapshotter_image_server_up", "1 when the image's server process runs.", imageLabels, nil)
	descBytesServed  = prometheus.NewDesc("obd_snapshotter_image_served_bytes_total", "Bytes read from the image's device.", imageLabels, nil)
	descBytesFetched = prometheus.NewDesc("obd_snapshotter_image_fetched_bytes_total", "Bytes the image's server fetched from the registry.", imageLabels, nil)
	descCacheUsed    = prometheus.NewDesc("obd_snapshotter_image_cache_used_bytes", "Block data in the image's cache.", imageLabels, nil)
	descPrefetched   = prometheus.NewDesc("obd_snapshotter_image_prefetched_bytes_total", "Bytes fetched ahead of demand by replay.", imageLabels, nil)
	descReplayed     = prometheus.NewDesc("obd_snapshotter_image_replayed_bytes_total", "Blob bytes of the replay ranges completed (fetched ahead, or found cached).", imageLabels, nil)
	descPrefetchHits = prometheus.NewDesc("obd_snapshotter_image_prefetch_hits_total", "Blocks a read found already fetched by replay.", imageLabels, nil)
	descReplayErrors = prometheus.NewDesc("obd_snapshotter_image_replay_errors", "1 when the image's latest replay failed.", imageLabels, nil)
)

// imageCollector reports each image server at scrape time from its state
// record and stats file, so it needs no connection to the servers.
type imageCollector struct{ s *Snapshotter }

func (c *imageCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descServerUp, descBytesServed, descBytesFetched, descCacheUsed,
		descPrefetched, descReplayed, descPrefetchHits, descReplayErrors} {
		ch <- d
	}
}

func (c *imageCollector) Collect(ch chan<- prometheus.Metric) {
	entries, err := os.ReadDir(filepath.Join(c.s.root, "snapshots"))
	if err != nil {
		return
	}
	for _, e := range entries {
		if _, err := strconv.ParseUint(e.Name(), 10, 64); err != nil {
			continue
		}
		st, _, err := backstore.ReadState(c.s.cfg.StateRoot, c.s.imageMountpoint(e.Name()))
		if err != nil {
			continue
		}
		labels := []string{e.Name(), st.Ref}
		up := 0.0
		if serverAlive(st) {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descServerUp, prometheus.GaugeValue, up, labels...)
		stats, ok := readStats(st.StatsFile)
		if !ok {
			continue
		}
		counter := func(d *prometheus.Desc, v int64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
		}
		counter(descBytesServed, stats.BytesServed)
		counter(descBytesFetched, stats.Cache.BytesFetched)
		counter(descPrefetched, stats.Cache.PrefetchedBytes)
		counter(descPrefetchHits, stats.Cache.PrefetchHits)
		ch <- prometheus.MustNewConstMetric(descCacheUsed, prometheus.GaugeValue, float64(stats.Cache.UsedBytes), labels...)
		replayErr := 0.0
		if stats.Replay != nil {
			counter(descReplayed, replayedBytes(stats))
			if stats.Replay.Error != "" {
				replayErr = 1
			}
		}
		ch <- prometheus.MustNewConstMetric(descReplayErrors, prometheus.GaugeValue, replayErr, labels...)
	}
}

// replayedBytes is the replay bytes a server completed over all its
// replays: the latest replay's own figure restarts at 0 with each one, so
// as a counter it would go back. A server from before the totals wrote
// only that figure.
func replayedBytes(stats backstore.Stats) int64 {
	switch {
	case stats.ReplayTotals != nil:
		return stats.ReplayTotals.BytesDone
	case stats.Replay != nil:
		return stats.Replay.BytesDone
	}
	return 0
}

// readStats reads an image server's stats file; a missing or half-written
// one is skipped for this scrape.
func readStats(path string) (backstore.Stats, bool) {
	b, err := iox.ReadFileLimit(path, maxStatsFile)
	if err != nil {
		return backstore.Stats{}, false
	}
	var st backstore.Stats
	if err := json.Unmarshal(b, &st); err != nil {
		return backstore.Stats{}, false
	}
	return st, true
}
