package coldstart

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/obdtrace/obdtrace/internal/wanproxy"
	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Timeouts of the harness's own waits.
const (
	readyTimeout = 5 * time.Minute
	// statsInterval is short so the stats file is fresh when read.
	statsInterval = 100 * time.Millisecond
	// fullFetchChunk is the range one full-prefetch worker asks for.
	fullFetchChunk = 4 << 20
	// defaultFullFetchWorkers keeps the link full (its bandwidth-delay
	// product is 125 KB at 25 Mbit/s and 40 ms) without queueing long.
	defaultFullFetchWorkers = 8
)

// ErrNotReady is returned when a mount fails or does not come up.
var ErrNotReady = errors.New("coldstart: mount did not come up")

type proxy struct {
	p    *wanproxy.Proxy
	addr string
	stop func() error
}

func startProxy(ctx context.Context, upstream string, opts wanproxy.Options) (*proxy, error) {
	u, err := url.Parse(upstream)
	if err != nil {
		return nil, fmt.Errorf("coldstart: upstream %q: %w", upstream, err)
	}
	p, err := wanproxy.New(u, opts)
	if err != nil {
		return nil, err
	}
	addr, stop, err := p.Start(ctx, "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return &proxy{p: p, addr: addr, stop: stop}, nil
}

// ref rewrites an image reference to go through the proxy.
func (p *proxy) ref(ref string) (string, error) {
	_, path, ok := strings.Cut(strings.TrimPrefix(ref, "docker://"), "/")
	if !ok {
		return "", fmt.Errorf("coldstart: reference %q has no registry host", ref)
	}
	return p.addr + "/" + path, nil
}

type mountOptions struct {
	trace    string // replay (non-empty file) or record (empty file)
	noReplay bool
	replay   replayer.Options
}

// mounted is one image served in this process by backstore.Serve.
type mounted struct {
	root    string
	state   backstore.State
	cancel  context.CancelFunc
	done    chan error
	stopped bool
}

// mount serves the image at a fresh mountpoint with its cache in cacheDir
// and returns once the filesystem is mounted.
func (r *runner) mount(ctx context.Context, cacheDir string, o mountOptions) (*mounted, error) {
	root, err := r.freshDir("mnt")
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	ready := make(chan backstore.State, 1)
	m := &mounted{root: root, cancel: cancel, done: make(chan error, 1)}
	cfg := backstore.Config{
		Ref: r.ref, Mountpoint: root, StateRoot: filepath.Join(r.cfg.Work, "state"), CacheDir: cacheDir, CacheRefillSize: r.cfg.RefillSize, CacheBlockSize: r.cfg.BlockSize,
		Baselayer: r.cfg.Baselayer, Registry: registry.Options{PlainHTTP: []string{r.proxy.addr}},
		MetricsAddr: "127.0.0.1:0", StatsFile: filepath.Join(cacheDir, "stats.json"), StatsInterval: statsInterval,
		TraceFile: o.trace, NoReplay: o.noReplay, Replay: o.replay, Logger: r.cfg.Logger,
		Ready: func(s backstore.State) { ready <- s },
	}
	if r.cfg.DeviceReadAhead > 0 {
		t := device.DefaultTuning()
		t.ReadAhead = r.cfg.DeviceReadAhead
		cfg.DeviceTuning = &t
	}
	go func() { m.done <- backstore.Serve(sctx, cfg) }()
	select {
	case m.state = <-ready:
		return m, nil
	case err := <-m.done:
		cancel()
		return nil, fmt.Errorf("%w: %w", ErrNotReady, err)
	case <-time.After(readyTimeout):
		cancel()
		<-m.done
		return nil, fmt.Errorf("%w after %v", ErrNotReady, readyTimeout)
	}
}

// stop unmounts and waits for the server to finish.
func (m *mounted) stop() error {
	if m.stopped {
		return nil
	}
	m.stopped = true
	m.cancel()
	return <-m.done
}

// stopStats stops the mount and returns its final stats file.
func (m *mounted) stopStats() (backstore.Stats, error) {
	var st backstore.Stats
	if err := m.stop(); err != nil {
		return st, err
	}
	b, err := os.ReadFile(m.state.StatsFile)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("coldstart: stats file %s: %w", m.state.StatsFile, err)
	}
	return st, nil
}

// fullFetch fills cacheDir with every layer of the image, whole: the
// replayer's full-fetch phase run on its own, before the mount.
func (r *runner) fullFetch(ctx context.Context, cacheDir string) error {
	cache, err := blobcache.Open(cacheDir, blobcache.Options{RefillSize: r.cfg.RefillSize, BlockSize: r.cfg.BlockSize})
	if err != nil {
		return err
	}
	defer cache.Close()
	client, err := registry.New(registry.Options{PlainHTTP: []string{r.proxy.addr}})
	if err != nil {
		return err
	}
	img, err := backstore.OpenImage(ctx, client, cache, r.ref, backstore.OpenOptions{Baselayer: r.cfg.Baselayer})
	if err != nil {
		return err
	}
	defer img.Close()
	var layers []replayer.Layer
	for _, l := range img.Layers {
		if l.Cache != nil {
			layers = append(layers, replayer.Layer{Digest: l.Digest, BlobSize: l.Size, Blob: l.Cache})
		}
	}
	workers := r.cfg.FullFetchWorkers
	if workers <= 0 {
		workers = defaultFullFetchWorkers
	}
	var stats replayer.Stats
	opts := replayer.Options{FullFetch: true, FullFetchWorkers: workers, FullFetchChunk: fullFetchChunk}
	if err := (&replayer.Plan{}).Run(ctx, layers, opts, &stats); err != nil {
		return err
	}
	if n := stats.RangesFailed.Load(); n > 0 {
		return fmt.Errorf("coldstart: full fetch: %d ranges failed", n)
	}
	return nil
}
