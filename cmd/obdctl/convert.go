package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/convert"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

type convertFlags struct {
	insecure    bool
	mkfs        bool
	vsizeGiB    int64
	baselayer   string
	cacheDir    string
	workDir     string
	concurrency int
	asJSON      bool
	compression string
	blockKiB    int
	zstdLevel   int
}

func newConvertCommand() *cobra.Command {
	var f convertFlags
	cmd := &cobra.Command{
		Use:   "convert [--insecure] SRC DST",
		Short: "Convert an OCI image into an overlaybd image",
		Long: "Convert the OCI image SRC into an overlaybd image stored as DST. Each is a registry\n" +
			"reference (host/repo:tag, optionally docker://) or an OCI image layout, oci:DIR[:TAG].\n" +
			"Every layer is applied to an ext4 filesystem (on upstream's baselayer, or one made by\n" +
			"--mkfs) and its changed blocks are committed as upstream's converter does. Converted\n" +
			"layers are cached by chain id in --cache-dir, and the same input always gives the same\n" +
			"digests. A multi-platform index is converted per platform. Needs root (loop devices,\n" +
			"FUSE, mount).",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := f.options(cmd, args)
			if err != nil {
				return err
			}
			c, err := convert.New(opts)
			if err != nil {
				return err
			}
			res, err := c.Convert(cmd.Context(), args[0], args[1])
			if err != nil {
				return err
			}
			if f.asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			return printConvertResult(cmd.OutOrStdout(), args[1], res)
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&f.insecure, "insecure", false, "use plain HTTP for the registries of SRC and DST")
	fl.BoolVar(&f.mkfs, "mkfs", false, "make the filesystem in the first layer instead of using the baselayer")
	fl.Int64Var(&f.vsizeGiB, "vsize", convert.DefaultVirtualSize>>30, "virtual disk size in GiB (with --mkfs)")
	fl.StringVar(&f.baselayer, "baselayer", convert.DefaultBaselayer, "upstream's ext4 baselayer blob (ext4_64)")
	fl.StringVar(&f.cacheDir, "cache-dir", convert.DefaultCacheDir, "where converted layers are cached, by chain id")
	fl.StringVar(&f.workDir, "work-dir", "", "where layers are built (about the image's unpacked size; default $TMPDIR)")
	fl.IntVar(&f.concurrency, "concurrency", convert.DefaultConcurrency, "blob downloads and uploads in flight")
	fl.BoolVar(&f.asJSON, "json", false, "print the result as JSON")
	fl.StringVar(&f.compression, "compression", "lz4", "ZFile block compression of the layer blobs: lz4 (upstream's default) or zstd (about 0.67-0.71x the bytes on the wire with 16-64 KiB blocks)")
	fl.IntVar(&f.blockKiB, "block-size", 4, "ZFile block size in KiB: 4, 8, 16, 32 or 64 (larger blocks compress better, a miss fetches more)")
	fl.IntVar(&f.zstdLevel, "zstd-level", 0, "zstd level, 1 to 22 (0: 3, upstream's)")
	return cmd
}

func (f *convertFlags) options(cmd *cobra.Command, args []string) (convert.Options, error) {
	opts := convert.Options{
		Mkfs:        f.mkfs,
		VirtualSize: f.vsizeGiB << 30,
		CacheDir:    f.cacheDir,
		WorkDir:     f.workDir,
		Concurrency: f.concurrency,
		Logger:      *zerolog.Ctx(cmd.Context()),
	}
	alg, err := zfile.ParseAlgorithm(f.compression)
	if err != nil {
		return opts, fmt.Errorf("--compression: %w", err)
	}
	if alg != zfile.ZSTD && f.zstdLevel != 0 {
		return opts, fmt.Errorf("--zstd-level %d: only with --compression zstd", f.zstdLevel)
	}
	opts.ZFile = zfile.Options{Algorithm: alg, BlockSize: f.blockKiB << 10, Level: f.zstdLevel}
	if !f.mkfs {
		opts.Baselayer = f.baselayer
	}
	if f.vsizeGiB <= 0 {
		return opts, fmt.Errorf("--vsize %d: want a positive number of GiB", f.vsizeGiB)
	}
	if f.insecure {
		for _, a := range args {
			loc, err := convert.ParseLocation(a)
			if err != nil {
				return opts, err
			}
			if h := loc.Host(); h != "" {
				opts.PlainHTTP = append(opts.PlainHTTP, h)
			}
		}
	}
	if out, ok := cmd.ErrOrStderr().(*os.File); ok && isatty.IsTerminal(out.Fd()) {
		opts.Progress = out
	}
	return opts, nil
}

func printConvertResult(out io.Writer, dst string, res *convert.Result) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "%s:\t%s\n", dst, res.Desc.Digest)
	for _, img := range res.Images {
		platform := "-"
		if p := img.Platform; p != nil {
			platform = p.OS + "/" + p.Architecture
			if p.Variant != "" {
				platform += "/" + p.Variant
			}
		}
		fmt.Fprintf(w, "manifest %s:\t%s (config %s)\n", platform, img.Manifest.Digest, img.Config.Digest)
		for i, l := range img.Layers {
			how := "converted"
			switch {
			case l.Source == "":
				how = "baselayer"
			case l.Cached:
				how = "cached"
			}
			fmt.Fprintf(w, "  layer %d:\t%s\t%d bytes\t%s\n", i, l.Desc.Digest, l.Desc.Size, how)
		}
	}
	return w.Flush()
}
