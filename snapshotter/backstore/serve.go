package backstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/metricsrv"
	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Config configures one serving process: one image mounted at one place.
type Config struct {
	Ref        string
	Mountpoint string
	// StateRoot holds the per-mount state directories (DefaultStateRoot).
	StateRoot string
	CacheDir  string
	// CacheMaxBytes bounds the cache; 0 = unbounded.
	CacheMaxBytes int64
	// CacheRefillSize is what a cache miss fetches (0 = the cache's default,
	// 256 KiB as upstream): larger windows cost bytes, smaller ones round trips.
	CacheRefillSize int64
	// CacheBlockSize is the cache's unit of presence (0 = its default).
	CacheBlockSize int64
	// DeviceTuning overrides the device's measured defaults when non-nil
	// (benchmarks compare readahead windows with it).
	DeviceTuning *device.Tuning
	Baselayer    string
	Registry     registry.Options
	// MetricsAddr, when set, serves Prometheus metrics at /metrics.
	MetricsAddr string
	// StatsFile is where the stats JSON goes; default state dir/stats.json.
	StatsFile     string
	StatsInterval time.Duration
	// TraceFile follows upstream's trace-path rules: a file that exists and
	// is empty asks for recording (eBPF capture on the device until unmount,
	// RecordDuration or the deletion of TraceFile.lock; the trace is then
	// written to TraceFile and TraceFile.ok created); a non-empty file is
	// replayed instead of the image's trace layer.
	TraceFile string
	// RecordDuration bounds a recording; 0 = until unmount.
	RecordDuration time.Duration
	// NoReplay turns replay off.
	NoReplay bool
	Replay   replayer.Options
	Logger   zerolog.Logger
	// Ready is called once the filesystem is mounted.
	Ready func(State)

	// mounted, when set, is closed once ext4 is mounted at Mountpoint
	// (a path list can be resolved only then).
	mounted <-chan struct{}
}

// Serve mounts cfg.Ref at cfg.Mountpoint and serves it until ctx ends, then
// tears everything down.
func Serve(ctx context.Context, cfg Config) (err error) {
	if cfg.StateRoot == "" {
		cfg.StateRoot = DefaultStateRoot
	}
	mountpoint, err := filepath.Abs(cfg.Mountpoint)
	if err != nil {
		return err
	}
	cfg.Mountpoint = mountpoint // path lists resolve in it
	stateDir, err := prepareStateDir(cfg.StateRoot, mountpoint)
	if err != nil {
		return err
	}
	if cfg.StatsFile == "" {
		cfg.StatsFile = filepath.Join(stateDir, "stats.json")
	}
	s := &server{cfg: cfg, log: cfg.Logger, stateDir: stateDir}
	// Teardown runs the steps each stage pushed, last first.
	defer func() {
		if cerr := s.cleanup.run(s.log); cerr != nil {
			s.log.Error().Err(cerr).Msg("teardown")
			err = errors.Join(err, cerr)
		}
	}()
	s.cleanup.push("state dir", func() error { return os.RemoveAll(stateDir) })
	if err := s.open(ctx); err != nil {
		return err
	}
	if err := s.attach(ctx); err != nil {
		return err
	}
	mounted := make(chan struct{})
	if err := s.startTrace(ctx, mounted); err != nil {
		return err
	}
	if err := s.mount(mounted); err != nil {
		return err
	}
	state, err := s.publish()
	if err != nil {
		return err
	}
	// The stats file describes this mount before anyone is told it is up.
	s.mon.write(cfg.StatsFile, s.log)
	if cfg.Ready != nil {
		cfg.Ready(state)
	}
	s.mon.run(ctx, cfg.StatsFile, cfg.StatsInterval, s.log)
	s.log.Info().Msg("stopping")
	return nil
}

// server is one Serve call's parts, set up stage by stage; each stage
// pushes the teardown of what it set up onto cleanup.
type server struct {
	cfg      Config
	log      zerolog.Logger
	stateDir string
	cleanup  cleanupStack

	cache *blobcache.Cache
	img   *Image
	dev   device.Device
	mon   *monitor
	rp    *replays
	ctl   *controller
}

