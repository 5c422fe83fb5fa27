// Package trace owns the trace model — which byte ranges of which layers of an overlaybd image
// a container read at start-up, in order, with first-access times — and its two encodings:
// trace.pb, this project's compact protobuf form (MarshalPB, UnmarshalPB), and upstream
// overlaybd's binary trace file (WriteBinary, ReadBinary). It also recognises the three things
// upstream accepts at a trace path (Detect) and parses upstream's path-list form
// (ParsePathList).
//
// Everything read from outside is validated: a corrupt or hostile file yields an error wrapping
// one of the package's sentinel errors, never a panic or an allocation larger than the input
// justifies.
package trace

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/opencontainers/go-digest"
)

// Limits on what the package reads or writes. They bound memory on untrusted input and are far
// above any real start-up trace (tens of thousands of frames, tens of layers).
const (
	// MaxFrames bounds the frames of a trace and the records of a binary trace.
	MaxFrames = 1 << 24
	// MaxLayers bounds the layers of a trace: overlaybd's merged index tags a segment's layer
	// with 8 bits, so no image it can serve has more.
	MaxLayers = 256
)

// Sentinel errors. Returned errors wrap one of them with what was wrong and where.
var (
	// ErrInvalid reports a value outside what the model allows: a negative or overflowing
	// offset or length, a layer index out of range, a malformed digest.
	ErrInvalid = errors.New("trace: invalid value")
	// ErrTooLarge reports input over a size limit (MaxFrames, MaxLayers, maxSize, 64 KiB for a
	// path list).
	ErrTooLarge = errors.New("trace: too large")
	// ErrBadMagic reports a binary trace that does not start with upstream's magic.
	ErrBadMagic = errors.New("trace: bad magic")
	// ErrTruncated reports input that ends before its header says it does.
	ErrTruncated = errors.New("trace: truncated")
	// ErrSize reports a binary trace whose size disagrees with its header.
	ErrSize = errors.New("trace: size mismatch")
	// ErrChecksum reports a binary trace whose records do not match the header's checksum.
	ErrChecksum = errors.New("trace: checksum mismatch")
	// ErrFormat reports input that is not a trace.pb message of a format this package reads.
	ErrFormat = errors.New("trace: not an obdtrace protobuf")
	// ErrPathList reports a malformed upstream path list.
	ErrPathList = errors.New("trace: bad path list")
)

// Trace is a recorded start-up: the image's layers, how the recording was made, and the frames
// read, in replay order.
type Trace struct {
	// Layers lists the image's layers bottom first; Frame.Layer indexes it.
	Layers []Layer
	Meta   Meta
	Frames []Frame
}

// Layer identifies one layer blob of the recorded image. A replayer matches frames to an image
// by Digest, so a trace still applies to the unchanged layers of a rebuilt image.
type Layer struct {
	Digest    digest.Digest
	Size      int64
	MediaType string
}

// Frame is one byte range of one layer, read for the first time at TimeNS.
type Frame struct {
	// Layer indexes Trace.Layers (0 = bottom).
	Layer int
	// Offset and Length locate the range in the layer's uncompressed LSMT byte space. A frame
	// is never empty.
	Offset, Length int64
	// TimeNS is the first access in ns since the recording started (monotonic clock). Upstream
	// binary traces carry no times, so frames read from one have TimeNS 0.
	TimeNS int64
}

// End returns the offset just past the frame.
func (f Frame) End() int64 { return f.Offset + f.Length }

// Source says how a trace came to be.
type Source int

// Sources, numbered as in trace.proto.
const (
	SourceUnspecified Source = iota
	SourceCLI                // recorded on demand by the record command
	SourceLabel              // recorded because a container carried the record-trace label
	SourceFleet              // merged from always-on recordings across nodes
	SourceUpstream           // converted from an upstream binary trace
)

