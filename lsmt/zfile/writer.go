package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"

	"github.com/obdtrace/obdtrace/internal/crc32c"
)

// flushAt is how much compressed output the Writer gathers before handing it
// to the underlying writer, so small blocks do not each cost a write call.
const flushAt = 256 << 10

// Options configure a Writer. The zero value gives upstream's converter
// settings: LZ4, 4 KiB blocks, a CRC after every block.
type Options struct {
	// Algorithm is LZ4 or ZSTD; zero (upstream's unsupported MiniLZO) means LZ4.
	Algorithm Algorithm
	// BlockSize is a power of two from 4 KiB to 64 KiB; zero means 4 KiB.
	BlockSize int
	// NoVerify omits the per-block CRCs (upstream writes them by default).
	NoVerify bool
	// Level is the ZSTD level in zstd's own numbering; zero means 3, the
	// level upstream always uses. It is ignored for LZ4 and, as upstream
	// does, not recorded in the header.
	Level int
}

// Writer compresses a stream into a ZFile.
//
// Upstream's converter writes a header first, then after the trailer
// rewrites the header with the final layout (flags 0x1B: header, data file,
// header carries the trailer's fields, digest); its trailer has flags 0x16.
// Writer does the same when the underlying writer can seek (an io.Seeker
// whose Seek succeeds, rewriting through io.WriterAt when available).
// Otherwise the header keeps flags 0x13 and zero index fields, and readers
// take the layout from the trailer at the end, which both this package and
// upstream do.
type Writer struct {
	w    io.Writer
	hdr  Header
	bs   int
	lz4  *lz4.CompressorCCompat
	zstd *zstd.Encoder

	pending []byte   // the current partial block
	out     []byte   // compressed bytes not yet handed to w
	lens    []uint32 // stored length of each block written so far
	written int64    // bytes handed to w, from the start of the header
	rawSize uint64

	seekable bool
	start    int64 // position of the header in w when seekable

	err    error // sticky: the first failure ends the stream
	closed bool
}

// NewWriter writes a ZFile header to w and returns a Writer for the
// uncompressed contents. Close completes the file; it does not close w.
func NewWriter(w io.Writer, opts Options) (*Writer, error) {
	if opts.Algorithm == MiniLZO {
		opts.Algorithm = LZ4
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = minBlockSize
	}
	hdr := Header{
		Flags:     FlagHeader | FlagDataFile | FlagDigest,
		BlockSize: uint32(opts.BlockSize),
		Algorithm: opts.Algorithm,
		Verify:    !opts.NoVerify,
	}
	if opts.BlockSize < 0 || opts.BlockSize > maxBlockSize {
		return nil, fmt.Errorf("zfile: block size %d outside %d..%d", opts.BlockSize, minBlockSize, maxBlockSize)
	}
	if err := hdr.checkOptions(); err != nil {
		return nil, err
	}
	zw := &Writer{w: w, hdr: hdr, bs: opts.BlockSize}
	switch opts.Algorithm {
	case LZ4:
		zw.lz4 = new(lz4.CompressorCCompat)
	case ZSTD:
		level := opts.Level
		if level == 0 {
			level = 3
		}
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(level)),
			zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false))
		if err != nil {
			return nil, fmt.Errorf("zfile: create zstd encoder: %w", err)
		}
		zw.zstd = enc
	}
	if s, ok := w.(io.Seeker); ok {
		if pos, err := s.Seek(0, io.SeekCurrent); err == nil {
			zw.seekable, zw.start = true, pos
		}
	}
	zw.pending = make([]byte, 0, zw.bs)
	zw.out = append(make([]byte, 0, flushAt+maxStoredLen(zw.bs)), hdr.marshal()[:]...)
	if err := zw.flush(); err != nil {
		return nil, err
	}
	return zw, nil
}

// Write compresses p, a block at a time; a partial block waits for more
// data or Close.
func (zw *Writer) Write(p []byte) (int, error) {
	if zw.closed {
		return 0, errors.New("zfile: write after close")
	}
	if zw.err != nil {
		return 0, zw.err
	}
	total := len(p)
	if len(zw.pending) > 0 {
		k := min(zw.bs-len(zw.pending), len(p))
		zw.pending = append(zw.pending, p[:k]...)
		p = p[k:]
		if len(zw.pending) == zw.bs {
			if err := zw.compressBlock(zw.pending); err != nil {
				return 0, err
			}
			zw.pending = zw.pending[:0]
		}
	}
	// Whole blocks compress straight from the caller's buffer.
	for len(p) >= zw.bs {
		if err := zw.compressBlock(p[:zw.bs]); err != nil {
			return total - len(p), err
		}
		p = p[zw.bs:]
	}
	zw.pending = append(zw.pending, p...)
	zw.rawSize += uint64(total)
	return total, nil
}

