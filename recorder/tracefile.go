package recorder

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/trace"
)

// Format is an encoding of a trace file.
type Format string

// Formats a trace file can be written in.
const (
	// FormatPB is this project's trace.pb.
	FormatPB Format = "pb"
	// FormatOBD is upstream overlaybd's binary trace: no times, no layer digests.
	FormatOBD Format = "obd"
)

// MaxTraceFile bounds a trace file read by ReadTraceFile: a trace layer holding the largest
// binary trace and trace.pb the trace package accepts fits.
const MaxTraceFile = 1 << 30

// ErrFormat reports a file that holds no trace in a form this package reads.
var ErrFormat = errors.New("recorder: not a trace")

// DecodeTrace decodes a trace in any form a user may hold: trace.pb, upstream's binary trace,
// or a trace layer (a tar holding them). Upstream's binary form names no layers: layers, the
// image's bottom first, supplies them; when nil, the trace gets placeholder layers without
// digests, enough to inspect it or to write it back as binary, but not to encode it as
// trace.pb.
func DecodeTrace(data []byte, layers []trace.Layer) (*trace.Trace, error) {
	switch k := trace.Detect(data); {
	case k == trace.KindProtobuf:
		return trace.UnmarshalPB(data)
	case k == trace.KindBinary:
		frames, err := trace.ReadBinary(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return nil, err
		}
		if layers != nil {
			return trace.FromBinary(frames, layers)
		}
		return withPlaceholderLayers(frames)
	case isTar(data):
		f, err := image.ReadLayerFiles(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		if f.PB == nil && trace.Detect(f.Upstream) == trace.KindBinary {
			return DecodeTrace(f.Upstream, layers)
		}
		return f.Trace(layers)
	default:
		return nil, fmt.Errorf("%w: the file holds %s content (want trace.pb, a binary trace or a trace layer)", ErrFormat, k)
	}
}

// withPlaceholderLayers makes a trace of frames read from a binary trace whose layers are
// unknown: one digest-less layer per index up to the highest used.
func withPlaceholderLayers(frames []trace.Frame) (*trace.Trace, error) {
	n := 0
	for _, f := range frames {
		if f.Layer >= trace.MaxLayers {
			return nil, fmt.Errorf("%w: frame names layer %d, at most %d layers exist", trace.ErrInvalid, f.Layer, trace.MaxLayers)
		}
		n = max(n, f.Layer+1)
	}
	return &trace.Trace{
		Layers: make([]trace.Layer, n),
		Meta:   trace.Meta{Source: trace.SourceUpstream, Runs: 1},
		Frames: frames,
	}, nil
}

// isTar says whether data starts with a POSIX or GNU tar header.
func isTar(data []byte) bool {
	return len(data) >= 512 && bytes.HasPrefix(data[257:], []byte("ustar"))
}

// ReadTraceFile reads and decodes the trace file at path (see DecodeTrace).
func ReadTraceFile(path string, layers []trace.Layer) (*trace.Trace, error) {
	data, err := iox.ReadFileLimit(path, MaxTraceFile)
	if errors.Is(err, iox.ErrTooLarge) {
		return nil, fmt.Errorf("%w: %w", trace.ErrTooLarge, err)
	}
	if err != nil {
		return nil, fmt.Errorf("recorder: read trace: %w", err)
	}
	t, err := DecodeTrace(data, layers)
	if err != nil {
		return nil, fmt.Errorf("recorder: %s: %w", path, err)
	}
	return t, nil
}

// EncodeTrace encodes t in format. FormatOBD keeps only the frames' ranges and order.
func EncodeTrace(t *trace.Trace, format Format) ([]byte, error) {
	switch format {
	case FormatPB:
		return trace.MarshalPB(t)
	case FormatOBD:
		var buf bytes.Buffer
		if err := trace.WriteBinary(&buf, t.Frames); err != nil {
			return nil, err
		}
		return buf.Bytes(), nil
	}
	return nil, fmt.Errorf("%w: unknown format %q (want %q or %q)", ErrFormat, format, FormatPB, FormatOBD)
}

// WriteTraceFile writes t to path in format, atomically: path holds its old content or the
// whole new trace, never part of it.
func WriteTraceFile(path string, t *trace.Trace, format Format) error {
	data, err := EncodeTrace(t, format)
	if err != nil {
		return err
	}
	return atomicfile.WriteFunc(path, 0o644, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}
