package lsmt

import (
	"errors"
	"fmt"
	"io"
)

// Layer is a committed, read-only LSMT layer. It is safe for concurrent use
// when its underlying io.ReaderAt is.
type Layer struct {
	r       io.ReaderAt
	size    int64
	header  Header // the header slot at offset 0
	trailer Header // the trailer slot, the authority on index and size
	index   segmentIndex
}

// Open validates a committed layer of size bytes read through r and loads
// its index. It checks what upstream's loader checks: header magic and bits,
// a sealed data trailer in the last 4 KiB, the index within the file and
// within upstream's size limit, entries ordered and non-overlapping, and every
// mapped range inside the data area.
func Open(r io.ReaderAt, size int64) (*Layer, error) {
	if size < 2*HeaderSize {
		return nil, fmt.Errorf("%w: %d bytes is too small to hold a header and a trailer", ErrNotLSMT, size)
	}
	slot := make([]byte, HeaderSize)
	if err := readFull(r, slot, 0); err != nil {
		return nil, fmt.Errorf("lsmt: read header: %w", err)
	}
	header, err := parseHeader(slot, "header")
	if err != nil {
		return nil, err
	}
	if !header.IsHeader() || !header.IsData() {
		return nil, fmt.Errorf("%w: header flags %#x lack the header and data bits", ErrNotLSMT, header.Flags)
	}
	trailerOffset := size - HeaderSize
	if err := readFull(r, slot, trailerOffset); err != nil {
		return nil, fmt.Errorf("lsmt: read trailer: %w", err)
	}
	trailer, err := parseHeader(slot, fmt.Sprintf("trailer at %d", trailerOffset))
	if err != nil {
		return nil, err
	}
	if trailer.IsHeader() || !trailer.IsData() || !trailer.IsSealed() {
		return nil, fmt.Errorf("%w: trailer flags %#x: want a sealed data trailer (not a committed layer?)",
			ErrNotLSMT, trailer.Flags)
	}
	index, err := loadIndex(r, trailer, uint64(trailerOffset))
	if err != nil {
		return nil, err
	}
	return &Layer{r: r, size: size, header: header, trailer: trailer, index: newSegmentIndex(index)}, nil
}

func loadIndex(r io.ReaderAt, t Header, trailerOffset uint64) ([]Segment, error) {
	if t.IndexSize > readOnlyIndexLimit {
		return nil, fmt.Errorf("%w: %d entries, more than the limit of %d",
			ErrCorruptIndex, t.IndexSize, readOnlyIndexLimit)
	}
	if t.IndexOffset < HeaderSize || t.IndexOffset > trailerOffset || t.IndexOffset%SectorSize != 0 {
		return nil, fmt.Errorf("%w: index offset %d outside [%d, %d] or not sector aligned",
			ErrCorruptIndex, t.IndexOffset, HeaderSize, trailerOffset)
	}
	if t.IndexSize*EntrySize > trailerOffset-t.IndexOffset {
		return nil, fmt.Errorf("%w: %d entries at offset %d run past the trailer at %d",
			ErrCorruptIndex, t.IndexSize, t.IndexOffset, trailerOffset)
	}
	raw := make([]byte, t.IndexSize*EntrySize)
	if err := readFull(r, raw, int64(t.IndexOffset)); err != nil {
		return nil, fmt.Errorf("lsmt: read index: %w", err)
	}
	index := make([]Segment, 0, t.IndexSize)
	for off := 0; off < len(raw); off += EntrySize {
		if s := decodeSegment(raw[off:]); !s.isPadding() {
			index = append(index, s)
		}
	}
	if err := validateIndex(index, HeaderSize/SectorSize, t.IndexOffset/SectorSize); err != nil {
		return nil, err
	}
	return index, nil
}

// Header returns the layer's header slot. Old layers carry garbage in its
// unused fields; Trailer is the authority on the index and sizes.
func (l *Layer) Header() Header { return l.header }

// Trailer returns the layer's trailer slot.
func (l *Layer) Trailer() Header { return l.trailer }

// Index returns the layer's segments, padding dropped. The caller must not
// modify it.
func (l *Layer) Index() []Segment { return l.index.segs }

// VirtualSize is the size in bytes of the disk the layer describes.
func (l *Layer) VirtualSize() int64 { return int64(l.trailer.VirtualSize) }

// DataSize is the number of bytes of data the layer stores (excluding zeroed
// segments, header and index).
func (l *Layer) DataSize() int64 {
	var n int64
	for _, s := range l.index.segs {
		if !s.Zeroed {
			n += int64(s.Length) * SectorSize
		}
	}
	return n
}

// Source is the layer's own byte space, the space index MOffsets point into.
func (l *Layer) Source() io.ReaderAt { return l.r }

// Size is the layer's size in bytes.
func (l *Layer) Size() int64 { return l.size }

// ReadAt reads the layer's virtual disk on its own: holes and zeroed
// segments read as zeros.
func (l *Layer) ReadAt(p []byte, off int64) (int, error) {
	return readMapped(p, off, l.VirtualSize(), &l.index, func(uint8) io.ReaderAt { return l.r })
}

// readFull reads exactly len(p) bytes at off, turning a short read into
// io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%d of %d bytes at offset %d: %w", n, len(p), off, err)
}