// open opens the blob cache, the registry client and the image.
func (s *server) open(ctx context.Context) error {
	cfg := s.cfg
	cache, err := blobcache.Open(cfg.CacheDir, blobcache.Options{
		MaxBytes: cfg.CacheMaxBytes, RefillSize: cfg.CacheRefillSize, BlockSize: cfg.CacheBlockSize,
	})
	if err != nil {
		return err
	}
	s.cache = cache
	s.cleanup.push("cache", cache.Close)
	client, err := registry.New(cfg.Registry)
	if err != nil {
		return err
	}
	img, err := OpenImage(ctx, client, cache, cfg.Ref, OpenOptions{Baselayer: cfg.Baselayer})
	if err != nil {
		return err
	}
	s.img = img
	s.cleanup.push("image", img.Close)
	s.log.Info().Str("ref", cfg.Ref).Int("layers", len(img.Layers)).Int64("virtual_size", img.Size()).Msg("image opened")
	return nil
}

// attach makes the image a block device.
func (s *server) attach(ctx context.Context) error {
	dev, err := device.FUSELoop{}.Attach(ctx, s.img, device.Options{
		MountDir: filepath.Join(s.stateDir, "fuse"), Tuning: s.cfg.DeviceTuning, Logger: s.log,
	})
	if err != nil {
		return err
	}
	s.dev = dev
	s.cleanup.push("device", dev.Close)
	return nil
}

// startTrace sets up the monitor, the replays and the controller, and
// starts recording into or replaying the configured trace. Both start
// before ext4 is mounted; a path list's replay waits for mounted to close.
func (s *server) startTrace(ctx context.Context, mounted chan struct{}) error {
	cfg, log := s.cfg, s.log
	mode, err := TraceModeOf(cfg.TraceFile)
	if err != nil {
		log.Warn().Err(err).Str("trace", cfg.TraceFile).Msg("trace path unusable; neither recording nor replaying it")
	}
	s.mon = newMonitor(cfg.Ref, cfg.Mountpoint, s.img, s.cache)
	// Replays end before the filesystem is unmounted (see replays); this
	// step ends one started for a mount that then failed.
	s.rp = newReplays(ctx)
	s.rp.readAhead, _ = s.dev.(device.ReadAheadLimiter)
	s.cleanup.push("replays", s.rp.stop)
	// The controller outlives the mount: a recording's trace is written
	// once the filesystem is unmounted.
	s.ctl = newController(ctx, cfg, s.img, s.dev, s.rp, s.mon, log)
	s.cleanup.push("controller", s.ctl.close)
	if mode == TraceRecord {
		// Started before ext4 is mounted, so the mount's own reads are in
		// the trace, as upstream records them.
		if err := s.ctl.startRecording(cfg.TraceFile, cfg.RecordDuration); err != nil {
			log.Error().Err(err).Str("trace", cfg.TraceFile).Msg("recording not started; serving without it")
		}
		return nil
	}
	if cfg.NoReplay {
		return nil
	}
	// Replay starts before ext4 is mounted, as upstream's does, so the
	// mount's own reads (superblock, group descriptors, root directory)
	// already find the trace's first blocks coming; a path list waits for
	// the mount inside, since it is resolved through the filesystem.
	rcfg := cfg
	rcfg.mounted = mounted
	if mode != TraceReplay {
		rcfg.TraceFile = "" // absent: the image's own trace layer, if any
	}
	return s.rp.start(rcfg, s.img, s.mon, log)
}

// mount mounts the device's ext4 read-only at the mountpoint and closes
// mounted. Replays are stopped again before the unmount: the second
// "replays" step runs first at teardown.
func (s *server) mount(mounted chan struct{}) error {
	mountpoint := s.cfg.Mountpoint
	if err := unix.Mount(s.dev.Path(), mountpoint, "ext4", unix.MS_RDONLY, "noload"); err != nil {
		return fmt.Errorf("backstore: mount %s on %s: %w", s.dev.Path(), mountpoint, err)
	}
	close(mounted)
	s.cleanup.push("ext4 mount", func() error { return unmountIfMounted(mountpoint) })
	s.cleanup.push("replays", s.rp.stop)
	return nil
}

