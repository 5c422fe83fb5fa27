package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/recorder/report"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// newTraceCommand groups the commands that work on trace files.
func newTraceCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "trace",
		Short: "Inspect and convert trace files",
	}
	cmd.AddCommand(newTraceInspectCommand(), newTraceConvertCommand())
	return cmd
}

const traceFileHelp = `TRACE is a trace.pb, an upstream overlaybd binary trace, or a trace layer
(the tar holding them). An upstream binary trace names no layers: give the
image's layer digests, bottom first, with --layer to attach them.`

func newTraceInspectCommand() *cobra.Command {
	var (
		asJSON   bool
		plot     string
		layers   []string
		insecure bool
	)
	cmd := &cobra.Command{
		Use:   "inspect TRACE|IMAGE_REF [--json] [--plot out.png]",
		Short: "Summarise a trace: frames, bytes per layer, time span; optionally plot it",
		Long: `inspect prints a trace's frames, bytes and unique bytes per layer, and the time
span of the first accesses. With --plot it also draws a PNG: each frame's byte
range in its layer over time, and the bytes recorded so far.

` + traceFileHelp + `

An argument that is not an existing file is taken as an image reference: the
trace layer of that image is read from its registry (--insecure for plain HTTP).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ls, err := parseLayerFlags(layers)
			if err != nil {
				return err
			}
			t, err := readTraceArg(cmd.Context(), args[0], ls, insecure)
			if err != nil {
				return err
			}
			s := report.Summarize(t)
			if plot != "" {
				if err := report.SavePNG(plot, t, report.PlotOptions{}); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(s)
			}
			return s.WriteText(out)
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&asJSON, "json", false, "print the summary as JSON")
	fl.StringVar(&plot, "plot", "", "also draw the trace as a PNG into this file")
	fl.StringArrayVar(&layers, "layer", nil, "layer digest for a binary trace, bottom first (repeatable)")
	fl.BoolVar(&insecure, "insecure", false, "use plain HTTP for an IMAGE_REF's registry")
	return cmd
}

// readTraceArg reads a trace file, or the trace layer of an image when arg
// names no file.
func readTraceArg(ctx context.Context, arg string, layers []trace.Layer, insecure bool) (*trace.Trace, error) {
	if _, err := os.Stat(arg); err == nil || strings.HasPrefix(arg, "/") || strings.HasPrefix(arg, ".") {
		return recorder.ReadTraceFile(arg, layers)
	}
	named, err := reference.ParseDockerRef(arg)
	if err != nil {
		return nil, fmt.Errorf("%s: neither a file nor an image reference: %w", arg, err)
	}
	opts := registry.Options{}
	if insecure {
		opts.PlainHTTP = []string{reference.Domain(named)}
	}
	client, err := registry.New(opts)
	if err != nil {
		return nil, err
	}
	store, err := client.Store(arg)
	if err != nil {
		return nil, err
	}
	t, _, err := image.ReadTraceLayer(ctx, store, named.String())
	return t, err
}

func newTraceConvertCommand() *cobra.Command {
	var (
		to     string
		layers []string
	)
	cmd := &cobra.Command{
		Use:   "convert --to pb|obd IN OUT",
		Short: "Convert a trace between trace.pb and upstream's binary format",
		Long: `convert reads IN and writes it to OUT as trace.pb (--to pb) or as upstream
overlaybd's binary trace (--to obd, which keeps only the ranges and their order).
OUT appears only when complete (temporary file, fsync, rename).

` + traceFileHelp + `

Converting a binary trace to trace.pb needs --layer: trace.pb names every layer.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ls, err := parseLayerFlags(layers)
			if err != nil {
				return err
			}
			t, err := recorder.ReadTraceFile(args[0], ls)
			if err != nil {
				return err
			}
			if err := recorder.WriteTraceFile(args[1], t, recorder.Format(to)); err != nil {
				return fmt.Errorf("convert %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %d frames to %s (%s)\n", len(t.Frames), args[1], to)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&to, "to", "", "output format: pb (trace.pb) or obd (upstream binary)")
	fl.StringArrayVar(&layers, "layer", nil, "layer digest for a binary trace, bottom first (repeatable)")
	_ = cmd.MarkFlagRequired("to")
	return cmd
}

// parseLayerFlags turns --layer digests into trace layers (sizes unknown).
func parseLayerFlags(flags []string) ([]trace.Layer, error) {
	if len(flags) == 0 {
		return nil, nil
	}
	layers := make([]trace.Layer, len(flags))
	for i, f := range flags {
		d, err := digest.Parse(f)
		if err != nil {
			return nil, fmt.Errorf("--layer %q: %w", f, err)
		}
		layers[i] = trace.Layer{Digest: d}
	}
	return layers, nil
}
