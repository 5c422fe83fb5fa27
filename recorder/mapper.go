package recorder

import (
	"errors"
	"fmt"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/trace"
)

// Defaults for MapperOptions.
const (
	// DefaultMaxFrames keeps a mapper's frames within 32 MiB. A container start-up reads tens of
	// thousands of ranges; a million means the recording ran far past start-up.
	DefaultMaxFrames = 1 << 20
	// DefaultMaxFrameLength stops merging at upstream's record size (trace.MaxRecordLength), so
	// a long sequential read keeps a time for each MiB and the binary form needs no splitting.
	DefaultMaxFrameLength = trace.MaxRecordLength
)

// mapChunk bounds the range mapped at once, so the piece buffer stays small (at most 8192
// pieces) whatever length a request claims. Kernel requests are rarely over 1 MiB.
const mapChunk = 4 << 20

// maxLayerSectors bounds a layer's byte space (the highest sector its merged segments map),
// so the dedup page directory (8 bytes per 16 MiB) stays within 32 MiB. Committed layers are
// bounded by their blob size; this only stops a hand-made StackLayer with absurd offsets.
const maxLayerSectors = 1 << 22 << pageShift

// ErrLayerTooLarge reports a stack whose layers map offsets beyond what the mapper tracks.
var ErrLayerTooLarge = errors.New("recorder: layer byte space too large")

// ErrLayers reports a layer list that does not match the mapper's stack.
var ErrLayers = errors.New("recorder: layer list does not match the stack")

// Request is one block request captured on the image's device.
type Request struct {
	// TimeNS is when the request was issued, on the clock of MapperOptions.StartNS (the
	// kernel's monotonic clock for eBPF captures).
	TimeNS int64
	// Sector is the first 512-byte sector on the device; Sectors is the request's length.
	Sector  uint64
	Sectors uint32
}

// MapperOptions tune a Mapper. The zero value uses the defaults.
type MapperOptions struct {
	// StartNS is when the recording started; frame times count from it. Requests stamped
	// earlier get time 0.
	StartNS int64
	// MaxFrames caps the frames kept (default DefaultMaxFrames). Once reached, the trace is
	// truncated: it stays the prefix recorded so far and later bytes are only counted.
	MaxFrames int
	// MaxFrameLength is the longest a frame grows by merging (default DefaultMaxFrameLength).
	// One mapped piece of a request is never split, so a frame can exceed it by one piece.
	MaxFrameLength int64
}

// Stats counts what a Mapper has seen. Bytes are counted once per request piece.
type Stats struct {
	Requests       int64
	RequestedBytes int64
	// UnmappedBytes were holes, zeroed segments or past the disk's end: nothing to prefetch.
	UnmappedBytes int64
	// RereadBytes were mapped to layer bytes already recorded.
	RereadBytes int64
	// RecordedBytes are in the frames; LayerBytes splits them by layer (0 = bottom).
	RecordedBytes int64
	LayerBytes    []int64
	Frames        int
	// Truncated says MaxFrames was reached; DroppedBytes were first read after that and are
	// not in the frames.
	Truncated    bool
	DroppedBytes int64
	// BitmapBytes is the memory held by the dedup bitmaps.
	BitmapBytes int64
}

// Mapper maps captured requests to trace frames through an image's merged index. It is not
// safe for concurrent use: feed it from the one goroutine that drains the capture.
type Mapper struct {
	stack  *lsmt.Stack
	start  int64
	maxLen int64
	cap    int
	vsize  uint64 // sectors of the merged disk

	sets   []sectorSet
	last   []int // index in frames of each layer's latest frame, -1 if none
	frames []trace.Frame
	pieces []lsmt.Piece
	stats  Stats
}

// NewMapper returns a mapper for a device that presents stack.
func NewMapper(stack *lsmt.Stack, opts MapperOptions) (*Mapper, error) {
	limits := make([]uint64, stack.Layers())
	for _, s := range stack.Segments() {
		if !s.Zeroed {
			limits[s.Tag] = max(limits[s.Tag], s.MEnd())
		}
	}
	m := &Mapper{
		stack:  stack,
		start:  opts.StartNS,
		maxLen: opts.MaxFrameLength,
		cap:    opts.MaxFrames,
		vsize:  uint64(stack.VirtualSize()) / lsmt.SectorSize,
		sets:   make([]sectorSet, len(limits)),
		last:   make([]int, len(limits)),
		pieces: make([]lsmt.Piece, 0, 64),
	}
	if m.maxLen <= 0 {
		m.maxLen = DefaultMaxFrameLength
	}
	if m.cap <= 0 {
		m.cap = DefaultMaxFrames
	}
	for i, limit := range limits {
		if limit > maxLayerSectors {
			return nil, fmt.Errorf("%w: layer %d maps up to byte %d, more than %d",
				ErrLayerTooLarge, i, limit*lsmt.SectorSize, uint64(maxLayerSectors)*lsmt.SectorSize)
		}
		m.sets[i] = newSectorSet(limit)
	}
	m.Reset()
	return m, nil
}

