package replayer

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Defaults, as upstream's prefetcher where it has one.
const (
	DefaultWorkers   = 16
	DefaultMergeSize = 1 << 20
	// DefaultMergeGap: ranges of a blob this close are fetched as one. 64
	// KiB merged 0.5-1 MB of bytes no frame holds into each of the cold-
	// start benchmark's plans; 16 KiB keeps the requests as few (380-400 for
	// ~1000 ranges) with 2 MB less on the link.
	DefaultMergeGap       = 16 << 10
	DefaultFullFetchChunk = 4 << 20
	// DefaultStartupHold: a trace phase whose fetching is done is held,
	// waiting for the start-up to end, until at most this long after the
	// replay began (see Plan.Run).
	DefaultStartupHold = 30 * time.Second
	// DefaultFullFetchWorkers keeps the background phase light: it runs
	// after start-up, beside the application's own reads.
	DefaultFullFetchWorkers = 4
	// DefaultMaxFrames bounds the frames a plan takes: a start-up trace has
	// thousands (python3 importing numpy: 699), and a trace far beyond this
	// is truncated, with the rest counted, rather than planned for minutes.
	DefaultMaxFrames = 1 << 20
)

// Options tune planning and replay. Zero values take the defaults.
type Options struct {
	Workers   int   // concurrent prefetch ranges (upstream: 16)
	MergeSize int64 // largest range coalescing may build
	MergeGap  int64 // ranges of one blob this close are joined
	MaxFrames int   // frames beyond this are dropped and counted; 0 = DefaultMaxFrames
	// BytesPerSecond caps the trace phase's fetching; 0 = no cap.
	BytesPerSecond int64
	// FullFetch fetches the rest of every layer after the trace phase.
	FullFetch bool
	// FullFetchBytesPerSecond caps the full-fetch phase; 0 = no cap.
	FullFetchBytesPerSecond int64
	FullFetchWorkers        int
	FullFetchChunk          int64
	// StartupHold bounds how long after Run began the trace phase may be
	// held once its fetching is done (see Plan.Run); 0 =
	// DefaultStartupHold, < 0 = not at all.
	StartupHold time.Duration
}

func (o Options) withDefaults() Options {
	if o.Workers <= 0 {
		o.Workers = DefaultWorkers
	}
	if o.MergeSize <= 0 {
		o.MergeSize = DefaultMergeSize
	}
	if o.MergeGap < 0 {
		o.MergeGap = 0
	} else if o.MergeGap == 0 {
		o.MergeGap = DefaultMergeGap
	}
	if o.MaxFrames <= 0 {
		o.MaxFrames = DefaultMaxFrames
	}
	if o.FullFetchWorkers <= 0 {
		o.FullFetchWorkers = DefaultFullFetchWorkers
	}
	if o.FullFetchChunk <= 0 {
		o.FullFetchChunk = DefaultFullFetchChunk
	}
	if o.StartupHold == 0 {
		o.StartupHold = DefaultStartupHold
	}
	return o
}

// Stats count a replay's progress. They are safe to read while it runs.
type Stats struct {
	RangesDone   atomic.Int64
	RangesFailed atomic.Int64
	Bytes        atomic.Int64 // blob bytes of completed trace ranges
	FullBytes    atomic.Int64 // blob bytes of completed full-fetch chunks
	// TraceDone is the time from the start of Run to the last trace range
	// completing, in ns; 0 while the trace phase runs.
	TraceDone atomic.Int64
	// FullDone likewise for the full-fetch phase.
	FullDone atomic.Int64
}

