// Command obdctl works with overlaybd images: inspect and export layer blobs,
// and (as the project grows) mount, convert and pull images.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/internal/logging"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "obdctl:", err)
		os.Exit(1)
	}
}

// globalFlags are the flags every subcommand shares.
type globalFlags struct {
	logLevel  string
	logFormat string
}

func newRootCommand() *cobra.Command {
	var g globalFlags
	root := &cobra.Command{
		Use:           "obdctl",
		Short:         "Work with overlaybd images and layer blobs",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logging.New(logging.Options{Level: g.logLevel, Format: g.logFormat})
			if err != nil {
				return err
			}
			cmd.SetContext(log.WithContext(cmd.Context()))
			return nil
		},
	}
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().StringVar(&g.logFormat, "log-format", "auto", "log format: json, console, auto (console on a terminal)")
	root.AddCommand(newLayerCommand(), newMountCommand(), newUmountCommand(), newConvertCommand(), newRPullCommand(), newWANProxyCommand())
	return root
}
