package trace

import (
	"fmt"
	"math"
	"math/bits"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/protobuf/proto"

	tracev1 "github.com/obdtrace/obdtrace/proto/obdtrace/v1"
)

// FormatV1 is the format field of every trace.pb this package writes and the only one it reads.
const FormatV1 = "obdtrace.v1"

// TimeResolution is the precision trace.pb keeps for Frame.TimeNS: MarshalPB rounds each time
// down to a multiple of it. Prefetch pacing works at network round-trip scale (milliseconds),
// and µs units keep the time deltas of a start-up to one or two bytes where ns would take
// three; that decides whether a frame fits in 4 bytes.
const TimeResolution = time.Microsecond

const (
	// maxUnitShift bounds Frames.unit_shift; a 1 GiB unit is already beyond any real alignment.
	maxUnitShift = 30
	// maxTimeUnit bounds Frames.time_unit_ns at one second.
	maxTimeUnit = uint64(time.Second)
)

// MarshalPB encodes t as a trace.pb message. It rejects a trace that fails Validate, and keeps
// frame times to TimeResolution (see there); everything else round-trips exactly through
// UnmarshalPB.
func MarshalPB(t *Trace) ([]byte, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	msg := &tracev1.Trace{
		Format:   FormatV1,
		Layers:   make([]*tracev1.Layer, len(t.Layers)),
		Metadata: metaToPB(&t.Meta),
		Frames:   encodeFrames(t.Frames, len(t.Layers)),
	}
	for i, l := range t.Layers {
		msg.Layers[i] = &tracev1.Layer{Digest: string(l.Digest), Size: uint64(l.Size), MediaType: l.MediaType}
	}
	// Deterministic so the same trace always yields the same bytes, hence the same layer digest.
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
	if err != nil { // only strings that are not UTF-8, which proto3 forbids
		return nil, fmt.Errorf("%w: marshal protobuf: %v", ErrInvalid, err)
	}
	return b, nil
}

func metaToPB(m *Meta) *tracev1.Metadata {
	pm := &tracev1.Metadata{
		DurationNs:      int64(m.Duration),
		KernelRelease:   m.KernelRelease,
		RecorderVersion: m.RecorderVersion,
		Source:          tracev1.Source(m.Source),
		Runs:            uint32(m.Runs),
		ImageRef:        m.ImageRef,
		ManifestDigest:  string(m.ManifestDigest),
	}
	if !m.Start.IsZero() {
		pm.StartUnixNano = m.Start.UnixNano()
	}
	return pm
}

// Bits of a Frames.head entry below the length.
const (
	headJumped       = 1 << 0
	headLayerChanged = 1 << 1
	headLengthShift  = 2
)

// encodeFrames builds the columns described in trace.proto from valid frames.
func encodeFrames(frames []Frame, nLayers int) *tracev1.Frames {
	shift := unitShift(frames)
	unit := int64(TimeResolution)
	fs := &tracev1.Frames{
		UnitShift:  uint32(shift),
		TimeUnitNs: uint64(unit),
		Head:       make([]uint64, len(frames)),
	}
	timeDelta := make([]int64, len(frames))
	ends := make([]int64, nLayers) // predicted offset of each layer's next frame
	var prevTime int64
	timed := false
	for i, f := range frames {
		head := uint64(f.Length>>shift-1) << headLengthShift
		if i == 0 || f.Layer != frames[i-1].Layer {
			head |= headLayerChanged
			fs.Layer = append(fs.Layer, uint32(f.Layer))
		}
		if f.Offset != ends[f.Layer] {
			head |= headJumped
			// Both terms are non-negative multiples of the unit, so the difference cannot
			// overflow and the arithmetic shift divides exactly.
			fs.Jump = append(fs.Jump, (f.Offset-ends[f.Layer])>>shift)
		}
		fs.Head[i] = head
		ends[f.Layer] = f.End()
		q := f.TimeNS / unit
		timeDelta[i] = q - prevTime
		prevTime = q
		timed = timed || q != 0
	}
	if timed {
		fs.TimeDelta = timeDelta
	}
	return fs
}

