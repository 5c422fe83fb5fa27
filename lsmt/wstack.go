package lsmt

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/obdtrace/obdtrace/internal/iox"
)

// ErrOutOfRange is returned for I/O that reaches past the end of a
// WritableStack's disk.
var ErrOutOfRange = errors.New("lsmt: I/O beyond the end of the disk")

// WritableStack is a writable disk made of a Writable layer over a
// read-only lower disk: writes and discards go to the upper layer, and the
// ranges it never wrote read through to the lower disk. It is what a
// converter formats and fills, whose new data then ends up in the upper
// layer. The lower disk is typically a Stack, or another WritableStack when
// layers are built one on another before the one below is committed.
//
// Its methods are safe for concurrent use. Unaligned writes are widened to
// whole sectors with a read-modify-write serialised among themselves; the
// kernel's loop driver never sends them.
type WritableStack struct {
	lower io.ReaderAt // nil reads as zeros
	upper *Writable
	rmw   sync.Mutex
}

// NewWritableStack stacks upper over lower (nil for an empty disk). The
// disk's size is upper's virtual size.
func NewWritableStack(lower io.ReaderAt, upper *Writable) *WritableStack {
	return &WritableStack{lower: lower, upper: upper}
}

// Size is the disk's size in bytes.
func (s *WritableStack) Size() int64 { return s.upper.VirtualSize() }

// Upper returns the writable layer.
func (s *WritableStack) Upper() *Writable { return s.upper }

// ReadAt reads the merged disk. Reads past the end return io.EOF.
func (s *WritableStack) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, ErrNegativeOffset
	}
	size := s.Size()
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p, eof = p[:size-off], io.EOF
	}
	end := off + int64(len(p))
	w := s.upper
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		return 0, ErrClosed
	}
	pos := off
	for _, seg := range w.segmentsIn(uint64(off)/SectorSize, uint64(end+SectorSize-1)/SectorSize) {
		start := max(int64(seg.Offset)*SectorSize, off)
		stop := min(int64(seg.End())*SectorSize, end)
		if start > pos {
			if err := iox.ReadAtOrZeros(s.lower, p[pos-off:start-off], pos); err != nil {
				return int(pos - off), fmt.Errorf("lsmt: read lower disk at %d: %w", pos, err)
			}
		}
		dst := p[start-off : stop-off]
		if seg.Zeroed {
			clear(dst)
		} else if err := readFull(w.data, dst, int64(seg.MOffset)*SectorSize+start-int64(seg.Offset)*SectorSize); err != nil {
			return int(start - off), fmt.Errorf("lsmt: read upper layer at %d: %w", start, err)
		}
		pos = stop
	}
	if pos < end {
		if err := iox.ReadAtOrZeros(s.lower, p[pos-off:], pos); err != nil {
			return int(pos - off), fmt.Errorf("lsmt: read lower disk at %d: %w", pos, err)
		}
	}
	return len(p), eof
}

// WriteAt writes p at off into the upper layer.
func (s *WritableStack) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > s.Size()-int64(len(p)) {
		return 0, fmt.Errorf("%w: write of %d bytes at %d, disk size %d", ErrOutOfRange, len(p), off, s.Size())
	}
	if off%SectorSize == 0 && len(p)%SectorSize == 0 {
		return s.upper.WriteAt(p, off)
	}
	s.rmw.Lock()
	defer s.rmw.Unlock()
	start := off / SectorSize * SectorSize
	end := (off + int64(len(p)) + SectorSize - 1) / SectorSize * SectorSize
	buf := make([]byte, end-start)
	// Only the partial sectors at either edge need their current bytes.
	for _, edge := range []int64{start, end - SectorSize} {
		if _, err := s.ReadAt(buf[edge-start:edge-start+SectorSize], edge); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
	}
	copy(buf[off-start:], p)
	if _, err := s.upper.WriteAt(buf, start); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard makes [off, off+n) read as zeros: whole sectors are discarded in
// the upper layer, partial ones at the edges are written with zeros.
func (s *WritableStack) Discard(off, n int64) error {
	if off < 0 || n < 0 || off > s.Size()-n {
		return fmt.Errorf("%w: discard of %d bytes at %d, disk size %d", ErrOutOfRange, n, off, s.Size())
	}
	start := (off + SectorSize - 1) / SectorSize * SectorSize
	end := (off + n) / SectorSize * SectorSize
	if start >= end {
		_, err := s.WriteAt(make([]byte, n), off)
		return err
	}
	if start > off {
		if _, err := s.WriteAt(make([]byte, start-off), off); err != nil {
			return err
		}
	}
	if end < off+n {
		if _, err := s.WriteAt(make([]byte, off+n-end), end); err != nil {
			return err
		}
	}
	return s.upper.Discard(start, end-start)
}

// Sync makes the upper layer durable.
func (s *WritableStack) Sync() error { return s.upper.Sync() }

// ChangeBlockSize is the unit CommitChanges compares disks in: the block
// size of the ext4 filesystems overlaybd images hold.
const ChangeBlockSize = 4096

