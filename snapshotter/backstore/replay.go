package backstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// maxTraceFile bounds a trace read into memory.
const maxTraceFile = 256 << 20

// replayStopTimeout bounds teardown's wait for cancelled replays. All a
// replay does honours its context except a path list's system calls in the
// mount, which last as long as the device takes to read the metadata.
const replayStopTimeout = 5 * time.Second

var (
	// ErrStopping is returned for a replay asked for while the server stops.
	ErrStopping = errors.New("backstore: the server is stopping")
	// ErrReplayRunning is returned for a replay asked for while another,
	// the mount's or an earlier request's, still runs. Each replay runs a
	// plan's workers against the registry; queuing more behind it would
	// only add load for blocks the first has mostly fetched already.
	ErrReplayRunning = errors.New("a replay is running")
)

// replays runs a server's replays, one at a time, the mount's and those
// asked for on the control socket, so that teardown can end them all
// before the filesystem goes: a path list being resolved holds files open
// in the mount (its unmount would then be lazy, keeping the device and
// FUSE server busy), and a replay must not prefetch into a closed cache.
type replays struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// readAhead, when the device has one below it, is limited while a
	// replay's trace phase runs (see device.ReadAheadLimiter).
	readAhead device.ReadAheadLimiter

	mu      sync.Mutex
	stopped bool
	running string // the source of the running replay, if any
}

func newReplays(ctx context.Context) *replays {
	ctx, cancel := context.WithCancel(ctx)
	return &replays{ctx: ctx, cancel: cancel}
}

// start loads the trace to replay (cfg.TraceFile, else the image's trace
// layer) and runs it in the background. Any problem with the trace is
// logged and counted, never fatal: a bad trace must not fail a mount.
// While a replay runs, start refuses another with ErrReplayRunning.
func (r *replays) start(cfg Config, img *Image, mon *monitor, log zerolog.Logger) error {
	source := cfg.TraceFile
	if source == "" {
		if img.TraceLayer == nil {
			return nil
		}
		source = "trace layer " + img.TraceLayer.Digest.String()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return ErrStopping
	}
	if r.running != "" {
		return fmt.Errorf("%w (%s), try again when it ends", ErrReplayRunning, r.running)
	}
	r.running = source
	rs := &ReplayStats{Source: source}
	var run replayer.Stats
	mon.startReplay(rs, &run)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		var errMsg string
		if err := replay(r.ctx, cfg, img, r.readAhead, mon, rs, &run, log); err != nil && r.ctx.Err() == nil {
			log.Warn().Err(err).Str("trace", source).Msg("replay skipped")
			errMsg = err.Error()
		}
		// Counted before the next replay may start.
		mon.endReplay(rs, errMsg)
		r.mu.Lock()
		r.running = ""
		r.mu.Unlock()
	}()
	return nil
}

// stop cancels every replay and waits, at most replayStopTimeout, for them
// to return. Later calls return at once.
func (r *replays) stop() error {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.cancel()
	done := make(chan struct{})
	go func() {
		r.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-time.After(replayStopTimeout):
		return fmt.Errorf("backstore: a replay still runs %v after it was cancelled", replayStopTimeout)
	}
}

// replay runs one trace's replay to its end or until ctx ends.
func replay(ctx context.Context, cfg Config, img *Image, ra device.ReadAheadLimiter, mon *monitor, rs *ReplayStats, run *replayer.Stats, log zerolog.Logger) error {
	t, err := loadReplayTrace(ctx, cfg, img)
	if err != nil {
		return err
	}
	layers := img.replayLayers()
	if ra != nil {
		layers = limitReadAheadInTracePhase(layers, ra, log)
	}
	plan, err := replayer.NewPlan(t, layers, cfg.Replay)
	mon.mu.Lock()
	if plan != nil {
		rs.Plan = plan.Stats
	}
	mon.mu.Unlock()
	if err != nil {
		return err
	}
	log.Info().Str("trace", rs.Source).Int("frames", plan.Stats.Frames).Int("ranges", plan.Stats.Ranges).
		Int64("bytes", plan.Stats.Bytes).Int("skipped", plan.Stats.Unmatched+plan.Stats.OutOfRange).Msg("replay started")
	if err := plan.Run(ctx, layers, cfg.Replay, run); err != nil {
		if ctx.Err() != nil {
			log.Info().Str("trace", rs.Source).Int64("bytes", run.Bytes.Load()).Msg("replay stopped")
		}
		return err
	}
	log.Info().Int64("bytes", run.Bytes.Load()).Int64("failed", run.RangesFailed.Load()).Msg("replay done")
	return nil
}

