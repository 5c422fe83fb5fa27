package backstore

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// maxTraceFile bounds a trace read into memory.
const maxTraceFile = 256 << 20

// startReplay loads the trace to replay (cfg.TraceFile, else the image's
// trace layer) and runs it in the background. Any problem with the trace is
// logged and counted, never fatal: a bad trace must not fail a mount.
func startReplay(ctx context.Context, cfg Config, img *Image, mon *monitor, log zerolog.Logger) {
	source := cfg.TraceFile
	if source == "" {
		if img.TraceLayer == nil {
			return
		}
		source = "trace layer " + img.TraceLayer.Digest.String()
	}
	rs := &ReplayStats{Source: source}
	var run replayer.Stats
	mon.setReplay(rs, &run)
	fail := func(err error) {
		log.Warn().Err(err).Str("trace", source).Msg("replay skipped")
		mon.mu.Lock()
		rs.Error = err.Error()
		mon.mu.Unlock()
	}
	go func() {
		t, err := loadReplayTrace(ctx, cfg, img)
		if err != nil {
			fail(err)
			return
		}
		layers := img.replayLayers()
		plan, err := replayer.NewPlan(t, layers, cfg.Replay)
		mon.mu.Lock()
		if plan != nil {
			rs.Plan = plan.Stats
		}
		mon.mu.Unlock()
		if err != nil {
			fail(err)
			return
		}
		log.Info().Str("trace", source).Int("frames", plan.Stats.Frames).Int("ranges", plan.Stats.Ranges).
			Int64("bytes", plan.Stats.Bytes).Int("skipped", plan.Stats.Unmatched+plan.Stats.OutOfRange).Msg("replay started")
		if err := plan.Run(ctx, layers, cfg.Replay, &run); err != nil && ctx.Err() == nil {
			fail(err)
			return
		}
		log.Info().Int64("bytes", run.Bytes.Load()).Int64("failed", run.RangesFailed.Load()).Msg("replay done")
	}()
}

func loadTrace(ctx context.Context, path string, img *Image) (*trace.Trace, error) {
	if path != "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		b, err := io.ReadAll(io.LimitReader(f, maxTraceFile+1))
		if err != nil {
			return nil, err
		}
		if len(b) > maxTraceFile {
			return nil, fmt.Errorf("trace %s is over %d bytes", path, maxTraceFile)
		}
		return replayer.Load(b)
	}
	blob := img.Remote.Repo.Blob(*img.TraceLayer)
	if img.TraceLayer.Size > maxTraceFile {
		return nil, fmt.Errorf("trace layer is %d bytes, over %d", img.TraceLayer.Size, maxTraceFile)
	}
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

// localLayer is a layer already on local disk: nothing to prefetch.
type localLayer struct{}

func (localLayer) Prefetch(context.Context, int64, int64) error { return nil }
