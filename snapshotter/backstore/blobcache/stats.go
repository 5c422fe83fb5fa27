package blobcache

import (
	"math"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type counters struct {
	hits, misses, coalesced    atomic.Int64
	fetches, fetched, served   atomic.Int64
	fetchErrors, ioErrors      atomic.Int64
	corrupt, digestMismatches  atomic.Int64
	evicted, discarded         atomic.Int64
	demandFetches, demandNS    atomic.Int64
	prefetched, prefetchUnused atomic.Int64
	prefetchHits, prefetchLate atomic.Int64
	readahead, readaheadUnused atomic.Int64
	readaheadHits              atomic.Int64
	planned                    atomic.Int64
	demandPlanned, demandOther atomic.Int64
	demandPlannedFetches       atomic.Int64
	uncached                   atomic.Int64
}

type blobCounters struct {
	hits, misses, fetched, served atomic.Int64
}

// Stats are cache-wide counters since Open. Block lookups count once per
// block a read touches.
type Stats struct {
	Hits         int64 // block lookups served from disk
	Misses       int64 // block lookups that needed a fetch
	Coalesced    int64 // fills that joined a fetch already in flight
	Fetches      int64 // range fetches completed (demand and prefetch)
	BytesFetched int64
	BytesServed  int64
	FetchErrors  int64
	IOErrors     int64 // failures of the cache's own files (storing, reading, syncing, evicting)
	// UncachedBytes were read straight from the source for readers because
	// the cache's files failed (a full or failing disk): ErrStorage.
	UncachedBytes    int64
	CorruptBlocks    int64 // blocks that failed their CRC and were dropped
	DigestMismatches int64 // complete blobs whose bytes hashed wrong
	EvictedBytes     int64
	DiscardedBlobs   int64 // damaged or incompatible cache files removed at Open
	UsedBytes        int64 // cached block data now
	MaxBytes         int64 // the configured bound (0 = none)
	// DemandFetches and DemandFetchTime are the count and total latency of
	// fetches a read waited for (it led them; coalesced waits not counted).
	DemandFetches   int64
	DemandFetchTime time.Duration
	// PrefetchedBytes were fetched by Prefetch. PrefetchHits counts blocks
	// a read found already there thanks to prefetch; PrefetchLate, blocks a
	// read had to wait for while their prefetch was in flight.
	// PrefetchUnusedBytes were prefetched and not read (yet): wasted, once
	// the workload is done.
	PrefetchedBytes     int64
	PrefetchHits        int64
	PrefetchLate        int64
	PrefetchUnusedBytes int64
	// ReadaheadBytes were fetched ahead of sequential readers;
	// ReadaheadHits counts blocks a read took from them (found there or
	// waited for); ReadaheadUnusedBytes were read ahead and not read (yet).
	ReadaheadBytes       int64
	ReadaheadHits        int64
	ReadaheadUnusedBytes int64
	// PlannedBytes are the blocks replay plans announced (Blob.Expect).
	// Of the bytes demand fetches brought, DemandPlannedBytes were
	// planned (the prefetch had not got them yet: it ran behind the
	// reader) and DemandUnplannedBytes were not (reads the plan does not
	// know, or no plan); DemandPlannedFetches counts the demand fetches
	// with any planned block.
	PlannedBytes         int64
	DemandPlannedBytes   int64
	DemandUnplannedBytes int64
	DemandPlannedFetches int64
}

// Stats returns a snapshot of the cache's counters.
func (c *Cache) Stats() Stats {
	return Stats{
		Hits: c.stats.hits.Load(), Misses: c.stats.misses.Load(), Coalesced: c.stats.coalesced.Load(),
		Fetches: c.stats.fetches.Load(), BytesFetched: c.stats.fetched.Load(), BytesServed: c.stats.served.Load(),
		FetchErrors: c.stats.fetchErrors.Load(), IOErrors: c.stats.ioErrors.Load(), UncachedBytes: c.stats.uncached.Load(),
		CorruptBlocks: c.stats.corrupt.Load(), DigestMismatches: c.stats.digestMismatches.Load(),
		EvictedBytes: c.stats.evicted.Load(), DiscardedBlobs: c.stats.discarded.Load(),
		UsedBytes: c.used.Load(), MaxBytes: c.opts.MaxBytes,
		DemandFetches: c.stats.demandFetches.Load(), DemandFetchTime: time.Duration(c.stats.demandNS.Load()),
		PrefetchedBytes: c.stats.prefetched.Load(), PrefetchHits: c.stats.prefetchHits.Load(),
		PrefetchLate: c.stats.prefetchLate.Load(), PrefetchUnusedBytes: c.stats.prefetchUnused.Load(),
		ReadaheadBytes: c.stats.readahead.Load(), ReadaheadHits: c.stats.readaheadHits.Load(),
		ReadaheadUnusedBytes: c.stats.readaheadUnused.Load(),
		PlannedBytes:         c.stats.planned.Load(), DemandPlannedBytes: c.stats.demandPlanned.Load(),
		DemandUnplannedBytes: c.stats.demandOther.Load(), DemandPlannedFetches: c.stats.demandPlannedFetches.Load(),
	}
}

func (c *Cache) observeDemandFetch(d time.Duration) {
	c.stats.demandFetches.Add(1)
	c.stats.demandNS.Add(int64(d))
	c.metrics.latency.Observe(d.Seconds())
}

// BlobStats are one blob's counters since Open, shared by all its handles.
type BlobStats struct {
	Size, CachedBytes         int64
	Complete                  bool
	Hits, Misses              int64
	BytesFetched, BytesServed int64
}

// Stats returns a snapshot of the blob's counters.
func (b *Blob) Stats() BlobStats {
	s := b.s
	return BlobStats{
		Size: s.size, CachedBytes: s.cached.Load(), Complete: s.complete.Load(),
		Hits: s.stats.hits.Load(), Misses: s.stats.misses.Load(),
		BytesFetched: s.stats.fetched.Load(), BytesServed: s.stats.served.Load(),
	}
}

// metrics holds the Prometheus descriptors of a Cache.
type metrics struct {
	latency prometheus.Histogram
	descs   []metricDesc
}

type metricDesc struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(Stats) float64
}

