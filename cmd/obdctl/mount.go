package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Defaults for where a mount keeps its data.
const (
	defaultCacheDir  = "/var/lib/obdtrace/cache"
	defaultBaselayer = "/opt/obdtrace/baselayers/ext4_64"
)

type mountFlags struct {
	insecure    bool
	foreground  bool
	cacheDir    string
	cacheMax    int64
	baselayer   string
	stateRoot   string
	metricsAddr string
	statsFile   string
	traceFile   string
	recordFor   time.Duration
	noReplay    bool
	fullFetch   bool
	replayBPS   int64
	workers     int
	readAheadKB int
	readyWait   time.Duration
}

func newMountCommand() *cobra.Command {
	var f mountFlags
	cmd := &cobra.Command{
		Use:   "mount [--insecure] IMAGE_REF DIR",
		Short: "Mount an overlaybd image's filesystem read-only, fetching blocks from the registry on demand",
		Long: "Mount an overlaybd image's filesystem read-only at DIR. Only the blocks that are read are\n" +
			"fetched, through an on-disk cache. The image is served by a background process that keeps\n" +
			"running after this command returns (--foreground keeps it attached); `obdctl umount DIR`\n" +
			"stops it. A trace (the image's trace layer, or --trace FILE) is replayed at mount.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, dir := args[0], args[1]
			if st, err := os.Stat(dir); err != nil || !st.IsDir() {
				return fmt.Errorf("mount point %s: not a directory", dir)
			}
			tuning, err := device.WithReadAhead(f.readAheadKB)
			if err != nil {
				return fmt.Errorf("--readahead-kb: %w", err)
			}
			if !f.foreground {
				return spawnServer(cmd, dir, f.stateRoot, f.readyWait)
			}
			cfg := backstore.Config{
				Ref: ref, Mountpoint: dir, StateRoot: f.stateRoot,
				CacheDir: f.cacheDir, CacheMaxBytes: f.cacheMax, Baselayer: f.baselayer,
				Registry:    registry.Options{},
				MetricsAddr: f.metricsAddr, StatsFile: f.statsFile,
				TraceFile: f.traceFile, RecordDuration: f.recordFor, NoReplay: f.noReplay,
				Replay:       replayer.Options{Workers: f.workers, FullFetch: f.fullFetch, BytesPerSecond: f.replayBPS},
				DeviceTuning: tuning,
				Logger:       *zerolog.Ctx(cmd.Context()),
				Ready:        func(backstore.State) { backstore.NotifyReady(nil) },
			}
			if f.insecure {
				host, err := registryHost(ref)
				if err != nil {
					return err
				}
				cfg.Registry.PlainHTTP = []string{host}
			}
			err = backstore.Serve(cmd.Context(), cfg)
			if err != nil {
				backstore.NotifyReady(err)
			}
			return err
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&f.insecure, "insecure", false, "use plain HTTP for the image's registry")
	fl.BoolVar(&f.foreground, "foreground", false, "serve in this process instead of a background one")
	fl.StringVar(&f.cacheDir, "cache-dir", defaultCacheDir, "blob cache directory")
	fl.Int64Var(&f.cacheMax, "cache-max-bytes", 0, "bound on cached data, in bytes (0 = none)")
	fl.StringVar(&f.baselayer, "baselayer", defaultBaselayer, "upstream's ext4 baselayer, for images converted onto it")
	fl.StringVar(&f.stateRoot, "state-root", backstore.DefaultStateRoot, "where mounts keep their state")
	fl.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics at this address (e.g. 127.0.0.1:9810)")
	fl.StringVar(&f.statsFile, "stats-file", "", "write stats JSON here (default: in the mount's state directory)")
	fl.StringVar(&f.traceFile, "trace", "", "trace file, by upstream's rules: an existing empty file records into it (eBPF, until unmount,\n--record-duration or the deletion of FILE.lock; FILE.ok when written); a non-empty one is replayed")
	fl.DurationVar(&f.recordFor, "record-duration", 0, "stop recording after this long (0 = at unmount)")
	fl.BoolVar(&f.noReplay, "no-replay", false, "do not replay any trace")
	fl.BoolVar(&f.fullFetch, "full-fetch", false, "after the trace, fetch the rest of every layer in the background")
	fl.Int64Var(&f.replayBPS, "replay-bytes-per-second", 0, "cap on replay bandwidth (0 = none)")
	fl.IntVar(&f.workers, "replay-workers", replayer.DefaultWorkers, "concurrent prefetch ranges")
	fl.IntVar(&f.readAheadKB, "readahead-kb", 0, "readahead of the device's FUSE file in KiB, a multiple of 4 (0 = the default, 128;\n1024 reads a cached image faster, more fetches bytes ahead over a slow link)")
	fl.DurationVar(&f.readyWait, "ready-timeout", 2*time.Minute, "how long to wait for the background server")
	return cmd
}

// spawnServer re-runs this command in the foreground as a detached server
// and waits for it to mount.
func spawnServer(cmd *cobra.Command, dir, stateRoot string, wait time.Duration) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	stateDir, err := backstore.StateDir(stateRoot, dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	argv := append([]string{self}, os.Args[1:]...)
	argv = append(argv, "--foreground", "--log-format", "json")
	logPath := filepath.Join(stateDir, "server.log")
	if err := backstore.Spawn(cmd.Context(), argv, logPath, wait); err != nil {
		return err
	}
	s, _, err := backstore.ReadState(stateRoot, dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "mounted %s at %s (device %s, server pid %d, stats %s)\n", s.Ref, s.Mountpoint, s.Device, s.PID, s.StatsFile)
	return nil
}

func newUmountCommand() *cobra.Command {
	var stateRoot string
	var grace time.Duration
	cmd := &cobra.Command{
		Use:   "umount DIR",
		Short: "Unmount an image mounted by obdctl mount and stop its server",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return backstore.Teardown(cmd.Context(), stateRoot, args[0], grace)
		},
	}
	cmd.Flags().StringVar(&stateRoot, "state-root", backstore.DefaultStateRoot, "where mounts keep their state")
	cmd.Flags().DurationVar(&grace, "grace", 10*time.Second, "how long the server may take to stop before it is killed")
	return cmd
}
