package coldstart

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/wanproxy"
	"github.com/obdtrace/obdtrace/replayer"
)

// Variant is one way of starting the workload.
type Variant int

// The variants, in the order each round runs them.
const (
	NoPrefetch   Variant = iota // a cold cache, every block fetched on demand
	Replay                      // a cold cache and the recorded trace replayed at mount
	FullPrefetch                // every layer fetched whole into a cold cache, then mount and start
	Warm                        // the cache FullPrefetch filled, mounted again
	numVariants
)

// Variants lists every variant in run order.
var Variants = [...]Variant{NoPrefetch, Replay, FullPrefetch, Warm}

func (v Variant) String() string {
	switch v {
	case NoPrefetch:
		return "no prefetch"
	case Replay:
		return "trace replay"
	case FullPrefetch:
		return "full prefetch"
	case Warm:
		return "warm cache"
	}
	return fmt.Sprintf("variant(%d)", int(v))
}

// ErrWorkload wraps a workload's failure.
var ErrWorkload = errors.New("coldstart: workload failed")

// Workload is what runs on the mounted image: it returns when the
// application has started (for a Python import set, when the interpreter
// exits). root is the image's mounted filesystem.
type Workload func(ctx context.Context, root string) error

// Config describes one benchmark: an image, its workload, the link.
type Config struct {
	// Ref is the image in the registry, e.g. "127.0.0.1:5000/py:obd".
	// Mounts reach it through the proxy: the host part is replaced.
	Ref string
	// Upstream is the registry's base URL, e.g. "http://127.0.0.1:5000".
	Upstream string
	// Baselayer is upstream's ext4 baselayer, for images that need it.
	Baselayer string
	Workload  Workload
	// Link is the emulated WAN (25 Mbit/s and 40 ms RTT in the issue).
	Link wanproxy.Options
	// Rounds is how many times the four variants run (interleaved).
	Rounds int
	// Work is a scratch directory: caches, mountpoint, trace, stats.
	Work string
	// Trace, when set, is where the trace is kept: a file that exists is
	// replayed as it is and no recording run is made; otherwise the
	// recording run writes it there. Side-by-side comparisons then replay
	// one trace (two recordings of one start-up differ by a few per cent).
	Trace string
	// Replay tunes the replayer in the Replay variant.
	Replay replayer.Options
	// FullFetchWorkers is the parallelism of the FullPrefetch variant.
	FullFetchWorkers int
	// RefillSize is the blob cache's fetch unit (0: its default, 256 KiB).
	RefillSize int64
	// BlockSize is the blob cache's unit of presence (0: its default,
	// 4 KiB): what a prefetched range is rounded out to.
	BlockSize int64
	// DeviceReadAhead is the device's readahead window in bytes (0: the
	// device's default, 128 KiB): what one buffered miss asks the cache for.
	DeviceReadAhead int
	// Variants limits the run to these (default: all; Warm needs
	// FullPrefetch before it).
	Variants []Variant
	Logger   zerolog.Logger
	// Progress, when set, is told about every sample as it is taken.
	Progress func(Sample)
}

// Sample is one timed start.
type Sample struct {
	Variant Variant
	Round   int
	// Start is from the mount call (for FullPrefetch: from the start of the
	// whole-image fetch) to the workload's exit.
	Start time.Duration
	// LinkBytes and Requests crossed the emulated link during Start.
	LinkBytes, Requests int64
	// Cache are the blob cache's counters at the workload's exit.
	Cache CacheFigures
}

// Result is a whole run: the samples, and what the trace said.
type Result struct {
	Samples []Sample
	// TraceBytes is the blob bytes the trace's frames cover: what the
	// workload needs from the registry, by the trace. PlanBytes adds the
	// gaps the replay plan merged ranges over.
	TraceBytes  int64
	PlanBytes   int64
	TraceFrames int
	TraceRanges int
	// Link is the emulated link the run used.
	Link wanproxy.Options
}

