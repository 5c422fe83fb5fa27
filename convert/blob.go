package convert

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

// commitFileName is the name upstream gives a layer blob's one tar entry.
const commitFileName = "overlaybd.commit"

// commitLayer writes the blob of a converted layer into dir: the blocks of
// disk that differ from base over candidates, committed as an LSMT layer,
// compressed as upstream's converter does (ZFile, by default LZ4 with 4 KiB
// blocks and CRCs; the header rewritten at the end) and wrapped in the PAX
// tar header its commit tool writes. It returns the blob's path and
// descriptor.
func commitLayer(dir string, disk, base io.ReaderAt, candidates []lsmt.Segment, args lsmt.CommitArgs, zopts zfile.Options) (cachedBlob, lsmt.ChangeStats, error) {
	zf, err := os.CreateTemp(dir, "zfile-*")
	if err != nil {
		return cachedBlob{}, lsmt.ChangeStats{}, fmt.Errorf("convert: %w", err)
	}
	defer func() {
		zf.Close()
		os.Remove(zf.Name())
	}()
	zw, err := zfile.NewWriter(zf, zopts)
	if err != nil {
		return cachedBlob{}, lsmt.ChangeStats{}, fmt.Errorf("convert: %w", err)
	}
	st, err := lsmt.CommitChanges(zw, disk, base, candidates, args)
	if err != nil {
		return cachedBlob{}, st, fmt.Errorf("convert: commit layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return cachedBlob{}, st, fmt.Errorf("convert: compress layer: %w", err)
	}
	size, err := zf.Seek(0, io.SeekEnd)
	if err != nil {
		return cachedBlob{}, st, fmt.Errorf("convert: %w", err)
	}
	if _, err := zf.Seek(0, io.SeekStart); err != nil {
		return cachedBlob{}, st, fmt.Errorf("convert: %w", err)
	}
	b, err := writeBlob(dir, func(w io.Writer) error {
		return tarwrap.Write(w, commitFileName, bufio.NewReaderSize(zf, 1<<20), size)
	})
	return b, st, err
}

// baselayerBlob wraps the baselayer file as upstream's converter uploads
// it: one plain ustar entry named overlaybd.commit, mode 0444.
func baselayerBlob(dir, path string) (cachedBlob, error) {
	f, err := os.Open(path)
	if err != nil {
		return cachedBlob{}, fmt.Errorf("convert: baselayer: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return cachedBlob{}, fmt.Errorf("convert: baselayer: %w", err)
	}
	return writeBlob(dir, func(w io.Writer) error {
		return tarwrap.Write(w, commitFileName, bufio.NewReaderSize(f, 1<<20), st.Size(), tarwrap.WithFormat(tarwrap.FormatUSTAR))
	})
}

// writeBlob writes a blob with write into a new file in dir and describes
// it as an overlaybd layer.
func writeBlob(dir string, write func(io.Writer) error) (cachedBlob, error) {
	f, err := os.CreateTemp(dir, "blob-*")
	if err != nil {
		return cachedBlob{}, fmt.Errorf("convert: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	bw := bufio.NewWriterSize(cw, 1<<20)
	if err := write(bw); err != nil {
		return cachedBlob{}, fmt.Errorf("convert: write blob: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return cachedBlob{}, fmt.Errorf("convert: write blob: %w", err)
	}
	if err := f.Close(); err != nil {
		return cachedBlob{}, fmt.Errorf("convert: write blob: %w", err)
	}
	ok = true
	d := digest.NewDigest(digest.SHA256, h)
	return cachedBlob{Path: f.Name(), Desc: layerDescriptor(d, cw.n)}, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// openBlob opens a layer blob file for stacking; closing it closes the file.
func openBlob(path string) (*openedBlob, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("convert: %w", err)
	}
	b, err := lsmt.OpenBlob(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("convert: %s: %w", path, err)
	}
	return &openedBlob{Blob: b, f: f}, nil
}

type openedBlob struct {
	*lsmt.Blob
	f *os.File
}

func (b *openedBlob) Close() error {
	b.Blob.Close()
	return b.f.Close()
}

// checkZFileOptions refuses compression settings that neither this project
// nor upstream reads, before any layer is built.
func checkZFileOptions(o zfile.Options) error {
	switch o.Algorithm {
	case zfile.MiniLZO, zfile.LZ4, zfile.ZSTD: // MiniLZO, the zero value, means LZ4
	default:
		return fmt.Errorf("%w: compression %v: want lz4 or zstd", ErrOptions, o.Algorithm)
	}
	if bs := o.BlockSize; bs != 0 && (bs < 4<<10 || bs > 64<<10 || bs&(bs-1) != 0) {
		return fmt.Errorf("%w: ZFile block size %d: want a power of two from 4 KiB to 64 KiB", ErrOptions, bs)
	}
	if o.Level < 0 || o.Level > 22 {
		return fmt.Errorf("%w: zstd level %d: want 1 to 22 (0 for the default, 3)", ErrOptions, o.Level)
	}
	return nil
}

// zfileKey is the part of a layer's cache key that says how it was
// compressed: blobs built with other settings must not be reused, and
// options that write the same blob share a key.
func zfileKey(o zfile.Options) string {
	o = normalZFile(o)
	if o == normalZFile(zfile.Options{}) {
		return "" // upstream's settings: keep the keys of existing caches
	}
	return fmt.Sprintf(" zfile=%v/%d/%d/%t", o.Algorithm, o.BlockSize, o.Level, o.NoVerify)
}

// normalZFile spells out the zero values of o the way zfile.Writer reads
// them, so that equal settings compare equal; the zstd level keeps 0 for
// its default (3), as cache keys written before have it.
func normalZFile(o zfile.Options) zfile.Options {
	if o.Algorithm == zfile.MiniLZO {
		o.Algorithm = zfile.LZ4
	}
	if o.BlockSize == 0 {
		o.BlockSize = 4 << 10
	}
	switch {
	case o.Algorithm == zfile.LZ4:
		o.Level = 0 // not used by LZ4
	case o.Level == 3:
		o.Level = 0
	}
	return o
}
