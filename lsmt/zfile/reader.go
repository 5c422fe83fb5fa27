package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sort"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"

	"github.com/obdtrace/obdtrace/internal/crc32c"
)

const (
	// maxSpan caps the compressed bytes fetched by one underlying ReadAt; a
	// larger request is served in several spans so that scratch memory stays
	// bounded whatever the caller asks for.
	maxSpan = 4 << 20
	// indexChunk is how much of the jump table is read at a time, so that a
	// lying index size fails on the first short read instead of allocating.
	indexChunk = 1 << 20
)

// Reader gives random access to the uncompressed contents of a ZFile. It is
// safe for concurrent use; each ReadAt issues its own reads on the
// underlying io.ReaderAt.
type Reader struct {
	r          io.ReaderAt
	header     Header
	trailer    Header
	hasTrailer bool
	layout     Header   // the slot the index and options come from
	jump       []uint64 // jump[i] = file offset of block i; jump[n] = end of the last block
	size       int64
	shift      uint // log2 of the block size
	verify     bool
	zstd       *zstd.Decoder

	spans  sync.Pool // *[]byte, compressed spans
	blocks sync.Pool // *[]byte, one uncompressed block, for partly read blocks
}

// NewReader validates the header, trailer and jump table of the ZFile of the
// given size held by r and returns a Reader over its uncompressed bytes. It
// reads the header, the trailer (unless the header carries its fields) and
// the jump table, and nothing else.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	if size < HeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than a header", ErrNotZFile, size)
	}
	var slot [HeaderSize]byte
	if err := readFull(r, slot[:], 0); err != nil {
		return nil, fmt.Errorf("zfile: read header: %w", err)
	}
	hdr, err := parseSlot(&slot, "header")
	if err != nil {
		return nil, err
	}
	if !hdr.Flags.Has(FlagHeader) {
		return nil, fmt.Errorf("%w: header flags %#x lack the header bit", ErrCorrupt, uint64(hdr.Flags))
	}
	if err := checkDigest(&slot, hdr, "header"); err != nil {
		return nil, err
	}
	if size < 2*HeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, too short for a header and a trailer", ErrTruncated, size)
	}
	z := &Reader{r: r, header: hdr, layout: hdr}
	if !hdr.Flags.Has(FlagHeaderOverwrite) {
		if !hdr.Flags.Has(FlagDataFile) {
			return nil, fmt.Errorf("%w: header flags %#x lack the data-file bit", ErrCorrupt, uint64(hdr.Flags))
		}
		if z.trailer, err = readTrailer(r, size); err != nil {
			return nil, err
		}
		z.hasTrailer, z.layout = true, z.trailer
	}
	if err := z.layout.checkOptions(); err != nil {
		return nil, err
	}
	if err := z.loadIndex(size); err != nil {
		return nil, err
	}
	z.size = int64(z.layout.OriginalSize)
	z.shift = uint(bits.TrailingZeros32(z.layout.BlockSize))
	z.verify = z.layout.Verify
	if z.layout.Algorithm == ZSTD {
		bs := uint64(z.layout.BlockSize)
		z.zstd, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(bs), zstd.WithDecodeAllCapLimit(true))
		if err != nil {
			return nil, fmt.Errorf("zfile: create zstd decoder: %w", err)
		}
	}
	return z, nil
}

func readTrailer(r io.ReaderAt, size int64) (Header, error) {
	var slot [HeaderSize]byte
	off := size - HeaderSize
	if err := readFull(r, slot[:], off); err != nil {
		return Header{}, fmt.Errorf("zfile: read trailer: %w", err)
	}
	tr, err := parseSlot(&slot, "trailer")
	if err != nil {
		return Header{}, fmt.Errorf("%w (at offset %d)", err, off)
	}
	if tr.Flags.Has(FlagHeader) || !tr.Flags.Has(FlagDataFile|FlagSealed) {
		return Header{}, fmt.Errorf("%w: trailer flags %#x, want trailer, data file and sealed",
			ErrCorrupt, uint64(tr.Flags))
	}
	// Upstream skips this check; its own trailers always carry a valid
	// digest when the bit is set, so a mismatch means corruption.
	if err := checkDigest(&slot, tr, "trailer"); err != nil {
		return Header{}, err
	}
	return tr, nil
}

