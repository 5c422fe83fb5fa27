// Command obd-snapshotter is the containerd proxy snapshotter for overlaybd
// images (see docs/snapshotter.md): it serves containerd's snapshot API on a
// unix socket and runs one backstore server per image in use, as separate
// processes started from this same executable (`serve-image`).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/internal/logging"
	"github.com/obdtrace/obdtrace/internal/metricsrv"
	"github.com/obdtrace/obdtrace/snapshotter"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "obd-snapshotter:", err)
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	var configFile string
	root := &cobra.Command{
		Use:   "obd-snapshotter [--config FILE] [--root DIR] [--address SOCKET]",
		Short: "containerd proxy snapshotter for overlaybd images, with trace replay",
		Long: "obd-snapshotter serves containerd's snapshot API on a unix socket. Register it in\n" +
			"containerd's config as [proxy_plugins.overlaybd] (type \"snapshot\"). Settings come from\n" +
			"the config file, then OBD_* environment variables (OBD_ROOT, OBD_REGISTRY_INSECURE, ...),\n" +
			"then flags; docs/snapshotter.md lists them.",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(configFile, cmd.Flags())
			if err != nil {
				return err
			}
			return run(cmd.Context(), cfg)
		},
	}
	fl := root.PersistentFlags()
	fl.StringVar(&configFile, "config", "", "config file (YAML, TOML or JSON; default "+defaultConfigDir+"/snapshotter.*, if present)")
	fl.String("root", snapshotter.DefaultRoot, "directory of the metadata and snapshots")
	fl.String("address", snapshotter.DefaultAddress, "unix socket to serve containerd on")
	fl.String("log-level", "info", "log level: debug, info, warn, error")
	fl.String("log-format", "auto", "log format: json, console, auto (console on a terminal)")
	root.Flags().String("metrics-address", "", "serve Prometheus metrics at this address (e.g. 127.0.0.1:9863)")
	root.AddCommand(newServeImageCommand(), newStopServersCommand(&configFile))
	return root
}

func newLogger(cfg snapshotter.Config) (zerolog.Logger, error) {
	return logging.New(logging.Options{Level: cfg.LogLevel, Format: cfg.LogFormat})
}

func run(ctx context.Context, cfg snapshotter.Config) error {
	log, err := newLogger(cfg)
	if err != nil {
		return err
	}
	sn, err := snapshotter.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer sn.Close()
	if cfg.MetricsAddress != "" {
		stop, err := serveMetrics(cfg.MetricsAddress, sn, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	ln, err := snapshotter.Listen(cfg.Address)
	if err != nil {
		return err
	}
	log.Info().Str("address", cfg.Address).Str("root", cfg.Root).Msg("serving containerd")
	err = snapshotter.Serve(ctx, ln, sn)
	log.Info().Msg("stopped (image servers keep running)")
	return err
}

func serveMetrics(addr string, sn *snapshotter.Snapshotter, log zerolog.Logger) (func(), error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, c := range sn.Collectors() {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	_, stop, err := metricsrv.Serve(addr, reg, log)
	if err != nil {
		return nil, err
	}
	return func() { stop() }, nil
}

func newServeImageCommand() *cobra.Command {
	var specPath string
	cmd := &cobra.Command{
		Use:    "serve-image --spec FILE",
		Short:  "Serve one image's device (started by the snapshotter, not by hand)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			spec, err := snapshotter.ReadServerSpec(specPath)
			if err != nil {
				return err
			}
			log, err := logging.New(logging.Options{Level: spec.LogLevel, Format: "json", Out: os.Stdout})
			if err != nil {
				return err
			}
			return snapshotter.RunServer(cmd.Context(), spec, log)
		},
	}
	cmd.Flags().StringVar(&specPath, "spec", "", "server spec written by the snapshotter")
	cmd.MarkFlagRequired("spec")
	return cmd
}

func newStopServersCommand(configFile *string) *cobra.Command {
	return &cobra.Command{
		Use:   "stop-servers",
		Short: "Tear down every image server of a stopped snapshotter (before removing its root)",
		Long: "Image servers outlive the snapshotter on purpose, so that a restart does not break running\n" +
			"containers. When the snapshotter is stopped for good, this unmounts every image it served and\n" +
			"stops the servers. Containers still running on those images lose their files.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(*configFile, cmd.Flags())
			if err != nil {
				return err
			}
			log, err := newLogger(cfg)
			if err != nil {
				return err
			}
			return snapshotter.StopServers(cmd.Context(), cfg, log)
		},
	}
}