// publish serves the metrics and the control channel, and writes the
// state record that tells others the mount is up.
func (s *server) publish() (State, error) {
	cfg, log := s.cfg, s.log
	if cfg.MetricsAddr != "" {
		addr, stop, err := serveMetrics(cfg.MetricsAddr, s.mon, s.cache, log)
		if err != nil {
			return State{}, err
		}
		s.cleanup.push("metrics", stop)
		s.mon.metricsAddr = addr
	}
	control, err := controlSocketPath(s.stateDir)
	if err == nil {
		err = s.ctl.listen(control)
	}
	if err != nil {
		// Only later record/replay requests need it: serve without.
		log.Warn().Err(err).Msg("no control channel")
		control = ""
	}
	state := State{
		Ref: cfg.Ref, Mountpoint: cfg.Mountpoint, PID: os.Getpid(), PIDStart: processStart(os.Getpid()),
		Device: s.dev.Path(), FUSEDir: filepath.Join(s.stateDir, "fuse"), StatsFile: cfg.StatsFile, Started: time.Now(),
		Control: control, Metrics: s.mon.metricsAddr,
	}
	if err := writeState(s.stateDir, state); err != nil {
		return State{}, err
	}
	log.Info().Str("device", s.dev.Path()).Str("mountpoint", cfg.Mountpoint).Msg("mounted")
	return state, nil
}

// prepareStateDir makes the mount's state directory, refusing a mountpoint
// whose state says it is served by a live process.
func prepareStateDir(root, mountpoint string) (string, error) {
	if s, dir, err := ReadState(root, mountpoint); err == nil {
		if processAlive(s.PID, s.PIDStart) {
			return "", fmt.Errorf("backstore: %s is already mounted (pid %d)", mountpoint, s.PID)
		}
		// A dead server's leftovers: clean up before reusing the directory.
		if err := device.Cleanup(context.Background(), s.FUSEDir); err != nil {
			return "", fmt.Errorf("backstore: clean up after the dead server of %s: %w", mountpoint, err)
		}
		os.RemoveAll(dir)
	}
	dir, err := StateDir(root, mountpoint)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Join(dir, "fuse"), 0o700); err != nil {
		return "", fmt.Errorf("backstore: state dir: %w", err)
	}
	return dir, nil
}

func serveMetrics(addr string, mon *monitor, cache *blobcache.Cache, log zerolog.Logger) (string, func() error, error) {
	reg := prometheus.NewRegistry()
	if err := reg.Register(cache); err != nil {
		return "", nil, err
	}
	if err := reg.Register(mon); err != nil {
		return "", nil, err
	}
	return metricsrv.Serve(addr, reg, log)
}

// slowTeardownStep is how long a teardown step may take before it is
// logged as slow: the snapshotter waits for this process to go.
const slowTeardownStep = time.Second

// cleanupStack runs teardown steps in reverse order of setup.
type cleanupStack []cleanupStep

type cleanupStep struct {
	name string
	f    func() error
}

func (c *cleanupStack) push(name string, f func() error) { *c = append(*c, cleanupStep{name, f}) }

// run runs the steps, logging each one's duration so that a slow stop
// says where its time went.
func (c *cleanupStack) run(log zerolog.Logger) error {
	var errs []error
	start := time.Now()
	for i := len(*c) - 1; i >= 0; i-- {
		step := (*c)[i]
		t := time.Now()
		err := step.f()
		took := time.Since(t)
		ev := log.Debug()
		if took >= slowTeardownStep {
			ev = log.Warn()
		}
		ev.Err(err).Str("step", step.name).Dur("took", took).Msg("teardown step")
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", step.name, err))
		}
	}
	*c = nil
	log.Info().Dur("took", time.Since(start)).Msg("torn down")
	return errors.Join(errs...)
}
