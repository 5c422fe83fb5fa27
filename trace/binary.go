package trace

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/obdtrace/obdtrace/internal/crc32c"
)

// Upstream's binary trace layout (overlaybd-formats.md §4): a header of magic, zero, data_size,
// checksum, zero; then data_size/24 records of op, 3 padding bytes, layer index, count, offset.
// All little-endian.
const (
	// BinaryMagic starts every upstream binary trace (bytes 20 18 EF C2).
	BinaryMagic uint32 = 0xC2EF1820
	// BinaryHeaderSize and BinaryRecordSize are the sizes of the header and of each record.
	BinaryHeaderSize = 24
	BinaryRecordSize = 24
	// MaxRecordLength is the largest count WriteBinary puts in one record. Upstream replays each
	// record into a MAX_IO_SIZE (1 MiB) buffer without checking the count, so a larger record
	// would overrun it; longer frames are split.
	MaxRecordLength = 1 << 20
	// opRead marks a read record, the only kind upstream records or replays.
	opRead = 'R'
)

// WriteBinary writes frames as an upstream binary trace, byte for byte as upstream writes one
// (with zeros where upstream leaves padding uninitialised). Frame times are dropped: the format
// has none. A frame longer than MaxRecordLength becomes several consecutive records. Frames
// need only non-empty, non-negative, non-overflowing ranges and a layer index that fits in 32
// bits.
func WriteBinary(w io.Writer, frames []Frame) error {
	records := 0
	for i, f := range frames {
		if err := f.validate(math.MaxUint32 + 1); err != nil {
			return fmt.Errorf("frame %d: %w", i, err)
		}
		n := f.Length / MaxRecordLength
		if f.Length%MaxRecordLength != 0 {
			n++
		}
		if n > int64(MaxFrames-records) {
			return fmt.Errorf("%w: frames need more than %d records", ErrTooLarge, MaxFrames)
		}
		records += int(n)
	}
	// The checksum precedes the records, so sum them in a first pass instead of buffering them.
	var sum uint32
	_ = forEachRecord(frames, func(rec []byte) error {
		sum = crc32c.Update(sum, rec)
		return nil
	})
	var hdr [BinaryHeaderSize]byte
	binary.LittleEndian.PutUint32(hdr[0:], BinaryMagic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(records)*BinaryRecordSize)
	binary.LittleEndian.PutUint32(hdr[16:], sum)
	bw := bufio.NewWriter(w)
	if _, err := bw.Write(hdr[:]); err != nil {
		return fmt.Errorf("trace: write binary header: %w", err)
	}
	err := forEachRecord(frames, func(rec []byte) error {
		_, err := bw.Write(rec)
		return err
	})
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return fmt.Errorf("trace: write binary records: %w", err)
	}
	return nil
}

// forEachRecord encodes the records of valid frames one at a time into a reused buffer.
func forEachRecord(frames []Frame, fn func(rec []byte) error) error {
	var rec [BinaryRecordSize]byte
	rec[0] = opRead
	for _, f := range frames {
		for off, left := f.Offset, f.Length; left > 0; {
			n := min(left, MaxRecordLength)
			binary.LittleEndian.PutUint32(rec[4:], uint32(f.Layer))
			binary.LittleEndian.PutUint64(rec[8:], uint64(n))
			binary.LittleEndian.PutUint64(rec[16:], uint64(off))
			if err := fn(rec[:]); err != nil {
				return err
			}
			off, left = off+n, left-n
		}
	}
	return nil
}