// unitShift returns log2 of the largest power of two (up to 2^maxUnitShift) dividing every
// offset and length.
func unitShift(frames []Frame) int {
	var or uint64
	for _, f := range frames {
		or |= uint64(f.Offset) | uint64(f.Length)
	}
	if or == 0 {
		return 0
	}
	return min(bits.TrailingZeros64(or), maxUnitShift)
}

// UnmarshalPB decodes a trace.pb message written by MarshalPB (or any encoder of trace.proto),
// checking every column against the others and every value for range and overflow. Errors wrap
// ErrFormat for data that is not a trace.pb of this format, otherwise ErrInvalid or ErrTooLarge.
func UnmarshalPB(data []byte) (*Trace, error) {
	var msg tracev1.Trace
	if err := proto.Unmarshal(data, &msg); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	if msg.Format != FormatV1 {
		f := msg.Format
		if len(f) > 32 {
			f = f[:32] + "..."
		}
		return nil, fmt.Errorf("%w: format field is %q, want %q", ErrFormat, f, FormatV1)
	}
	if len(msg.Layers) > MaxLayers {
		return nil, fmt.Errorf("%w: %d layers, at most %d", ErrTooLarge, len(msg.Layers), MaxLayers)
	}
	t := &Trace{}
	if len(msg.Layers) > 0 {
		t.Layers = make([]Layer, len(msg.Layers))
	}
	for i, l := range msg.Layers {
		if l.Size > math.MaxInt64 {
			return nil, fmt.Errorf("%w: layer %d: size %d overflows int64", ErrInvalid, i, l.Size)
		}
		t.Layers[i] = Layer{Digest: digest.Digest(l.Digest), Size: int64(l.Size), MediaType: l.MediaType}
	}
	if m := msg.Metadata; m != nil {
		t.Meta = Meta{
			Duration:        time.Duration(m.DurationNs),
			KernelRelease:   m.KernelRelease,
			RecorderVersion: m.RecorderVersion,
			Source:          Source(m.Source),
			Runs:            int(m.Runs),
			ImageRef:        m.ImageRef,
			ManifestDigest:  digest.Digest(m.ManifestDigest),
		}
		if m.StartUnixNano != 0 {
			t.Meta.Start = time.Unix(0, m.StartUnixNano).UTC()
		}
	}
	frames, err := decodeFrames(msg.Frames, len(t.Layers))
	if err != nil {
		return nil, err
	}
	t.Frames = frames
	// Layers and metadata still need their own checks (digests, signs); frames pass again cheaply.
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return t, nil
}

// decodeFrames rebuilds frames from their columns. Allocation is bounded by the columns already
// decoded, which protobuf sized from the input itself, never by a count field.
func decodeFrames(fs *tracev1.Frames, nLayers int) ([]Frame, error) {
	if fs == nil {
		return nil, nil
	}
	if err := checkColumns(fs); err != nil {
		return nil, err
	}
	d := frameDecoder{fs: fs, ends: make([]int64, nLayers), timeUnit: int64(max(fs.TimeUnitNs, 1))}
	var frames []Frame // nil when empty, as the model is built elsewhere
	if len(fs.Head) > 0 {
		frames = make([]Frame, len(fs.Head))
	}
	for i := range frames {
		if err := d.next(i, &frames[i]); err != nil {
			return nil, fmt.Errorf("frame %d: %w", i, err)
		}
	}
	if d.layers != len(fs.Layer) || d.jumps != len(fs.Jump) {
		return nil, fmt.Errorf("%w: heads use %d of %d layer entries and %d of %d jumps",
			ErrInvalid, d.layers, len(fs.Layer), d.jumps, len(fs.Jump))
	}
	return frames, nil
}