func (s Source) String() string {
	switch s {
	case SourceUnspecified:
		return "unspecified"
	case SourceCLI:
		return "cli"
	case SourceLabel:
		return "label"
	case SourceFleet:
		return "fleet"
	case SourceUpstream:
		return "upstream"
	}
	return fmt.Sprintf("Source(%d)", int(s))
}

// Meta describes the recording. Every field is optional.
type Meta struct {
	// Start is the wall-clock time the recording started; zero if unknown.
	Start time.Time
	// Duration is how long the recording ran.
	Duration        time.Duration
	KernelRelease   string
	RecorderVersion string
	Source          Source
	// Runs is the number of recordings merged into the trace (1 for a single recording).
	Runs int
	// ImageRef is the reference the image was pulled by.
	ImageRef string
	// ManifestDigest is the recorded image's manifest digest, if known.
	ManifestDigest digest.Digest
}

// Validate reports the first thing in t that the encodings cannot carry or that a replayer
// could not trust, wrapping ErrInvalid or ErrTooLarge.
func (t *Trace) Validate() error {
	if len(t.Layers) > MaxLayers {
		return fmt.Errorf("%w: %d layers, at most %d", ErrTooLarge, len(t.Layers), MaxLayers)
	}
	if len(t.Frames) > MaxFrames {
		return fmt.Errorf("%w: %d frames, at most %d", ErrTooLarge, len(t.Frames), MaxFrames)
	}
	for i, l := range t.Layers {
		if err := l.Digest.Validate(); err != nil {
			return fmt.Errorf("%w: layer %d: digest %q: %v", ErrInvalid, i, l.Digest, err)
		}
		if l.Size < 0 {
			return fmt.Errorf("%w: layer %d: negative size %d", ErrInvalid, i, l.Size)
		}
	}
	if err := t.Meta.validate(); err != nil {
		return err
	}
	for i, f := range t.Frames {
		if err := f.validate(int64(len(t.Layers))); err != nil {
			return fmt.Errorf("frame %d: %w", i, err)
		}
	}
	return nil
}

func (m *Meta) validate() error {
	if m.ManifestDigest != "" {
		if err := m.ManifestDigest.Validate(); err != nil {
			return fmt.Errorf("%w: manifest digest %q: %v", ErrInvalid, m.ManifestDigest, err)
		}
	}
	if m.Duration < 0 {
		return fmt.Errorf("%w: negative duration %v", ErrInvalid, m.Duration)
	}
	if m.Runs < 0 || int64(m.Runs) > math.MaxUint32 {
		return fmt.Errorf("%w: runs %d out of range", ErrInvalid, m.Runs)
	}
	// Unknown sources pass, so a trace from a newer writer survives a round trip here.
	if m.Source < math.MinInt32 || m.Source > math.MaxInt32 {
		return fmt.Errorf("%w: source %d out of range", ErrInvalid, int(m.Source))
	}
	if !m.Start.IsZero() && !time.Unix(0, m.Start.UnixNano()).Equal(m.Start) {
		return fmt.Errorf("%w: start time %v not representable in ns since 1970", ErrInvalid, m.Start)
	}
	return nil
}

// validate checks one frame against a trace of nLayers layers.
func (f Frame) validate(nLayers int64) error {
	switch {
	case f.Layer < 0 || int64(f.Layer) >= nLayers:
		return fmt.Errorf("%w: layer index %d not in [0, %d)", ErrInvalid, f.Layer, nLayers)
	case f.Offset < 0 || f.Length <= 0:
		return fmt.Errorf("%w: range [%d, +%d) is negative or empty", ErrInvalid, f.Offset, f.Length)
	case f.Length > math.MaxInt64-f.Offset:
		return fmt.Errorf("%w: range [%d, +%d) overflows", ErrInvalid, f.Offset, f.Length)
	case f.TimeNS < 0:
		return fmt.Errorf("%w: negative time %d", ErrInvalid, f.TimeNS)
	}
	return nil
}
