package replayer

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/obdtrace/obdtrace/trace"
)

// Trace layer file names: ours (authoritative) and upstream's.
const (
	TraceLayerPB     = "trace.pb"
	TraceLayerBinary = "trace"
	// maxTraceLayerFile bounds a file read out of a trace layer.
	maxTraceLayerFile = 64 << 20
)

// ErrNotTrace is returned for data that is no trace this package replays.
var ErrNotTrace = errors.New("replayer: not a replayable trace")

// Load decodes a trace file: protobuf (trace.pb) or upstream's binary trace.
// A binary trace carries no layer list: its frames name image layers by
// position, as upstream replays them. Path lists need the filesystem and
// are not handled here.
func Load(data []byte) (*trace.Trace, error) {
	switch k := trace.Detect(data); k {
	case trace.KindProtobuf:
		return trace.UnmarshalPB(data)
	case trace.KindBinary:
		frames, err := trace.ReadBinary(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return nil, err
		}
		return &trace.Trace{Meta: trace.Meta{Source: trace.SourceUpstream, Runs: 1}, Frames: frames}, nil
	default:
		return nil, fmt.Errorf("%w: %v (%d bytes)", ErrNotTrace, k, len(data))
	}
}

// LoadLayer reads a trace layer (an uncompressed tar) and decodes its
// trace.pb, or its upstream trace when it has no trace.pb.
func LoadLayer(r io.Reader) (*trace.Trace, error) {
	files := map[string][]byte{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("replayer: trace layer: %w", err)
		}
		if h.Typeflag != tar.TypeReg || (h.Name != TraceLayerPB && h.Name != TraceLayerBinary) {
			continue
		}
		if h.Size > maxTraceLayerFile {
			return nil, fmt.Errorf("replayer: trace layer: %s is %d bytes, over %d", h.Name, h.Size, maxTraceLayerFile)
		}
		b, err := io.ReadAll(io.LimitReader(tr, h.Size))
		if err != nil {
			return nil, fmt.Errorf("replayer: trace layer: %s: %w", h.Name, err)
		}
		files[h.Name] = b
	}
	for _, name := range []string{TraceLayerPB, TraceLayerBinary} {
		if b, ok := files[name]; ok {
			t, err := Load(b)
			if err != nil {
				return nil, fmt.Errorf("replayer: trace layer %s: %w", name, err)
			}
			return t, nil
		}
	}
	return nil, fmt.Errorf("%w: trace layer holds neither %s nor %s", ErrNotTrace, TraceLayerPB, TraceLayerBinary)
}