// frameDecoder walks the columns of a Frames message, one frame at a time.
type frameDecoder struct {
	fs       *tracev1.Frames
	ends     []int64 // predicted offset of each layer's next frame
	timeUnit int64
	layers   int // layer entries consumed
	jumps    int // jump entries consumed
	layer    int
	now      int64
}

func (d *frameDecoder) next(i int, f *Frame) error {
	head, shift := d.fs.Head[i], d.fs.UnitShift
	if head&headLayerChanged != 0 {
		if d.layers == len(d.fs.Layer) {
			return fmt.Errorf("%w: layer column has only %d entries", ErrInvalid, len(d.fs.Layer))
		}
		l := d.fs.Layer[d.layers]
		if int64(l) >= int64(len(d.ends)) {
			return fmt.Errorf("%w: layer index %d, trace has %d layers", ErrInvalid, l, len(d.ends))
		}
		d.layer, d.layers = int(l), d.layers+1
	} else if i == 0 {
		return fmt.Errorf("%w: first frame does not set its layer", ErrInvalid)
	}
	f.Layer, f.Offset = d.layer, d.ends[d.layer]
	if head&headJumped != 0 {
		if d.jumps == len(d.fs.Jump) {
			return fmt.Errorf("%w: jump column has only %d entries", ErrInvalid, len(d.fs.Jump))
		}
		j := d.fs.Jump[d.jumps]
		d.jumps++
		delta, ok := shiftLeft(j, shift)
		if !ok || (delta > 0 && f.Offset > math.MaxInt64-delta) || f.Offset+delta < 0 {
			return fmt.Errorf("%w: jump of %d units from offset %d is out of range", ErrInvalid, j, f.Offset)
		}
		f.Offset += delta
	}
	units := head >> headLengthShift
	if units >= math.MaxInt64>>shift || int64((units+1)<<shift) > math.MaxInt64-f.Offset {
		return fmt.Errorf("%w: length of %d units at offset %d overflows", ErrInvalid, units+1, f.Offset)
	}
	f.Length = int64((units + 1) << shift)
	d.ends[f.Layer] = f.End()
	if len(d.fs.TimeDelta) == 0 {
		return nil
	}
	td, unit := d.fs.TimeDelta[i], d.timeUnit
	if td > math.MaxInt64/unit || td < -math.MaxInt64/unit ||
		(td > 0 && d.now > math.MaxInt64-td*unit) || d.now+td*unit < 0 {
		return fmt.Errorf("%w: time delta %d x %d ns from %d ns is out of range", ErrInvalid, td, unit, d.now)
	}
	d.now += td * unit
	f.TimeNS = d.now
	return nil
}

// checkColumns checks the scalar fields and the sizes of the columns.
func checkColumns(fs *tracev1.Frames) error {
	n := len(fs.Head)
	switch {
	case n > MaxFrames:
		return fmt.Errorf("%w: %d frames, at most %d", ErrTooLarge, n, MaxFrames)
	case len(fs.TimeDelta) != 0 && len(fs.TimeDelta) != n:
		return fmt.Errorf("%w: %d time deltas for %d frames", ErrInvalid, len(fs.TimeDelta), n)
	case fs.UnitShift > maxUnitShift:
		return fmt.Errorf("%w: unit shift %d, at most %d", ErrInvalid, fs.UnitShift, maxUnitShift)
	case fs.TimeUnitNs > maxTimeUnit:
		return fmt.Errorf("%w: time unit %d ns, at most %d", ErrInvalid, fs.TimeUnitNs, maxTimeUnit)
	}
	return nil
}

// shiftLeft returns v * 2^shift, or false if that overflows int64.
func shiftLeft(v int64, shift uint32) (int64, bool) {
	if v > math.MaxInt64>>shift || v < math.MinInt64>>shift {
		return 0, false
	}
	return v << shift, true
}