// loadIndex checks the layout's index fields against the file size, reads
// the jump table, verifies its CRC and builds z.jump.
func (z *Reader) loadIndex(size int64) error {
	l := z.layout
	n := l.IndexSize
	trailerOff := uint64(size - HeaderSize)
	if n > maxIndexSize {
		return fmt.Errorf("%w: index size %d exceeds %d", ErrCorrupt, n, maxIndexSize)
	}
	dataStart := uint64(HeaderSize) + uint64(l.DictSize)
	if l.IndexOffset < dataStart || l.IndexOffset > trailerOff {
		return fmt.Errorf("%w: index offset %d outside [%d, %d]", ErrCorrupt, l.IndexOffset, dataStart, trailerOff)
	}
	if n*crcSize > trailerOff-l.IndexOffset {
		return fmt.Errorf("%w: %d index bytes at offset %d run past the trailer at %d",
			ErrCorrupt, n*crcSize, l.IndexOffset, trailerOff)
	}
	bs := uint64(l.BlockSize)
	if want := l.OriginalSize/bs + min(l.OriginalSize%bs, 1); want != n {
		return fmt.Errorf("%w: %d blocks for %d bytes in %d-byte blocks, want %d",
			ErrCorrupt, n, l.OriginalSize, bs, want)
	}
	minLen := uint64(0)
	if l.Verify {
		minLen = crcSize
	}
	maxLen := uint64(maxStoredLen(int(bs)))
	z.jump = make([]uint64, 1, min(n, indexChunk)+1)
	z.jump[0] = dataStart
	crc := uint32(0)
	buf := make([]byte, min(n*crcSize, indexChunk))
	for done := uint64(0); done < n; {
		chunk := buf[:min(n-done, indexChunk/crcSize)*crcSize]
		off := l.IndexOffset + done*crcSize
		if err := readFull(z.r, chunk, int64(off)); err != nil {
			return fmt.Errorf("zfile: read jump table: %w", err)
		}
		crc = crc32c.Update(crc, chunk)
		for j := 0; j < len(chunk); j += crcSize {
			ln := uint64(binary.LittleEndian.Uint32(chunk[j:]))
			if ln <= minLen || ln > maxLen {
				return fmt.Errorf("%w: block %d stored length %d outside (%d, %d]",
					ErrCorrupt, done+uint64(j/crcSize), ln, minLen, maxLen)
			}
			z.jump = append(z.jump, z.jump[len(z.jump)-1]+ln)
		}
		done += uint64(len(chunk) / crcSize)
	}
	// As upstream, the CRC only counts with the digest bit: old files (the
	// 2021 baselayer) carry garbage in the field.
	if l.Flags.Has(FlagDigest) && crc != l.IndexCRC {
		return fmt.Errorf("%w: jump table CRC %#08x, computed %#08x", ErrChecksum, l.IndexCRC, crc)
	}
	if end := z.jump[n]; end > l.IndexOffset {
		return fmt.Errorf("%w: blocks end at %d, past the jump table at %d", ErrCorrupt, end, l.IndexOffset)
	}
	return nil
}

// Close releases the ZSTD decoder, if any. The Reader must not be used
// afterwards. It does not close the underlying reader.
func (z *Reader) Close() error {
	if z.zstd != nil {
		z.zstd.Close()
	}
	return nil
}

// Size returns the uncompressed size.
func (z *Reader) Size() int64 { return z.size }

// BlockSize returns the uncompressed block size.
func (z *Reader) BlockSize() int { return 1 << z.shift }

// NumBlocks returns the number of compressed blocks.
func (z *Reader) NumBlocks() int { return len(z.jump) - 1 }

// Algorithm returns the block compression algorithm.
func (z *Reader) Algorithm() Algorithm { return z.layout.Algorithm }

// Header returns the header slot as stored. Its index fields are only
// meaningful when its flags include FlagHeaderOverwrite.
func (z *Reader) Header() Header { return z.header }

// Trailer returns the trailer slot and true when the reader took the layout
// from it (the header did not carry the trailer's fields).
func (z *Reader) Trailer() (Header, bool) { return z.trailer, z.hasTrailer }

// CompressedRange returns the byte range [start, end) of the ZFile holding
// the blocks that cover uncompressed [off, off+n), clamped to Size, for a
// prefetcher that fetches compressed bytes without decompressing them.
// An empty request yields an empty range at the block holding off.
func (z *Reader) CompressedRange(off, n int64) (start, end int64, err error) {
	if off < 0 || n < 0 {
		return 0, 0, fmt.Errorf("zfile: CompressedRange(%d, %d): negative offset or length", off, n)
	}
	if off >= z.size {
		return 0, 0, fmt.Errorf("zfile: CompressedRange offset %d at or past size %d: %w", off, z.size, io.EOF)
	}
	n = min(n, z.size-off)
	first := int(off >> z.shift)
	if n == 0 {
		return int64(z.jump[first]), int64(z.jump[first]), nil
	}
	last := int((off + n - 1) >> z.shift)
	return int64(z.jump[first]), int64(z.jump[last+1]), nil
}

// ReadAt reads uncompressed bytes at off. Like the standard library's
// readers it returns io.EOF with a short count when the read crosses Size.
func (z *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("zfile: ReadAt at negative offset %d", off)
	}
	if off >= z.size {
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if rem := z.size - off; int64(n) > rem {
		n, eof = int(rem), io.EOF
	}
	end := off + int64(n)
	for pos := off; pos < end; {
		first := int(pos >> z.shift)
		last := z.limitSpan(first, int((end-1)>>z.shift))
		stop := min(int64(last+1)<<z.shift, end)
		if err := z.readBlocks(p[pos-off:stop-off], pos, first, last); err != nil {
			return int(pos - off), err
		}
		pos = stop
	}
	return n, eof
}