// Run records a trace with one cold start, then runs cfg.Rounds rounds of
// the four variants. Every variant but Warm starts from an empty cache.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Rounds <= 0 {
		cfg.Rounds = 3
	}
	proxy, err := startProxy(ctx, cfg.Upstream, cfg.Link)
	if err != nil {
		return nil, err
	}
	defer proxy.stop()
	ref, err := proxy.ref(cfg.Ref)
	if err != nil {
		return nil, err
	}
	r := &runner{cfg: cfg, proxy: proxy, ref: ref}
	res := &Result{Link: cfg.Link}
	tracePath := filepath.Join(cfg.Work, "trace.pb")
	if cfg.Trace != "" {
		tracePath = cfg.Trace
	}
	if keep, err := keptTrace(cfg.Trace); err != nil {
		return nil, err
	} else if !keep {
		if err := r.record(ctx, tracePath); err != nil {
			return nil, err
		}
	}
	for round := range cfg.Rounds {
		warmCache := ""
		for _, v := range cfg.variants() {
			s, err := r.sample(ctx, v, round, tracePath, &warmCache, res)
			if err != nil {
				return res, fmt.Errorf("coldstart: round %d, %s: %w", round, v, err)
			}
			res.Samples = append(res.Samples, s)
			if cfg.Progress != nil {
				cfg.Progress(s)
			}
		}
		if err := os.RemoveAll(warmCache); err != nil {
			return res, err
		}
	}
	return res, nil
}

// keptTrace tells whether path holds a trace to replay: a recording that
// finished (upstream's PATH.ok beside it). An empty file, or one without
// its .ok, is what a recording run left when it failed (and an empty one,
// by upstream's rule, would make the replay mount record instead).
func keptTrace(path string) (bool, error) {
	if path == "" {
		return false, nil
	}
	for _, p := range []string{path + ".ok", path} {
		fi, err := os.Stat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return false, nil
		case err != nil:
			return false, fmt.Errorf("coldstart: trace: %w", err)
		case p == path && fi.Size() == 0:
			return false, nil
		}
	}
	return true, nil
}

func (c Config) variants() []Variant {
	if len(c.Variants) == 0 {
		return Variants[:]
	}
	return c.Variants
}

type runner struct {
	cfg   Config
	proxy *proxy
	ref   string
	seq   int
}

// freshDir returns a new, empty directory under the work directory.
func (r *runner) freshDir(kind string) (string, error) {
	r.seq++
	dir := filepath.Join(r.cfg.Work, fmt.Sprintf("%s-%d", kind, r.seq))
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	return dir, os.MkdirAll(dir, 0o755)
}

// record mounts the image cold with an empty trace file (upstream's rule:
// record), runs the workload and unmounts, which writes the trace.
func (r *runner) record(ctx context.Context, tracePath string) error {
	if err := os.WriteFile(tracePath, nil, 0o644); err != nil {
		return err
	}
	os.Remove(tracePath + ".ok")
	cache, err := r.freshDir("cache-record")
	if err != nil {
		return err
	}
	defer os.RemoveAll(cache)
	m, err := r.mount(ctx, cache, mountOptions{trace: tracePath})
	if err != nil {
		return err
	}
	werr := r.cfg.Workload(ctx, m.root)
	if err := errors.Join(werr, m.stop()); err != nil {
		return fmt.Errorf("coldstart: recording run: %w", err)
	}
	if _, err := os.Stat(tracePath + ".ok"); err != nil {
		return fmt.Errorf("coldstart: no trace was written: %w", err)
	}
	return nil
}

// sample times one start of variant v. warmCache carries FullPrefetch's
// filled cache to Warm.
func (r *runner) sample(ctx context.Context, v Variant, round int, tracePath string, warmCache *string, res *Result) (Sample, error) {
	s := Sample{Variant: v, Round: round}
	cache := *warmCache
	if v != Warm || cache == "" {
		var err error
		if cache, err = r.freshDir("cache"); err != nil {
			return s, err
		}
	}
	opts := mountOptions{noReplay: true}
	if v == Replay {
		opts = mountOptions{trace: tracePath, replay: r.cfg.Replay}
	}
	before := r.proxy.p.Stats()
	begin := time.Now()
	if v == FullPrefetch {
		if err := r.fullFetch(ctx, cache); err != nil {
			return s, err
		}
	}
	m, err := r.mount(ctx, cache, opts)
	if err != nil {
		return s, err
	}
	werr := r.cfg.Workload(ctx, m.root)
	s.Start = time.Since(begin)
	after := r.proxy.p.Stats()
	s.LinkBytes, s.Requests = after.Bytes-before.Bytes, after.Requests-before.Requests
	s.Cache, err = m.scrape(ctx)
	st, serr := m.stopStats()
	if err := errors.Join(werr, err, serr); err != nil {
		return s, err
	}
	if v == Replay && st.Replay != nil {
		p := st.Replay.Plan
		res.TraceBytes, res.PlanBytes, res.TraceFrames, res.TraceRanges = p.NeededBytes, p.Bytes, p.Frames, p.Ranges
	}
	switch v {
	case FullPrefetch:
		*warmCache = cache
	case Warm:
	default:
		return s, os.RemoveAll(cache)
	}
	return s, nil
}