// ChangeStats says what CommitChanges found in the blocks it examined.
type ChangeStats struct {
	Examined  int64 `json:"examined"`  // blocks compared
	Data      int64 `json:"data"`      // blocks stored with their data
	Zeroed    int64 `json:"zeroed"`    // blocks that became zeros, stored as zeroed segments
	Unchanged int64 `json:"unchanged"` // blocks equal to the base, left out
}

// CommitChanges writes to w a committed layer that, stacked on base, reads
// as disk: it compares the two in ChangeBlockSize blocks over the ranges
// candidates cover (their Offset and Length, in sectors; typically the
// index of the layer that was written) and keeps the blocks that differ,
// as zeroed segments where they became zeros. Blocks outside candidates
// must be equal in both disks.
//
// The layer's bytes depend only on the two disks' content there, not on
// how, in what order or how often the blocks were written, so building the
// same content twice commits the same bytes. args.VirtualSize must be a
// positive multiple of ChangeBlockSize; blocks past it are ignored.
func CommitChanges(w io.Writer, disk, base io.ReaderAt, candidates []Segment, args CommitArgs) (ChangeStats, error) {
	if args.VirtualSize <= 0 || args.VirtualSize%ChangeBlockSize != 0 {
		return ChangeStats{}, fmt.Errorf("%w: virtual size %d is not a positive multiple of %d",
			ErrAlignment, args.VirtualSize, ChangeBlockSize)
	}
	var st ChangeStats
	var index []Segment
	for _, r := range candidateBlocks(candidates, args.VirtualSize/ChangeBlockSize) {
		var err error
		if index, err = diffBlocks(index, &st, disk, base, r[0], r[1]); err != nil {
			return st, err
		}
	}
	return st, Commit(w, disk, index, args)
}

// candidateBlocks turns sector ranges into sorted, merged block ranges
// [first, end), clipped to nblocks.
func candidateBlocks(candidates []Segment, nblocks int64) [][2]int64 {
	const perBlock = ChangeBlockSize / SectorSize
	var out [][2]int64
	for _, c := range candidates {
		if c.Length == 0 {
			continue
		}
		first, end := int64(c.Offset/perBlock), int64((c.End()+perBlock-1)/perBlock)
		if first >= nblocks {
			continue
		}
		out = append(out, [2]int64{first, min(end, nblocks)})
	}
	slices.SortFunc(out, func(a, b [2]int64) int { return int(a[0] - b[0]) })
	merged := out[:0]
	for _, r := range out {
		if n := len(merged); n > 0 && r[0] <= merged[n-1][1] {
			merged[n-1][1] = max(merged[n-1][1], r[1])
			continue
		}
		merged = append(merged, r)
	}
	return merged
}

// diffChunkBlocks is how many blocks diffBlocks reads at once.
const diffChunkBlocks = 256

// maxSegmentBlocks is the most whole blocks one index entry holds.
const maxSegmentBlocks = MaxSegmentLength / (ChangeBlockSize / SectorSize)

// diffBlocks compares blocks [first, end) of disk and base and appends the
// segments of those that differ to index. A data segment maps the disk's
// own offsets (MOffset = Offset), so disk itself is the source Commit
// copies from.
func diffBlocks(index []Segment, st *ChangeStats, disk, base io.ReaderAt, first, end int64) ([]Segment, error) {
	got := make([]byte, diffChunkBlocks*ChangeBlockSize)
	was := make([]byte, len(got))
	var zero [ChangeBlockSize]byte
	for b := first; b < end; {
		n := min(end-b, diffChunkBlocks)
		off, size := b*ChangeBlockSize, n*ChangeBlockSize
		if err := iox.ReadAtOrZeros(disk, got[:size], off); err != nil {
			return index, fmt.Errorf("lsmt: read disk at %d: %w", off, err)
		}
		if err := iox.ReadAtOrZeros(base, was[:size], off); err != nil {
			return index, fmt.Errorf("lsmt: read base disk at %d: %w", off, err)
		}
		for i := int64(0); i < n; i++ {
			g, w := got[i*ChangeBlockSize:(i+1)*ChangeBlockSize], was[i*ChangeBlockSize:(i+1)*ChangeBlockSize]
			st.Examined++
			if bytes.Equal(g, w) {
				st.Unchanged++
				continue
			}
			zeroed := bytes.Equal(g, zero[:])
			if zeroed {
				st.Zeroed++
			} else {
				st.Data++
			}
			index = appendBlock(index, uint64(b+i), zeroed)
		}
		b += n
	}
	return index, nil
}

// appendBlock adds one block to index, extending the last segment when it
// is adjacent, of the same kind and not full.
func appendBlock(index []Segment, block uint64, zeroed bool) []Segment {
	const perBlock = ChangeBlockSize / SectorSize
	sector := block * perBlock
	if n := len(index); n > 0 {
		last := &index[n-1]
		if last.End() == sector && last.Zeroed == zeroed && last.Length < maxSegmentBlocks*perBlock {
			last.Length += perBlock
			return index
		}
	}
	return append(index, Segment{Offset: sector, Length: perBlock, MOffset: sector, Zeroed: zeroed})
}
