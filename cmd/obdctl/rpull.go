package main

import (
	"fmt"
	"os"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/snapshotter/rpull"
)

// envOr returns the environment variable name, or def when it is unset, for
// flag defaults that follow ctr's.
func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newRPullCommand() *cobra.Command {
	var (
		address, namespace string
		opts               rpull.Options
	)
	cmd := &cobra.Command{
		Use:   "rpull [--address SOCKET] [--namespace NS] [--insecure] IMAGE_REF",
		Short: "Pull an image through containerd for the overlaybd snapshotter, without downloading its layers",
		Long: "Pull an image through containerd, unpacking it into a remote snapshotter (overlaybd by\n" +
			"default): each layer's annotations, the image reference and the manifest digest are passed\n" +
			"to the snapshotter as labels, so overlaybd layers are committed without being downloaded and\n" +
			"are read on demand when a container runs. Ordinary layers are downloaded as usual.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace))
			if err != nil {
				return fmt.Errorf("connect to containerd at %s: %w", address, err)
			}
			defer client.Close()
			if f, ok := cmd.ErrOrStderr().(*os.File); ok && isatty.IsTerminal(f.Fd()) {
				opts.Progress = f
			}
			res, err := rpull.Pull(cmd.Context(), client, args[0], opts)
			if err != nil {
				return err
			}
			if opts.Progress == nil {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %d layers, %d downloaded\n", res.Image.Name(), res.Layers, res.Downloaded)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&address, "address", "a", envOr("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"), "containerd's socket [$CONTAINERD_ADDRESS]")
	fl.StringVarP(&namespace, "namespace", "n", envOr("CONTAINERD_NAMESPACE", "default"), "containerd namespace [$CONTAINERD_NAMESPACE]")
	fl.StringVar(&opts.Snapshotter, "snapshotter", envOr("CONTAINERD_SNAPSHOTTER", rpull.DefaultSnapshotter), "snapshotter to unpack into [$CONTAINERD_SNAPSHOTTER]")
	fl.BoolVar(&opts.PlainHTTP, "insecure", false, "use plain HTTP for the registry")
	fl.StringVar(&opts.Platform, "platform", "", "platform of a multi-platform image (default: this host's)")
	fl.BoolVar(&opts.FullFetch, "download-blobs", false, "fetch the whole image in the background once a container starts, not just what it reads")
	return cmd
}