func newMetrics() metrics {
	d := func(name, help string, typ prometheus.ValueType, v func(Stats) float64) metricDesc {
		return metricDesc{prometheus.NewDesc("obd_blobcache_"+name, help, nil, nil), typ, v}
	}
	c, g := prometheus.CounterValue, prometheus.GaugeValue
	return metrics{
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "obd_blobcache_demand_fetch_seconds",
			Help: "Latency of registry fetches that a read waited for.",
			// 0.5 ms to 33 s in steps of √2: a p99 read from factor-2
			// buckets put fetches of 253-266 ms anywhere up to 500 ms,
			// which is what a p99 of a few dozen fetches is made of.
			Buckets: prometheus.ExponentialBuckets(0.0005, math.Sqrt2, 33),
		}),
		descs: []metricDesc{
			d("hits_total", "Block lookups served from the cache.", c, func(s Stats) float64 { return float64(s.Hits) }),
			d("misses_total", "Block lookups that needed a fetch.", c, func(s Stats) float64 { return float64(s.Misses) }),
			d("coalesced_total", "Fills that joined a fetch in flight.", c, func(s Stats) float64 { return float64(s.Coalesced) }),
			d("fetches_total", "Range fetches completed.", c, func(s Stats) float64 { return float64(s.Fetches) }),
			d("fetched_bytes_total", "Bytes fetched from the source.", c, func(s Stats) float64 { return float64(s.BytesFetched) }),
			d("served_bytes_total", "Bytes returned to readers.", c, func(s Stats) float64 { return float64(s.BytesServed) }),
			d("fetch_errors_total", "Fills that failed.", c, func(s Stats) float64 { return float64(s.FetchErrors) }),
			d("io_errors_total", "Failures of the cache's own files (storing, reading, syncing, evicting).", c, func(s Stats) float64 { return float64(s.IOErrors) }),
			d("uncached_bytes_total", "Bytes read straight from the source because the cache's files failed.", c, func(s Stats) float64 { return float64(s.UncachedBytes) }),
			d("corrupt_blocks_total", "Cached blocks that failed their checksum.", c, func(s Stats) float64 { return float64(s.CorruptBlocks) }),
			d("digest_mismatches_total", "Fully cached blobs that failed their digest.", c, func(s Stats) float64 { return float64(s.DigestMismatches) }),
			d("evicted_bytes_total", "Bytes evicted to stay under the size bound.", c, func(s Stats) float64 { return float64(s.EvictedBytes) }),
			d("used_bytes", "Bytes of cached block data.", g, func(s Stats) float64 { return float64(s.UsedBytes) }),
			d("prefetched_bytes_total", "Bytes fetched by prefetch.", c, func(s Stats) float64 { return float64(s.PrefetchedBytes) }),
			d("prefetch_hits_total", "Blocks a read found cached thanks to prefetch.", c, func(s Stats) float64 { return float64(s.PrefetchHits) }),
			d("prefetch_late_total", "Blocks a read waited for while their prefetch was in flight.", c, func(s Stats) float64 { return float64(s.PrefetchLate) }),
			d("prefetch_unused_bytes", "Prefetched bytes no read has asked for (yet).", g, func(s Stats) float64 { return float64(s.PrefetchUnusedBytes) }),
			d("readahead_bytes_total", "Bytes fetched ahead of sequential readers.", c, func(s Stats) float64 { return float64(s.ReadaheadBytes) }),
			d("readahead_hits_total", "Blocks a read took from readahead.", c, func(s Stats) float64 { return float64(s.ReadaheadHits) }),
			d("readahead_unused_bytes", "Read-ahead bytes no read has asked for (yet).", g, func(s Stats) float64 { return float64(s.ReadaheadUnusedBytes) }),
			d("planned_bytes_total", "Bytes replay plans announced for prefetch.", c, func(s Stats) float64 { return float64(s.PlannedBytes) }),
			d("demand_planned_bytes_total", "Demand-fetched bytes a replay plan held (its prefetch ran behind the reader).", c, func(s Stats) float64 { return float64(s.DemandPlannedBytes) }),
			d("demand_unplanned_bytes_total", "Demand-fetched bytes no replay plan held.", c, func(s Stats) float64 { return float64(s.DemandUnplannedBytes) }),
			d("demand_planned_fetches_total", "Demand fetches with a block a replay plan held.", c, func(s Stats) float64 { return float64(s.DemandPlannedFetches) }),
			d("max_bytes", "Configured bound on cached data (0 = none).", g, func(s Stats) float64 { return float64(s.MaxBytes) }),
		},
	}
}

// Describe implements prometheus.Collector.
func (c *Cache) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics.descs {
		ch <- m.desc
	}
	c.metrics.latency.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Cache) Collect(ch chan<- prometheus.Metric) {
	st := c.Stats()
	for _, m := range c.metrics.descs {
		ch <- prometheus.MustNewConstMetric(m.desc, m.typ, m.value(st))
	}
	c.metrics.latency.Collect(ch)
}
