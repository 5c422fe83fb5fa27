package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// ErrImageMismatch means the image a reference names now is not the one
// whose layers were pulled (a tag moved, or the layers belong to another
// image of the same chain).
var ErrImageMismatch = errors.New("snapshotter: image does not match the pulled layers")

// maxSpecSize bounds a server spec read back.
const maxSpecSize = 1 << 20

// ServerSpec is everything an image server process needs, written by the
// snapshotter beside the mount so that the server depends on no flags or
// environment of the snapshotter's (and so it can be inspected).
type ServerSpec struct {
	// Ref is the image to serve, pinned to a manifest digest when known.
	Ref string `json:"ref"`
	// Chain is the layer blob digests (bottom first) the image must have.
	Chain         []digest.Digest `json:"chain"`
	Mountpoint    string          `json:"mountpoint"`
	StateRoot     string          `json:"state_root"`
	CacheDir      string          `json:"cache_dir"`
	Cache         CacheConfig     `json:"cache"`
	Device        DeviceConfig    `json:"device"`
	Baselayer     string          `json:"baselayer"`
	Registry      RegistryConfig  `json:"registry"`
	Replay        ReplayConfig    `json:"replay"`
	StatsInterval time.Duration   `json:"stats_interval,omitempty"`
	// MetricsAddress, when set, serves the server's own metrics.
	MetricsAddress string `json:"metrics_address,omitempty"`
	LogLevel       string `json:"log_level,omitempty"`
	// TraceFile is recorded into (when empty) or replayed (when not) by
	// upstream's trace-path rules, in place of the image's trace layer.
	TraceFile         string        `json:"trace_file,omitempty"`
	RecordMaxDuration time.Duration `json:"record_max_duration,omitempty"`
}

// writeServerSpec writes spec readable by root only: it may hold registry
// credentials.
func writeServerSpec(path string, spec ServerSpec) error {
	b, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}

// ReadServerSpec reads a spec written for an image server.
func ReadServerSpec(path string) (ServerSpec, error) {
	b, err := iox.ReadFileLimit(path, maxSpecSize)
	if err != nil {
		return ServerSpec{}, fmt.Errorf("snapshotter: server spec: %w", err)
	}
	var spec ServerSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return ServerSpec{}, fmt.Errorf("snapshotter: server spec %s: %w", path, err)
	}
	if spec.Ref == "" || spec.Mountpoint == "" || spec.StateRoot == "" || spec.CacheDir == "" {
		return ServerSpec{}, fmt.Errorf("snapshotter: server spec %s: ref, mountpoint, state_root and cache_dir are required", path)
	}
	return spec, nil
}

// RunServer serves one image as the spec says until ctx ends: the body of
// `obd-snapshotter serve-image`. It reports readiness (or why it failed) to
// the snapshotter that spawned it.
func RunServer(ctx context.Context, spec ServerSpec, log zerolog.Logger) error {
	err := runServer(ctx, spec, log)
	if err != nil {
		backstore.NotifyReady(err)
	}
	return err
}

func runServer(ctx context.Context, spec ServerSpec, log zerolog.Logger) error {
	regOpts, err := spec.Registry.Options()
	if err != nil {
		return err
	}
	if err := verifyChain(ctx, regOpts, spec.Ref, spec.Chain); err != nil {
		return err
	}
	cfg := backstore.Config{
		Ref: spec.Ref, Mountpoint: spec.Mountpoint, StateRoot: spec.StateRoot,
		CacheDir: spec.CacheDir, CacheMaxBytes: spec.Cache.MaxBytes, CacheRefillSize: spec.Cache.RefillSize,
		CacheBlockSize: spec.Cache.BlockSize, DeviceTuning: spec.Device.tuning(),
		Baselayer: spec.Baselayer, Registry: regOpts,
		MetricsAddr: spec.MetricsAddress, StatsInterval: spec.StatsInterval,
		TraceFile: spec.TraceFile, RecordDuration: spec.RecordMaxDuration,
		NoReplay: !spec.Replay.Enabled,
		Replay: replayer.Options{
			Workers: spec.Replay.Workers, BytesPerSecond: spec.Replay.BytesPerSecond,
			MaxFrames: spec.Replay.MaxFrames, FullFetch: spec.Replay.FullFetch,
			StartupHold: spec.Replay.StartupHold,
		},
		Logger: log,
		Ready:  func(backstore.State) { backstore.NotifyReady(nil) },
	}
	return backstore.Serve(ctx, cfg)
}

// verifyChain checks that ref names an image whose layers are exactly
// chain: the device must show the layers the snapshots stand for.
func verifyChain(ctx context.Context, opts registry.Options, ref string, chain []digest.Digest) error {
	if len(chain) == 0 {
		return nil
	}
	client, err := registry.New(opts)
	if err != nil {
		return err
	}
	img, err := client.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	got := make([]digest.Digest, len(img.Layers))
	for i, l := range img.Layers {
		got[i] = l.Digest
	}
	if !slices.Equal(got, chain) {
		return fmt.Errorf("%w: %s has layers %v, the snapshot chain %v", ErrImageMismatch, ref, got, chain)
	}
	return nil
}
