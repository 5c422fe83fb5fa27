package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/lsmt"
)

func newLayerCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "layer",
		Short: "Inspect and export overlaybd layer blobs",
	}
	cmd.AddCommand(newLayerInspectCommand(), newLayerExportCommand())
	return cmd
}

func newLayerInspectCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect BLOB",
		Short: "Show a layer blob's wrappers, ZFile and LSMT header fields and index statistics",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, size, closeBlob, err := openBlob(args[0])
			if err != nil {
				return err
			}
			defer closeBlob()
			info := b.Info(size)
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(info)
			}
			return printInfo(cmd.OutOrStdout(), args[0], info)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printInfo(out io.Writer, name string, info lsmt.BlobInfo) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "blob:\t%s (%d bytes)\n", name, info.Size)
	fmt.Fprintf(w, "wrappers:\t%s\n", strings.Join(info.Wrappers, " -> "))
	if t := info.Tar; t != nil {
		fmt.Fprintf(w, "tar payload:\t%d bytes at offset %d\n", t.PayloadSize, t.PayloadOffset)
	}
	if z := info.ZFile; z != nil {
		fmt.Fprintf(w, "zfile:\t%s, %d-byte blocks, %d blocks, verify %v\n", z.Algorithm, z.BlockSize, z.Blocks, z.Verify)
		fmt.Fprintf(w, "zfile flags:\theader %s, trailer %s\n", z.HeaderFlags, orNone(z.TrailerFlags))
		fmt.Fprintf(w, "zfile sizes:\t%d bytes uncompressed, jump table at %d\n", z.OriginalSize, z.IndexOffset)
	}
	l := info.LSMT
	fmt.Fprintf(w, "lsmt flags:\theader %#x, trailer %#x\n", l.HeaderFlags, l.TrailerFlags)
	fmt.Fprintf(w, "uuid:\t%s\n", l.UUID)
	fmt.Fprintf(w, "parent uuid:\t%s\n", l.ParentUUID)
	fmt.Fprintf(w, "version:\t%s\n", l.Version)
	if l.UserTag != "" {
		fmt.Fprintf(w, "user tag:\t%q\n", l.UserTag)
	}
	fmt.Fprintf(w, "virtual size:\t%d bytes (%s)\n", l.VirtualSize, humanBytes(l.VirtualSize))
	fmt.Fprintf(w, "index:\t%d entries stored at %d, %d segments (%d zeroed)\n",
		l.IndexEntries, l.IndexOffset, l.Segments, l.ZeroedSegments)
	fmt.Fprintf(w, "data:\t%d bytes (%s) in a %d-byte layer\n", l.DataBytes, humanBytes(l.DataBytes), l.LayerBytes)
	return w.Flush()
}

func orNone(s string) string {
	if s == "" {
		return "(none: header carries the layout)"
	}
	return s
}

func newLayerExportCommand() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "export --out DISK BLOB...",
		Short: "Merge layer blobs (bottom first) and write the virtual disk as a sparse file",
		Long: "Merge layer blobs, bottom first, and write the merged virtual disk to DISK as a sparse\n" +
			"file: holes stay holes, so standard tools (debugfs, fsck.ext4 -n, a loop mount) can look\n" +
			"into the image. An image converted onto the baselayer needs the baselayer first.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			layers := make([]lsmt.StackLayer, 0, len(args))
			for _, path := range args {
				b, _, closeBlob, err := openBlob(path)
				if err != nil {
					return err
				}
				defer closeBlob()
				layers = append(layers, b)
			}
			stack, err := lsmt.NewStack(layers)
			if err != nil {
				return err
			}
			progress := newProgress(cmd.ErrOrStderr())
			written, err := lsmt.Export(cmd.Context(), out, stack, progress.update)
			progress.done()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s: %s virtual disk, %s of data\n",
				out, humanBytes(stack.VirtualSize()), humanBytes(written))
			return nil
		},
	}
	cmd.Flags().StringVarP(&out, "out", "o", "", "the sparse disk file to write")
	return cmd
}

// openBlob opens a layer blob file.
func openBlob(path string) (*lsmt.Blob, int64, func(), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, nil, err
	}
	b, err := lsmt.OpenBlob(f, st.Size())
	if err != nil {
		f.Close()
		return nil, 0, nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, st.Size(), func() { b.Close(); f.Close() }, nil
}

// progress prints a one-line progress indicator on a terminal, nothing
// elsewhere.
type progress struct {
	out  io.Writer
	tty  bool
	last int
}

func newProgress(w io.Writer) *progress {
	f, ok := w.(*os.File)
	return &progress{out: w, tty: ok && isatty.IsTerminal(f.Fd()), last: -1}
}

func (p *progress) update(done, total int64) {
	if !p.tty || total == 0 {
		return
	}
	if pct := int(done * 100 / total); pct != p.last {
		p.last = pct
		fmt.Fprintf(p.out, "\r%3d%%  %s of %s", pct, humanBytes(done), humanBytes(total))
	}
}

func (p *progress) done() {
	if p.tty && p.last >= 0 {
		fmt.Fprintln(p.out)
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