// loadTraceLayer loads the image's trace layer from the registry.
func loadTraceLayer(ctx context.Context, img *Image) (*trace.Trace, error) {
	if img.TraceLayer.Size > maxTraceFile {
		return nil, fmt.Errorf("trace layer is %d bytes, over %d", img.TraceLayer.Size, maxTraceFile)
	}
	blob := img.Remote.Repo.Blob(*img.TraceLayer)
	return replayer.LoadLayer(io.NewSectionReader(readerAtCtx{ctx, blob}, 0, img.TraceLayer.Size))
}

// readerAtCtx reads a remote blob under a context.
type readerAtCtx struct {
	ctx context.Context
	b   *registry.Blob
}

func (r readerAtCtx) ReadAt(p []byte, off int64) (int, error) {
	return r.b.ReadAtContext(r.ctx, p, off)
}

// replayLayers describes the image's layers to the replayer. The local
// baselayer is never prefetched (it is on disk already).
func (img *Image) replayLayers() []replayer.Layer {
	out := make([]replayer.Layer, len(img.Layers))
	for i, l := range img.Layers {
		out[i] = replayer.Layer{Digest: l.Digest, LayerSize: l.Blob.Size(), BlobSize: l.Size, Ranges: l.Blob}
		if l.Cache != nil {
			out[i].Blob = l.Cache
		} else {
			out[i].Blob = localLayer{}
		}
	}
	return out
}

// limitReadAheadInTracePhase wraps the layers' caches so that the device's
// own readahead is limited from the trace phase's first Expect to its last
// EndExpect. Measured on a Django start-up over 25 Mbit/s: the FUSE file's
// 128 KiB readahead below the loop device brought 2.1 MB the plan did not
// hold, in 54-58 demand fetches on the link beside it; limited, 1.1 MB in
// 9-12 (the image's own metadata, read before the plan is known, most of
// it), replay 9.1 s -> 7.6-7.8 s.
func limitReadAheadInTracePhase(layers []replayer.Layer, ra device.ReadAheadLimiter, log zerolog.Logger) []replayer.Layer {
	p := &tracePhase{ra: ra, log: log}
	out := make([]replayer.Layer, len(layers))
	for i, l := range layers {
		out[i] = l
		if e, ok := l.Blob.(replayer.Expecter); ok {
			out[i].Blob = &phaseBlob{Prefetcher: l.Blob, e: e, p: p}
		}
	}
	return out
}

// tracePhase counts the layers in a trace phase; the limit is on while
// any is.
type tracePhase struct {
	ra  device.ReadAheadLimiter
	log zerolog.Logger

	mu     sync.Mutex
	active int
}

func (p *tracePhase) change(d int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	before := p.active
	p.active += d
	if (before == 0) == (p.active == 0) {
		return
	}
	if err := p.ra.LimitReadAhead(p.active > 0); err != nil {
		// Only the replay's efficiency depends on it.
		p.log.Warn().Err(err).Bool("limit", p.active > 0).Msg("device readahead unchanged")
	}
}

// phaseBlob is a layer's cache that reports its trace phase to a
// tracePhase: from its first Expect to its EndExpect.
type phaseBlob struct {
	replayer.Prefetcher
	e      replayer.Expecter
	p      *tracePhase
	inside bool // Expect and EndExpect come from the replayer's one goroutine (Plan.Run)
}

func (b *phaseBlob) Expect(off, n int64) {
	if !b.inside {
		b.inside = true
		b.p.change(+1)
	}
	b.e.Expect(off, n)
}

func (b *phaseBlob) EndExpect() {
	b.e.EndExpect()
	if b.inside {
		b.inside = false
		b.p.change(-1)
	}
}

// localLayer is a layer already on local disk: nothing to prefetch.
type localLayer struct{}

func (localLayer) Prefetch(context.Context, int64, int64) error { return nil }
