package lsmt

import (
	"errors"
	"fmt"
	"io"
)

// MaxLayers is the most layers a stack may hold, as upstream.
const MaxLayers = 255

// ErrNegativeOffset is returned for reads at a negative offset.
var ErrNegativeOffset = errors.New("lsmt: negative offset")

// StackLayer is what a Stack needs of a layer: its index and the byte space
// the index points into. *Layer implements it.
type StackLayer interface {
	Index() []Segment
	Source() io.ReaderAt
	VirtualSize() int64
}

// Stack is the merged view of layers, bottom first: the disk a container
// sees. Upper layers win; gaps fall through to lower layers; an upper zeroed
// segment masks lower data. It is safe for concurrent use when the layers'
// sources are.
type Stack struct {
	sources []io.ReaderAt
	index   segmentIndex
	vsize   int64
}

// Piece is one part of a mapped range: Length bytes at virtual disk offset
// Offset are served by layer Layer (0 = bottom) at LayerOffset in that
// layer's byte space, or are zeros when Zeroed.
type Piece struct {
	Offset      int64
	Length      int64
	Layer       int
	LayerOffset int64 // 0 when Zeroed
	Zeroed      bool
}

// NewStack merges layers given bottom first. The virtual size is that of
// the top-most layer with a non-zero one.
func NewStack(layers []StackLayer) (*Stack, error) {
	if len(layers) == 0 {
		return nil, errors.New("lsmt: a stack needs at least one layer")
	}
	if len(layers) > MaxLayers {
		return nil, fmt.Errorf("lsmt: %d layers, at most %d can be stacked", len(layers), MaxLayers)
	}
	indexes := make([]segmentIndex, len(layers))
	sources := make([]io.ReaderAt, len(layers))
	var vsize int64
	total := 0
	for i, l := range layers {
		indexes[i] = newSegmentIndex(l.Index())
		sources[i] = l.Source()
		if v := l.VirtualSize(); v > 0 {
			vsize = v
		}
		total += len(l.Index())
	}
	m := merger{layers: indexes, out: make([]Segment, 0, total)}
	m.merge(len(layers)-1, 0, MaxOffset)
	return &Stack{sources: sources, index: newSegmentIndex(m.out), vsize: vsize}, nil
}

// merger builds the merged index top-down, as upstream's merge_indexes: the
// top layer's segments are taken as they are and each gap between them is
// filled from the layers below, recursively.
type merger struct {
	layers []segmentIndex // bottom first
	out    []Segment
}

func (m *merger) merge(level int, begin, end uint64) {
	if level < 0 || begin >= end {
		return
	}
	x := &m.layers[level]
	for i := x.find(begin); i < len(x.segs) && x.segs[i].Offset < end; i++ {
		s := x.segs[i]
		if s.Offset > begin {
			m.merge(level-1, begin, s.Offset)
		}
		if s.Offset < begin {
			s.trimFront(begin - s.Offset)
		}
		if s.End() > end {
			s.Length = uint32(end - s.Offset)
		}
		s.Tag = uint8(level)
		m.out = append(m.out, s)
		begin = s.End()
	}
	m.merge(level-1, begin, end)
}

// VirtualSize is the size in bytes of the merged disk.
func (s *Stack) VirtualSize() int64 { return s.vsize }

// Layers is the number of layers in the stack.
func (s *Stack) Layers() int { return len(s.sources) }

// Segments returns the merged index; Tag is the layer (0 = bottom). The
// caller must not modify it.
func (s *Stack) Segments() []Segment { return s.index.segs }

// Map returns the mapped pieces of [off, off+n) in order. Holes (ranges no
// layer maps) are left out; zeroed pieces are included with Zeroed set.
func (s *Stack) Map(off, n int64) []Piece { return s.AppendMap(nil, off, n) }

// AppendMap is Map appending to dst, for callers that reuse a buffer.
func (s *Stack) AppendMap(dst []Piece, off, n int64) []Piece {
	if off < 0 || n <= 0 {
		return dst
	}
	end := off + n
	segs := s.index.segs
	for i := s.index.find(uint64(off) / SectorSize); i < len(segs); i++ {
		seg := &segs[i]
		start := int64(seg.Offset) * SectorSize
		if start >= end {
			break
		}
		from := max(start, off)
		p := Piece{
			Offset: from,
			Length: min(int64(seg.End())*SectorSize, end) - from,
			Layer:  int(seg.Tag),
			Zeroed: seg.Zeroed,
		}
		if !seg.Zeroed {
			p.LayerOffset = int64(seg.MOffset)*SectorSize + from - start
		}
		dst = append(dst, p)
	}
	return dst
}

// ReadAt reads the merged disk. Holes and zeroed segments read as zeros.
func (s *Stack) ReadAt(p []byte, off int64) (int, error) {
	return readMapped(p, off, s.vsize, &s.index, func(tag uint8) io.ReaderAt { return s.sources[tag] })
}

func wrapLayerErr(tag uint8, err error) error {
	return fmt.Errorf("lsmt: read layer %d: %w", tag, err)
}
