package device

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/lsmt"
)

// Upper is the writable layer of an Overlay; *lsmt.Writable implements it.
// Its writes and discards must be sector (512-byte) aligned.
type Upper interface {
	io.ReaderAt
	io.WriterAt
	Discard(off, n int64) error
	Sync() error
	// Index lists the ranges the layer already holds, so a reopened layer
	// keeps shadowing what it shadowed before.
	Index() []lsmt.Segment
}

// Overlay is a WritableImage made of a writable upper layer stacked over
// read-only lowers: writes and discards go to the upper layer, and reads of
// ranges it never wrote fall through to the lowers. This is the disk the
// converter formats and fills, whose new data ends up in the upper layer.
type Overlay struct {
	lower io.ReaderAt // nil reads as zeros
	upper Upper
	size  int64

	mu    sync.RWMutex
	owned spanSet // byte ranges the upper layer has written or discarded

	// rmw serialises the read-modify-write of unaligned writes. The loop
	// driver never sends them; other users of an Overlay might.
	rmw sync.Mutex
}

// NewOverlay stacks upper over lower (nil for an empty disk) as a disk of
// size bytes, a multiple of the 512-byte sector.
func NewOverlay(lower io.ReaderAt, upper Upper, size int64) (*Overlay, error) {
	if size <= 0 || size%lsmt.SectorSize != 0 {
		return nil, fmt.Errorf("%w: overlay size %d is not a positive multiple of %d", ErrSize, size, lsmt.SectorSize)
	}
	o := &Overlay{lower: lower, upper: upper, size: size, owned: newSpanSet()}
	for _, s := range upper.Index() {
		o.owned.add(int64(s.Offset)*lsmt.SectorSize, int64(s.End())*lsmt.SectorSize)
	}
	return o, nil
}

// Size is the disk's size in bytes.
func (o *Overlay) Size() int64 { return o.size }

// ReadAt reads the merged disk. It returns io.EOF for reads past the end.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: read at negative offset %d", ErrOutOfRange, off)
	}
	if off >= o.size {
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > o.size-off {
		n, eof = int(o.size-off), io.EOF
	}
	end := off + int64(n)
	o.mu.RLock()
	spans := o.owned.appendOverlapping(make([]span, 0, 4), off, end)
	o.mu.RUnlock()

	pos := off
	for _, s := range append(spans, span{start: end, end: end}) {
		if s.start > pos {
			if err := iox.ReadAtOrZeros(o.lower, p[pos-off:s.start-off], pos); err != nil {
				return int(pos - off), fmt.Errorf("device: read lower layers at %d: %w", pos, err)
			}
		}
		if s.end > s.start {
			if err := iox.ReadAtOrZeros(o.upper, p[s.start-off:s.end-off], s.start); err != nil {
				return int(s.start - off), fmt.Errorf("device: read upper layer at %d: %w", s.start, err)
			}
		}
		pos = s.end
	}
	return n, eof
}

// WriteAt writes p at off into the upper layer.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > o.size-int64(len(p)) {
		return 0, fmt.Errorf("%w: write of %d bytes at %d, disk size %d", ErrOutOfRange, len(p), off, o.size)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off%lsmt.SectorSize != 0 || len(p)%lsmt.SectorSize != 0 {
		return o.writeUnaligned(p, off)
	}
	if n, err := o.upper.WriteAt(p, off); err != nil {
		o.own(off, off+int64(n))
		return n, fmt.Errorf("device: write upper layer at %d: %w", off, err)
	}
	o.own(off, off+int64(len(p)))
	return len(p), nil
}

// writeUnaligned widens the write to whole sectors with the disk's current
// bytes around p.
func (o *Overlay) writeUnaligned(p []byte, off int64) (int, error) {
	o.rmw.Lock()
	defer o.rmw.Unlock()
	start := off / lsmt.SectorSize * lsmt.SectorSize
	end := (off + int64(len(p)) + lsmt.SectorSize - 1) / lsmt.SectorSize * lsmt.SectorSize
	buf := make([]byte, end-start)
	// Only the partial sectors at either edge need their old bytes.
	for _, edge := range []int64{start, end - lsmt.SectorSize} {
		if _, err := o.ReadAt(buf[edge-start:edge-start+lsmt.SectorSize], edge); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
	}
	copy(buf[off-start:], p)
	if _, err := o.upper.WriteAt(buf, start); err != nil {
		return 0, fmt.Errorf("device: write upper layer at %d: %w", start, err)
	}
	o.own(start, end)
	return len(p), nil
}

// Discard makes [off, off+n) read as zeros: whole sectors are discarded in
// the upper layer, partial ones at the edges are written with zeros.
func (o *Overlay) Discard(off, n int64) error {
	if off < 0 || n < 0 || off > o.size-n {
		return fmt.Errorf("%w: discard of %d bytes at %d, disk size %d", ErrOutOfRange, n, off, o.size)
	}
	start := (off + lsmt.SectorSize - 1) / lsmt.SectorSize * lsmt.SectorSize
	end := (off + n) / lsmt.SectorSize * lsmt.SectorSize
	if start >= end {
		_, err := o.WriteAt(make([]byte, n), off)
		return err
	}
	if start > off {
		if _, err := o.WriteAt(make([]byte, start-off), off); err != nil {
			return err
		}
	}
	if end < off+n {
		if _, err := o.WriteAt(make([]byte, off+n-end), end); err != nil {
			return err
		}
	}
	if err := o.upper.Discard(start, end-start); err != nil {
		return fmt.Errorf("device: discard %d bytes at %d in the upper layer: %w", end-start, start, err)
	}
	o.own(start, end)
	return nil
}

// Sync makes the upper layer durable.
func (o *Overlay) Sync() error {
	if err := o.upper.Sync(); err != nil {
		return fmt.Errorf("device: sync upper layer: %w", err)
	}
	return nil
}

func (o *Overlay) own(start, end int64) {
	o.mu.Lock()
	o.owned.add(start, end)
	o.mu.Unlock()
}