// Run fetches the plan's ranges in order with opts.Workers workers, then,
// when opts.FullFetch is set, every layer's whole blob in chunks. It returns
// when done or when ctx ends (the device went away); a failed range is
// counted and skipped, since a demand read will fetch it if it is needed.
//
// The trace phase (Expect to EndExpect, for caches that are Expecters)
// ends when its ranges are fetched, but not before the recorded start-up
// would have ended (PlanStats.StartupSpan after Run began, at most
// opts.StartupHold): a replay that runs ahead of its start-up would
// otherwise hand the rest of it to the cache's and the device's readahead,
// which fetch on demand what the trace did not ask for (the numpy
// start-up: 5 demand fetches with the phase ending as the start-up did, 30
// when it ended 2.5 s before).
func (p *Plan) Run(ctx context.Context, layers []Layer, opts Options, stats *Stats) error {
	opts = opts.withDefaults()
	begin := time.Now()
	run := func(work []Range, workers int, bps int64, bytes *atomic.Int64) {
		limiter := newLimiter(bps, opts.MergeSize)
		queue := make(chan Range)
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := range queue {
					if err := fetch(ctx, limiter, layers[r.Layer].Blob, r, opts.MergeSize); err != nil {
						if ctx.Err() == nil {
							stats.RangesFailed.Add(1)
						}
						continue
					}
					stats.RangesDone.Add(1)
					bytes.Add(r.End - r.Start)
				}
			}()
		}
	feed:
		for _, r := range work {
			select {
			case queue <- r:
			case <-ctx.Done():
				break feed
			}
		}
		close(queue)
		wg.Wait()
	}
	p.traceOnly(layers, func() {
		run(p.Ranges, opts.Workers, opts.BytesPerSecond, &stats.Bytes)
		if ctx.Err() != nil {
			return
		}
		stats.TraceDone.Store(max(1, int64(time.Since(begin))))
		hold := time.NewTimer(time.Until(begin.Add(min(p.Stats.StartupSpan, max(opts.StartupHold, 0)))))
		defer hold.Stop()
		select {
		case <-hold.C:
		case <-ctx.Done():
		}
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !opts.FullFetch {
		return nil
	}
	run(fullFetchRanges(layers, opts.FullFetchChunk), opts.FullFetchWorkers, opts.FullFetchBytesPerSecond, &stats.FullBytes)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	stats.FullDone.Store(max(1, int64(time.Since(begin))))
	return nil
}

// traceOnly runs the trace phase f between telling each layer's cache the
// plan (Expect) and ending it (EndExpect), so the full fetch that may
// follow counts as no trace replay.
func (p *Plan) traceOnly(layers []Layer, f func()) {
	told := make([]bool, len(layers)) // by layer: an Expecter need not be comparable
	for _, r := range p.Ranges {
		if e, ok := layers[r.Layer].Blob.(Expecter); ok {
			e.Expect(r.Start, r.End-r.Start)
			told[r.Layer] = true
		}
	}
	defer func() {
		for i, ok := range told {
			if ok {
				layers[i].Blob.(Expecter).EndExpect()
			}
		}
	}()
	f()
}

// fullFetchRanges cuts every layer's blob into chunks, top layer first:
// upper layers hold what the image changed last, which is the likeliest to
// be read.
func fullFetchRanges(layers []Layer, chunk int64) []Range {
	var out []Range
	for i := len(layers) - 1; i >= 0; i-- {
		for off := int64(0); off < layers[i].BlobSize; off += chunk {
			out = append(out, Range{Layer: i, Start: off, End: min(off+chunk, layers[i].BlobSize)})
		}
	}
	return out
}

func newLimiter(bps, burst int64) *rate.Limiter {
	if bps <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(bps), int(max(burst, 64<<10)))
}

// fetch prefetches r, waiting for the limiter in pieces no larger than its
// burst so a cap holds for large ranges too.
func fetch(ctx context.Context, limiter *rate.Limiter, blob Prefetcher, r Range, piece int64) error {
	if limiter == nil {
		return blob.Prefetch(ctx, r.Start, r.End-r.Start)
	}
	piece = min(piece, int64(limiter.Burst()))
	var errs []error
	for off := r.Start; off < r.End; off += piece {
		n := min(piece, r.End-off)
		if err := limiter.WaitN(ctx, int(n)); err != nil {
			return err
		}
		if err := blob.Prefetch(ctx, off, n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