// Reset forgets every request, keeping the memory already allocated.
func (m *Mapper) Reset() {
	for i := range m.sets {
		m.sets[i].reset()
		m.last[i] = -1
	}
	m.frames = m.frames[:0]
	m.stats = Stats{}
}

// Add maps one request. It does not allocate once its buffers have grown to the workload.
func (m *Mapper) Add(r Request) {
	m.stats.Requests++
	n := int64(r.Sectors) * lsmt.SectorSize
	m.stats.RequestedBytes += n
	from, to := r.Sector, r.Sector+uint64(r.Sectors)
	if to < from || to > m.vsize { // past the disk's end: the kernel would fail it
		to = max(from, m.vsize)
	}
	mapped := int64(0)
	t := max(r.TimeNS-m.start, 0)
	for s := from; s < to; {
		e := min(to, s+mapChunk/lsmt.SectorSize)
		m.pieces = m.stack.AppendMap(m.pieces[:0], int64(s)*lsmt.SectorSize, int64(e-s)*lsmt.SectorSize)
		for i := range m.pieces {
			if p := &m.pieces[i]; !p.Zeroed {
				mapped += p.Length
				m.record(p.Layer, uint64(p.LayerOffset)/lsmt.SectorSize, uint64(p.Length)/lsmt.SectorSize, t)
			}
		}
		s = e
	}
	m.stats.UnmappedBytes += n - mapped
}

// record adds sectors [x, x+n) of layer to the trace, skipping those already recorded.
func (m *Mapper) record(layer int, x, n uint64, t int64) {
	set := &m.sets[layer]
	for end := x + n; x < end; {
		// Most reads are new: try adding first, so they take one pass over the bitmap.
		if y := set.addUntilSet(x, end); y > x {
			m.emit(layer, int64(x)*lsmt.SectorSize, int64(y-x)*lsmt.SectorSize, t)
			x = y
			continue
		}
		y := set.firstClear(x, end)
		m.stats.RereadBytes += int64(y-x) * lsmt.SectorSize
		x = y
	}
}

// emit appends a new byte range to the trace, merging it into the layer's latest frame when
// it continues it.
func (m *Mapper) emit(layer int, off, n, t int64) {
	if m.stats.Truncated {
		m.stats.DroppedBytes += n
		return
	}
	if i := m.last[layer]; i >= 0 {
		if f := &m.frames[i]; f.End() == off && f.Length < m.maxLen {
			f.Length += n
			m.stats.RecordedBytes += n
			return
		}
	}
	if len(m.frames) >= m.cap {
		m.stats.Truncated = true
		m.stats.DroppedBytes += n
		return
	}
	m.last[layer] = len(m.frames)
	m.frames = append(m.frames, trace.Frame{Layer: layer, Offset: off, Length: n, TimeNS: t})
	m.stats.RecordedBytes += n
}

// Frames returns the frames so far in first-access order. The slice is the mapper's own: it
// changes with the next Add, and the caller must not modify it.
func (m *Mapper) Frames() []trace.Frame { return m.frames }

// Stats returns the counters so far.
func (m *Mapper) Stats() Stats {
	s := m.stats
	s.Frames = len(m.frames)
	s.LayerBytes = make([]int64, len(m.sets))
	for _, f := range m.frames {
		s.LayerBytes[f.Layer] += f.Length
	}
	for i := range m.sets {
		s.BitmapBytes += int64(m.sets[i].pagesInUse()) * pageWords * 8
	}
	return s
}

// Trace returns the recording as a trace of the image whose layers, bottom first as in the
// stack, are layers. The frames are copied; meta is taken as is.
func (m *Mapper) Trace(layers []trace.Layer, meta trace.Meta) (*trace.Trace, error) {
	if len(layers) != len(m.sets) {
		return nil, fmt.Errorf("%w: %d layers given, the stack has %d", ErrLayers, len(layers), len(m.sets))
	}
	t := &trace.Trace{
		Layers: append([]trace.Layer(nil), layers...),
		Meta:   meta,
		Frames: append([]trace.Frame(nil), m.frames...),
	}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("recorder: %w", err)
	}
	return t, nil
}