// ReadBinary reads an upstream binary trace of at most maxSize bytes (maxSize <= 0 means the
// largest a trace of MaxFrames records can be) and returns its read records as frames, in file
// order, with TimeNS 0. It rejects what upstream rejects — a wrong magic (ErrBadMagic), a size
// other than 24 + data_size (ErrTruncated, ErrSize), a checksum mismatch (ErrChecksum) — and
// also records whose count or offset overflow int64 (ErrInvalid). Records other than reads are
// skipped, as upstream's replay skips them, and so are empty reads, which fetch nothing.
func ReadBinary(r io.Reader, maxSize int64) ([]Frame, error) {
	if maxSize <= 0 {
		maxSize = BinaryHeaderSize + BinaryRecordSize*MaxFrames
	}
	var hdr [BinaryHeaderSize]byte
	if n, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: header: got %d of %d bytes: %w", ErrTruncated, n, BinaryHeaderSize, err)
	}
	if m := binary.LittleEndian.Uint32(hdr[0:]); m != BinaryMagic {
		return nil, fmt.Errorf("%w: %#08x at offset 0, want %#08x", ErrBadMagic, m, BinaryMagic)
	}
	dataSize := binary.LittleEndian.Uint64(hdr[8:])
	switch {
	case dataSize%BinaryRecordSize != 0:
		return nil, fmt.Errorf("%w: data_size %d is not a multiple of %d", ErrSize, dataSize, BinaryRecordSize)
	case dataSize > uint64(max(maxSize-BinaryHeaderSize, 0)) || dataSize/BinaryRecordSize > MaxFrames:
		return nil, fmt.Errorf("%w: data_size %d, limit %d bytes or %d records",
			ErrTooLarge, dataSize, maxSize-BinaryHeaderSize, MaxFrames)
	}
	frames, err := readRecords(bufio.NewReader(r), int(dataSize/BinaryRecordSize),
		binary.LittleEndian.Uint32(hdr[16:]))
	if err != nil {
		return nil, err
	}
	return frames, nil
}

// readRecords reads n records after the header and checks that nothing follows them and that
// they match checksum. A checksum mismatch is reported in preference to a bad value, since it
// says the file as a whole is damaged.
func readRecords(br *bufio.Reader, n int, checksum uint32) ([]Frame, error) {
	// Grow with the data actually read, not with the header's claim.
	frames := make([]Frame, 0, min(n, 4096))
	var rec [BinaryRecordSize]byte
	var sum uint32
	var bad error
	for i := range n {
		pos := int64(BinaryHeaderSize) + int64(i)*BinaryRecordSize
		if got, err := io.ReadFull(br, rec[:]); err != nil {
			return nil, fmt.Errorf("%w: record %d at offset %d: got %d of %d bytes: %w",
				ErrTruncated, i, pos, got, BinaryRecordSize, err)
		}
		sum = crc32c.Update(sum, rec[:])
		count := binary.LittleEndian.Uint64(rec[8:])
		off := binary.LittleEndian.Uint64(rec[16:])
		if rec[0] != opRead || count == 0 || bad != nil {
			continue
		}
		if off > math.MaxInt64 || count > math.MaxInt64-off {
			bad = fmt.Errorf("%w: record %d at offset %d: range [%d, +%d) overflows int64",
				ErrInvalid, i, pos, off, count)
			continue
		}
		frames = append(frames, Frame{
			Layer:  int(binary.LittleEndian.Uint32(rec[4:])),
			Offset: int64(off),
			Length: int64(count),
		})
	}
	end := int64(BinaryHeaderSize) + int64(n)*BinaryRecordSize
	if _, err := br.ReadByte(); err == nil {
		return nil, fmt.Errorf("%w: data continues past offset %d where data_size says it ends", ErrSize, end)
	} else if !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("trace: read binary at offset %d: %w", end, err)
	}
	if sum != checksum {
		return nil, fmt.Errorf("%w: header says %#08x, records sum to %#08x", ErrChecksum, checksum, sum)
	}
	if bad != nil {
		return nil, bad
	}
	return frames, nil
}

// FromBinary turns frames read from an upstream binary trace into a Trace over layers, the
// image's layers bottom first as upstream numbers them. The binary form has no times, so every
// frame's TimeNS is 0 and frame order is the only timing left. It fails if a frame names a
// layer outside layers.
func FromBinary(frames []Frame, layers []Layer) (*Trace, error) {
	t := &Trace{
		Layers: append([]Layer(nil), layers...),
		Meta:   Meta{Source: SourceUpstream, Runs: 1},
		Frames: make([]Frame, len(frames)),
	}
	for i, f := range frames {
		f.TimeNS = 0
		t.Frames[i] = f
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return t, nil
}

// ToBinary writes t as an upstream binary trace; see WriteBinary for what is lost.
func ToBinary(w io.Writer, t *Trace) error {
	if err := t.Validate(); err != nil {
		return err
	}
	return WriteBinary(w, t.Frames)
}
