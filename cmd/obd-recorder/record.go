package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/recorder/record"
)

// envOr returns the environment variable name, or def when it is unset, for
// flag defaults that follow ctr's.
func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newRecordCmd() *cobra.Command {
	var (
		address, namespace string
		asJSON             bool
		mounts             []string
		opts               record.Options
	)
	cmd := &cobra.Command{
		Use:   "record --duration 20s [--push] [--insecure] IMAGE NEW_IMAGE [-- CMD ARGS...]",
		Short: "Run an image once, record the blocks it reads at start-up, and make a traced image",
		Long: `record starts a temporary container of IMAGE through containerd and the overlaybd
snapshotter (pulling IMAGE first if containerd lacks it), records the blocks it
reads from the image's device for --duration, until it exits, or until Ctrl-C,
stops it (SIGTERM, then SIGKILL after --stop-grace), and creates NEW_IMAGE in
containerd: IMAGE with the trace as its last layer, replacing any trace layer IMAGE
had. --push pushes NEW_IMAGE to its registry. CMD ARGS replace the image's
entrypoint and command.

The container has its own network namespace with only loopback, unless --net-host.
The container, its task and snapshot and the run's lease are removed at the end.
A first Ctrl-C (or SIGTERM) ends the recording early and still builds the image;
a second one aborts, cleaning up.`,
		Args: recordArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Image, opts.NewImage, opts.Args = args[0], args[1], args[2:]
			for _, m := range mounts {
				mount, err := record.ParseMount(m)
				if err != nil {
					return err
				}
				opts.Mounts = append(opts.Mounts, mount)
			}
			return runRecord(cmd, address, namespace, asJSON, opts)
		},
	}
	fl := cmd.Flags()
	fl.DurationVar(&opts.Duration, "duration", 0, "how long to record the container's start")
	fl.BoolVar(&opts.Push, "push", false, "push NEW_IMAGE to its registry")
	fl.BoolVar(&opts.PlainHTTP, "insecure", false, "use plain HTTP for the registries of IMAGE and NEW_IMAGE")
	fl.StringVarP(&address, "address", "a", envOr("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"), "containerd's socket [$CONTAINERD_ADDRESS]")
	fl.StringVarP(&namespace, "namespace", "n", envOr("CONTAINERD_NAMESPACE", "default"), "containerd namespace [$CONTAINERD_NAMESPACE]")
	fl.StringVar(&opts.Snapshotter, "snapshotter", envOr("CONTAINERD_SNAPSHOTTER", record.DefaultSnapshotter), "the overlaybd snapshotter's name in containerd [$CONTAINERD_SNAPSHOTTER]")
	fl.StringArrayVar(&mounts, "mount", nil, "add a mount to the container: type=bind,src=/host,dst=/ctr,options=rbind:ro (repeatable)")
	fl.BoolVar(&opts.NetHost, "net-host", false, "share the host's network namespace")
	fl.DurationVar(&opts.StopGrace, "stop-grace", record.DefaultStopGrace, "time between SIGTERM and SIGKILL")
	fl.DurationVar(&opts.TraceTimeout, "trace-timeout", record.DefaultTraceTimeout, "how long to wait for the snapshotter's trace")
	fl.StringVar(&opts.TraceDir, "trace-dir", "", "directory for the temporary trace file (default: the system's temporary directory)")
	fl.BoolVar(&asJSON, "json", false, "print the summary as JSON")
	_ = cmd.MarkFlagRequired("duration")
	return cmd
}

// recordArgs accepts IMAGE NEW_IMAGE, then a command only after "--".
func recordArgs(cmd *cobra.Command, args []string) error {
	dash := cmd.ArgsLenAtDash()
	switch {
	case len(args) < 2 || dash >= 0 && dash != 2:
		return errors.New("want IMAGE NEW_IMAGE [-- CMD ARGS...]")
	case dash < 0 && len(args) > 2:
		return fmt.Errorf("unexpected argument %q: put a command after --", args[2])
	}
	return nil
}

func runRecord(cmd *cobra.Command, address, namespace string, asJSON bool, opts record.Options) error {
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	stop := make(chan struct{})
	opts.Stop = stop
	errOut := cmd.ErrOrStderr()
	go handleSignals(ctx, stop, cancel, errOut)

	client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w", address, err)
	}
	defer client.Close()
	if f, ok := errOut.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
		opts.Progress = f
	}
	opts.Stdout, opts.Stderr = errOut, errOut // the container's output is progress too
	sum, err := record.Run(ctx, client, opts)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(sum)
	}
	return sum.WriteText(out)
}

// handleSignals turns the first SIGINT or SIGTERM into an early end of the
// recording and a second into an abort.
func handleSignals(ctx context.Context, stop chan<- struct{}, abort context.CancelFunc, w io.Writer) {
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	select {
	case s := <-sig:
		fmt.Fprintf(w, "%v: ending the recording; again to abort\n", s)
		close(stop)
	case <-ctx.Done():
		return
	}
	select {
	case s := <-sig:
		fmt.Fprintf(w, "%v: aborting, cleaning up\n", s)
		abort()
	case <-ctx.Done():
	}
}