// compressBlock appends src's compressed block and CRC to the output.
func (zw *Writer) compressBlock(src []byte) error {
	start := len(zw.out)
	switch zw.hdr.Algorithm {
	case LZ4:
		bound := lz4.CompressBlockBound(len(src))
		zw.out = slices.Grow(zw.out, bound+crcSize)
		n, err := zw.lz4.CompressBlock(src, zw.out[start:start+bound])
		if err != nil || n == 0 {
			return zw.fail(fmt.Errorf("zfile: lz4 compress block %d: n=%d: %v", len(zw.lens), n, err))
		}
		zw.out = zw.out[:start+n]
	case ZSTD:
		zw.out = zw.zstd.EncodeAll(src, zw.out)
	}
	if zw.hdr.Verify {
		crc := crc32c.Update(crc32c.BlockSeed, zw.out[start:])
		zw.out = binary.LittleEndian.AppendUint32(zw.out, crc)
	}
	stored := len(zw.out) - start
	if stored > maxStoredLen(zw.bs) {
		return zw.fail(fmt.Errorf("zfile: block %d stored in %d bytes, above the %d readers accept",
			len(zw.lens), stored, maxStoredLen(zw.bs)))
	}
	zw.lens = append(zw.lens, uint32(stored))
	if len(zw.out) >= flushAt {
		return zw.flush()
	}
	return nil
}

func (zw *Writer) flush() error {
	if len(zw.out) == 0 {
		return nil
	}
	n, err := zw.w.Write(zw.out)
	zw.written += int64(n)
	if err == nil && n < len(zw.out) {
		err = io.ErrShortWrite
	}
	zw.out = zw.out[:0]
	if err != nil {
		return zw.fail(fmt.Errorf("zfile: write at offset %d: %w", zw.written, err))
	}
	return nil
}

func (zw *Writer) fail(err error) error {
	if zw.err == nil {
		zw.err = err
	}
	return zw.err
}

// Close compresses the last partial block, writes the jump table and the
// trailer, and rewrites the header when the underlying writer can seek.
func (zw *Writer) Close() error {
	if zw.closed {
		return zw.err
	}
	zw.closed = true
	if zw.zstd != nil {
		defer zw.zstd.Close()
	}
	if zw.err != nil {
		return zw.err
	}
	if len(zw.pending) > 0 {
		if err := zw.compressBlock(zw.pending); err != nil {
			return err
		}
	}
	h := zw.hdr
	h.IndexOffset = uint64(zw.written) + uint64(len(zw.out))
	h.IndexSize = uint64(len(zw.lens))
	h.OriginalSize = zw.rawSize
	idx := len(zw.out)
	for _, l := range zw.lens {
		zw.out = binary.LittleEndian.AppendUint32(zw.out, l)
	}
	h.IndexCRC = crc32c.Update(0, zw.out[idx:])
	tr := h
	tr.Flags = FlagDataFile | FlagSealed | FlagDigest
	zw.out = append(zw.out, tr.marshal()[:]...)
	if err := zw.flush(); err != nil {
		return err
	}
	if !zw.seekable {
		return nil
	}
	h.Flags = FlagHeader | FlagDataFile | FlagHeaderOverwrite | FlagDigest
	if err := zw.rewriteHeader(h.marshal()[:]); err != nil {
		return zw.fail(fmt.Errorf("zfile: rewrite header at offset %d: %w", zw.start, err))
	}
	return nil
}

func (zw *Writer) rewriteHeader(b []byte) error {
	if wa, ok := zw.w.(io.WriterAt); ok {
		_, err := wa.WriteAt(b, zw.start)
		return err
	}
	s := zw.w.(io.Seeker)
	if _, err := s.Seek(zw.start, io.SeekStart); err != nil {
		return err
	}
	if _, err := zw.w.Write(b); err != nil {
		return err
	}
	_, err := s.Seek(zw.start+zw.written, io.SeekStart)
	return err
}