// limitSpan returns the last block, at most last, such that blocks
// first..result span no more than maxSpan compressed bytes (at least one block).
func (z *Reader) limitSpan(first, last int) int {
	base := z.jump[first]
	if z.jump[last+1]-base <= maxSpan {
		return last
	}
	k := sort.Search(last-first+1, func(k int) bool { return z.jump[first+k+1]-base > maxSpan })
	return first + max(k-1, 0)
}

// readBlocks fills dst, the uncompressed range starting at pos, from blocks
// first..last, fetched with one ReadAt. Blocks that dst holds whole are
// decompressed straight into it.
func (z *Reader) readBlocks(dst []byte, pos int64, first, last int) error {
	base := z.jump[first]
	span := int(z.jump[last+1] - base)
	bufp := getBuf(&z.spans, span)
	defer z.spans.Put(bufp)
	buf := (*bufp)[:span]
	if err := readFull(z.r, buf, int64(base)); err != nil {
		return fmt.Errorf("zfile: read blocks %d..%d at offset %d: %w", first, last, base, err)
	}
	dstEnd := pos + int64(len(dst))
	for i := first; i <= last; i++ {
		payload, err := z.checkBlock(i, buf[z.jump[i]-base:z.jump[i+1]-base])
		if err != nil {
			return err
		}
		bStart := int64(i) << z.shift
		bEnd := min(bStart+int64(1)<<z.shift, z.size)
		if bStart >= pos && bEnd <= dstEnd {
			if err := z.decompress(i, payload, dst[bStart-pos:bEnd-pos]); err != nil {
				return err
			}
			continue
		}
		if err := z.decompressPart(i, payload, bEnd-bStart, dst, pos, bStart); err != nil {
			return err
		}
	}
	return nil
}

// decompressPart decompresses block i into scratch and copies the part that
// overlaps dst (which starts at uncompressed offset pos).
func (z *Reader) decompressPart(i int, payload []byte, blen int64, dst []byte, pos, bStart int64) error {
	sp := getBuf(&z.blocks, 1<<z.shift)
	defer z.blocks.Put(sp)
	scratch := (*sp)[:blen]
	if err := z.decompress(i, payload, scratch); err != nil {
		return err
	}
	lo := max(bStart, pos)
	hi := min(bStart+blen, pos+int64(len(dst)))
	copy(dst[lo-pos:hi-pos], scratch[lo-bStart:hi-bStart])
	return nil
}

// checkBlock verifies block i's CRC, when the file has them, and returns the
// compressed payload.
func (z *Reader) checkBlock(i int, stored []byte) ([]byte, error) {
	if !z.verify {
		return stored, nil
	}
	payload := stored[:len(stored)-crcSize]
	want := binary.LittleEndian.Uint32(stored[len(payload):])
	if got := crc32c.Update(crc32c.BlockSeed, payload); got != want {
		return nil, fmt.Errorf("%w: block %d at offset %d: stored CRC %#08x, computed %#08x",
			ErrChecksum, i, z.jump[i], want, got)
	}
	return payload, nil
}

// decompress decodes block i into dst, whose length is the block's exact
// uncompressed size.
func (z *Reader) decompress(i int, src, dst []byte) error {
	switch z.layout.Algorithm {
	case LZ4:
		n, err := lz4.UncompressBlock(src, dst)
		if err != nil {
			return fmt.Errorf("%w: block %d at offset %d: lz4: %v", ErrCorrupt, i, z.jump[i], err)
		}
		if n != len(dst) {
			return fmt.Errorf("%w: block %d decompressed to %d bytes, want %d", ErrCorrupt, i, n, len(dst))
		}
	case ZSTD:
		out, err := z.zstd.DecodeAll(src, dst[:0:len(dst)])
		if err != nil {
			return fmt.Errorf("%w: block %d at offset %d: zstd: %v", ErrCorrupt, i, z.jump[i], err)
		}
		if len(out) != len(dst) {
			return fmt.Errorf("%w: block %d decompressed to %d bytes, want %d", ErrCorrupt, i, len(out), len(dst))
		}
		if &out[0] != &dst[0] {
			copy(dst, out)
		}
	default:
		return fmt.Errorf("%w: compression algorithm %v", ErrUnsupported, z.layout.Algorithm)
	}
	return nil
}

// getBuf returns a pooled buffer with capacity at least n.
func getBuf(pool *sync.Pool, n int) *[]byte {
	if bp, ok := pool.Get().(*[]byte); ok && cap(*bp) >= n {
		return bp
	}
	// Round up to a power of two so that mixed read sizes reuse rather than
	// churn buffers.
	b := make([]byte, n, 1<<bits.Len(uint(max(n, 1)-1)))
	return &b
}

// readFull reads exactly len(p) bytes at off, accepting io.EOF with a full
// read as the io.ReaderAt contract allows.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: %d of %d bytes at offset %d", ErrTruncated, n, len(p), off)
		return err
	}
	return fmt.Errorf("%d of %d bytes at offset %d: %w", n, len(p), off, err)
}
