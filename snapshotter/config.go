package snapshotter

import (
	"errors"
	"fmt"
	"math/bits"
	"path/filepath"
	"time"

	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Defaults of Config.
const (
	DefaultRoot         = "/var/lib/obdtrace/snapshotter"
	DefaultAddress      = "/run/obdtrace/snapshotter.sock"
	DefaultBaselayer    = "/opt/obdtrace/baselayers/ext4_64"
	DefaultReadyTimeout = 2 * time.Minute
	DefaultStopGrace    = 10 * time.Second
	// DefaultRecordMaxDuration bounds a label-triggered recording, so a
	// forgotten one does not run for the life of a long-lived container.
	DefaultRecordMaxDuration = 10 * time.Minute
)

// ErrConfig is wrapped by every configuration error.
var ErrConfig = errors.New("snapshotter: invalid configuration")

// Config is the snapshotter's configuration: the file format of
// docs/snapshotter.md (keys are the mapstructure tags).
type Config struct {
	// Root holds the metadata database and the snapshot directories.
	Root string `mapstructure:"root" json:"root"`
	// Address is the unix socket containerd connects to.
	Address string `mapstructure:"address" json:"address"`
	// StateRoot holds the image servers' state records; default Root/mounts.
	StateRoot string `mapstructure:"state_root" json:"state_root"`
	// MetricsAddress serves Prometheus metrics at /metrics when set.
	MetricsAddress string `mapstructure:"metrics_address" json:"metrics_address"`
	LogLevel       string `mapstructure:"log_level" json:"log_level"`
	LogFormat      string `mapstructure:"log_format" json:"log_format"`
	// Baselayer is upstream's ext4 baselayer, for images converted onto it.
	Baselayer string `mapstructure:"baselayer" json:"baselayer"`
	// AsyncRemove defers removing snapshot directories to Cleanup.
	AsyncRemove bool `mapstructure:"async_remove" json:"async_remove"`

	Cache    CacheConfig    `mapstructure:"cache" json:"cache"`
	Device   DeviceConfig   `mapstructure:"device" json:"device"`
	Registry RegistryConfig `mapstructure:"registry" json:"registry"`
	Replay   ReplayConfig   `mapstructure:"replay" json:"replay"`
	Server   ServerConfig   `mapstructure:"server" json:"server"`
	Record   RecordConfig   `mapstructure:"record" json:"record"`
}

// RecordConfig governs recordings asked for by snapshot labels.
type RecordConfig struct {
	// MaxDuration ends a recording that neither its container's removal
	// nor the deletion of its .lock file ended first; 0 = no bound.
	MaxDuration time.Duration `mapstructure:"max_duration" json:"max_duration"`
}

// CacheConfig bounds each image's blob cache.
type CacheConfig struct {
	MaxBytes   int64 `mapstructure:"max_bytes" json:"max_bytes"`
	RefillSize int64 `mapstructure:"refill_size" json:"refill_size"`
	// BlockSize is the cache's unit of presence (0 = 4 KiB): smaller
	// blocks let replay fetch exactly a trace's ranges.
	BlockSize int64 `mapstructure:"block_size" json:"block_size,omitempty"`
}

// Bounds of the cache sizes, as blobcache's Options documents them.
const (
	minCacheBlockSize = 4 << 10
	maxCacheBlockSize = 16 << 20
	maxCacheRefill    = 64 << 20
)

// validate applies the rules blobcache.Open applies to the options an
// image server derives from c (see Options.withDefaults in
// snapshotter/backstore/blobcache/cache.go), so that a bad size fails here
// and not in every image server. The servers leave the cache's readahead
// at its default, blobcache.DefaultReadahead, which must be a multiple of
// the refill size. TestCacheConfigMatchesBlobcache checks the two agree.
func (c CacheConfig) validate() error {
	block, refill := c.BlockSize, c.RefillSize
	if block == 0 {
		block = blobcache.DefaultBlockSize
	}
	if refill == 0 {
		refill = max(blobcache.DefaultRefillSize, block)
	}
	readahead := max(int64(blobcache.DefaultReadahead), refill)
	switch {
	case c.BlockSize < 0 || block < minCacheBlockSize || block > maxCacheBlockSize || bits.OnesCount64(uint64(block)) != 1:
		return fmt.Errorf("%w: cache.block_size %d is not a power of two from %d to %d", ErrConfig, c.BlockSize, minCacheBlockSize, maxCacheBlockSize)
	case c.RefillSize < 0 || refill < block || refill%block != 0 || refill > maxCacheRefill:
		return fmt.Errorf("%w: cache.refill_size %d is not a multiple of the block size %d up to %d", ErrConfig, c.RefillSize, block, maxCacheRefill)
	case readahead%refill != 0 || readahead > maxCacheRefill:
		return fmt.Errorf("%w: cache.refill_size %d does not divide the cache's readahead span %d", ErrConfig, refill, readahead)
	case c.MaxBytes < 0 || (c.MaxBytes > 0 && c.MaxBytes < 4*refill):
		return fmt.Errorf("%w: cache.max_bytes %d is below 4 refill windows (%d)", ErrConfig, c.MaxBytes, 4*refill)
	}
	return nil
}

// DeviceConfig tunes each image's block device.
type DeviceConfig struct {
	// ReadAheadKB is the readahead of the FUSE file below the loop device
	// (0 = the device's default, 128 KiB; see device.WithReadAhead). It is
	// off while a replay's trace phase runs either way.
	ReadAheadKB int `mapstructure:"readahead_kb" json:"readahead_kb,omitempty"`
}

func (c DeviceConfig) validate() error {
	if _, err := device.WithReadAhead(c.ReadAheadKB); err != nil {
		return fmt.Errorf("%w: device.readahead_kb: %w", ErrConfig, err)
	}
	return nil
}

// tuning is the device tuning c asks for: nil (the measured defaults)
// unless something is set. c has been validated.
func (c DeviceConfig) tuning() *device.Tuning {
	t, _ := device.WithReadAhead(c.ReadAheadKB)
	return t
}

// RegistryConfig says how the image servers talk to registries.
type RegistryConfig struct {
	// Insecure lists hosts ("host:port") spoken to over plain HTTP.
	Insecure []string `mapstructure:"insecure" json:"insecure,omitempty"`
	// DockerConfigDir is where the docker CLI's config.json (credentials)
	// lives; "" means $DOCKER_CONFIG, else ~/.docker.
	DockerConfigDir string `mapstructure:"docker_config_dir" json:"docker_config_dir,omitempty"`
	// Credentials per host, tried before the docker config.
	Credentials map[string]Credential `mapstructure:"credentials" json:"credentials,omitempty"`
	// Mirrors lists, per registry host ("docker.io" included), mirrors
	// tried in order for pulls before the registry itself: "host:port",
	// optionally with an http:// or https:// scheme.
	Mirrors map[string][]string `mapstructure:"mirrors" json:"mirrors,omitempty"`
	// Platform picks a manifest from an index; "" is the host's.
	Platform       string        `mapstructure:"platform" json:"platform,omitempty"`
	RequestTimeout time.Duration `mapstructure:"request_timeout" json:"request_timeout,omitempty"`
	MaxRetries     int           `mapstructure:"max_retries" json:"max_retries,omitempty"`
	Concurrency    int           `mapstructure:"concurrency" json:"concurrency,omitempty"`
}

// Credential is a user name and password (or, with no user, a token).
type Credential struct {
	Username string `mapstructure:"username" json:"username,omitempty"`
	Password string `mapstructure:"password" json:"password,omitempty"`
}

// ReplayConfig is what an image server does with a trace at mount.
type ReplayConfig struct {
	// Enabled replays the image's trace layer when its device attaches.
	Enabled        bool  `mapstructure:"enabled" json:"enabled"`
	Workers        int   `mapstructure:"workers" json:"workers,omitempty"`
	BytesPerSecond int64 `mapstructure:"bytes_per_second" json:"bytes_per_second,omitempty"`
	MaxFrames      int   `mapstructure:"max_frames" json:"max_frames,omitempty"`
	// FullFetch fetches the rest of every layer after the trace, for every
	// image (the download-remote-blob label asks it for one image).
	FullFetch bool `mapstructure:"full_fetch" json:"full_fetch,omitempty"`
	// StartupHold bounds how long after the mount a replay whose ranges
	// are in keeps its trace phase (readaheads off, misses small) for the
	// rest of the recorded start-up: 0 = replayer.DefaultStartupHold (30
	// s), negative = not at all.
	StartupHold time.Duration `mapstructure:"startup_hold" json:"startup_hold,omitempty"`
}

// ServerConfig governs the per-image backstore servers.
type ServerConfig struct {
	// ReadyTimeout bounds how long a container's Prepare waits for its
	// image's server to mount.
	ReadyTimeout time.Duration `mapstructure:"ready_timeout" json:"ready_timeout"`
	// StopGrace is how long a server may take to stop before it is killed.
	StopGrace     time.Duration `mapstructure:"stop_grace" json:"stop_grace"`
	StatsInterval time.Duration `mapstructure:"stats_interval" json:"stats_interval,omitempty"`
	// MetricsAddress, when set, makes every server serve its own metrics
	// (use port 0: each server picks a free port, named in its state).
	MetricsAddress string `mapstructure:"metrics_address" json:"metrics_address,omitempty"`
	// Command is the server's argv prefix; the spec file's flag is appended.
	// Default: this executable with "serve-image".
	Command []string `mapstructure:"command" json:"command,omitempty"`
}

// DefaultConfig returns the configuration used for unset keys.
func DefaultConfig() Config {
	return Config{
		Root:      DefaultRoot,
		Address:   DefaultAddress,
		LogLevel:  "info",
		LogFormat: "auto",
		Baselayer: DefaultBaselayer,
		Replay:    ReplayConfig{Enabled: true, Workers: replayer.DefaultWorkers},
		Server: ServerConfig{
			ReadyTimeout:  DefaultReadyTimeout,
			StopGrace:     DefaultStopGrace,
			StatsInterval: backstore.DefaultStatsInterval,
		},
		Record: RecordConfig{MaxDuration: DefaultRecordMaxDuration},
	}
}

// Validate checks c and fills derived defaults (StateRoot).
func (c *Config) Validate() error {
	if c.Root == "" {
		return fmt.Errorf("%w: root is empty", ErrConfig)
	}
	root, err := filepath.Abs(c.Root)
	if err != nil {
		return fmt.Errorf("%w: root %q: %w", ErrConfig, c.Root, err)
	}
	c.Root = root
	if c.StateRoot == "" {
		c.StateRoot = filepath.Join(c.Root, "mounts")
	}
	if c.StateRoot, err = filepath.Abs(c.StateRoot); err != nil {
		return fmt.Errorf("%w: state_root: %w", ErrConfig, err)
	}
	switch {
	case c.Replay.BytesPerSecond < 0:
		return fmt.Errorf("%w: replay.bytes_per_second %d is negative", ErrConfig, c.Replay.BytesPerSecond)
	case c.Server.ReadyTimeout <= 0:
		return fmt.Errorf("%w: server.ready_timeout %v must be positive", ErrConfig, c.Server.ReadyTimeout)
	case c.Record.MaxDuration < 0:
		return fmt.Errorf("%w: record.max_duration %v is negative", ErrConfig, c.Record.MaxDuration)
	case c.Server.StopGrace < 0:
		return fmt.Errorf("%w: server.stop_grace %v is negative", ErrConfig, c.Server.StopGrace)
	}
	if err := c.Device.validate(); err != nil {
		return err
	}
	if err := c.Cache.validate(); err != nil {
		return err
	}
	for host := range c.Registry.Credentials {
		if host == "" {
			return fmt.Errorf("%w: registry.credentials has an empty host", ErrConfig)
		}
	}
	if _, err := newMirrorTransport(nil, c.Registry.Mirrors, c.Registry.Insecure, nil); err != nil {
		return err
	}
	return nil
}

// Options turns c into the registry client's options. Credentials for
// hosts it lists come first; other hosts fall back to the docker config.
// With mirrors, pulls go through a transport that tries them first.
func (c RegistryConfig) Options() (registry.Options, error) {
	opts := registry.Options{
		PlainHTTP:       c.Insecure,
		DockerConfigDir: c.DockerConfigDir,
		Platform:        c.Platform,
		RequestTimeout:  c.RequestTimeout,
		MaxRetries:      c.MaxRetries,
		Concurrency:     c.Concurrency,
	}
	if len(c.Credentials) > 0 {
		fallback, err := registry.DockerConfigCredentials(c.DockerConfigDir)
		if err != nil {
			return registry.Options{}, err
		}
		creds := c.Credentials
		opts.Credentials = func(host string) (string, string, error) {
			if cr, ok := creds[host]; ok {
				return cr.Username, cr.Password, nil
			}
			if fallback == nil {
				return "", "", nil
			}
			return fallback(host)
		}
	}
	if len(c.Mirrors) > 0 {
		creds := opts.Credentials
		if creds == nil {
			var err error
			if creds, err = registry.DockerConfigCredentials(c.DockerConfigDir); err != nil {
				return registry.Options{}, err
			}
		}
		t := registryTransport(c.Concurrency)
		t.ResponseHeaderTimeout = c.RequestTimeout
		if t.ResponseHeaderTimeout <= 0 {
			t.ResponseHeaderTimeout = registry.DefaultRequestTimeout
		}
		mt, err := newMirrorTransport(t, c.Mirrors, c.Insecure, creds)
		if err != nil {
			return registry.Options{}, err
		}
		opts.Transport = mt
	}
	return opts, nil
}
