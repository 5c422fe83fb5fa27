package image

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/trace"
)

// Layer annotations, as upstream's snapshotter reads them.
const (
	AnnotationPrefix = "containerd.io/snapshot/overlaybd/"
	// AnnotationAcceleration marks the trace layer ("yes").
	AnnotationAcceleration = AnnotationPrefix + "acceleration-layer"
	AnnotationBlobDigest   = AnnotationPrefix + "blob-digest"
	AnnotationBlobSize     = AnnotationPrefix + "blob-size"
	AnnotationVersion      = AnnotationPrefix + "version"
	// Version is the overlaybd layer version upstream writes.
	Version = "0.1.0"
)

// Docker media types; the OCI ones come from image-spec.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	// MediaTypeDockerLayer is an uncompressed docker layer, the trace layer's type in a
	// docker-typed manifest.
	MediaTypeDockerLayer = "application/vnd.docker.image.rootfs.diff.tar"
)

// Names of the files in a trace layer.
const (
	// FilePB is this project's trace.pb, authoritative when present.
	FilePB = "trace.pb"
	// FileUpstream is upstream's binary trace (or path list), the only file upstream reads.
	FileUpstream = "trace"
)

// maxLayerFile bounds each file read from a trace layer: the largest binary trace the trace
// package accepts. A trace.pb of as many frames is smaller.
const maxLayerFile = trace.BinaryHeaderSize + trace.BinaryRecordSize*trace.MaxFrames

// maxLayerEntries bounds the tar entries read before giving up on finding the trace files.
const maxLayerEntries = 1024

// Layer is a trace layer: the blob and the descriptor a manifest lists it by.
type Layer struct {
	Data []byte
	Desc ocispec.Descriptor
}

// BuildLayer encodes t as a trace layer with the given media type (the OCI or the docker
// uncompressed layer type, matching the manifest it goes into). The blob depends only on t, so
// the same trace always gives the same digest.
func BuildLayer(t *trace.Trace, mediaType string) (*Layer, error) {
	if mediaType != ocispec.MediaTypeImageLayer && mediaType != MediaTypeDockerLayer {
		return nil, fmt.Errorf("%w: trace layer media type %q, want %q or %q",
			ErrUnsupported, mediaType, ocispec.MediaTypeImageLayer, MediaTypeDockerLayer)
	}
	var buf bytes.Buffer
	if err := WriteLayer(&buf, t); err != nil {
		return nil, err
	}
	d := digest.FromBytes(buf.Bytes())
	return &Layer{
		Data: buf.Bytes(),
		Desc: ocispec.Descriptor{
			MediaType: mediaType,
			Digest:    d,
			Size:      int64(buf.Len()),
			Annotations: map[string]string{
				AnnotationAcceleration: "yes",
				AnnotationBlobDigest:   d.String(),
				AnnotationBlobSize:     strconv.Itoa(buf.Len()),
				AnnotationVersion:      Version,
			},
		},
	}, nil
}

// WriteLayer writes t as the uncompressed tar of a trace layer: FileUpstream (upstream's
// binary trace) and FilePB, in name order, each read-only, owned by root and dated 1970, so
// the bytes depend only on t.
func WriteLayer(w io.Writer, t *trace.Trace) error {
	pb, err := trace.MarshalPB(t)
	if err != nil {
		return fmt.Errorf("image: encode %s: %w", FilePB, err)
	}
	var bin bytes.Buffer
	if err := trace.ToBinary(&bin, t); err != nil {
		return fmt.Errorf("image: encode %s: %w", FileUpstream, err)
	}
	tw := tar.NewWriter(w)
	for _, f := range []struct {
		name string
		data []byte
	}{{FileUpstream, bin.Bytes()}, {FilePB, pb}} {
		h := &tar.Header{
			Typeflag: tar.TypeReg,
			Name:     f.name,
			Mode:     0o444,
			Size:     int64(len(f.data)),
			ModTime:  time.Unix(0, 0),
			Format:   tar.FormatUSTAR,
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("image: write %s header: %w", f.name, err)
		}
		if _, err := tw.Write(f.data); err != nil {
			return fmt.Errorf("image: write %s: %w", f.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image: finish trace layer: %w", err)
	}
	return nil
}

// LayerFiles are the trace files found in a trace layer; a missing one is nil.
type LayerFiles struct {
	PB       []byte
	Upstream []byte
}

// ReadLayerFiles reads a trace layer's tar stream and returns its trace files. It stops at
// FilePB, which is authoritative; names may carry a leading "./" or "/". Each file may hold
// at most what the trace package accepts, and memory grows only with the bytes actually read.
func ReadLayerFiles(r io.Reader) (LayerFiles, error) {
	var files LayerFiles
	tr := tar.NewReader(r)
	for i := 0; ; i++ {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return files, fmt.Errorf("%w: tar entry %d: %v", ErrLayer, i, err)
		}
		if i == maxLayerEntries {
			return files, fmt.Errorf("%w: no %s in the first %d tar entries", ErrLayer, FilePB, maxLayerEntries)
		}
		name := path.Clean("/" + h.Name)[1:]
		if h.Typeflag != tar.TypeReg || name != FilePB && name != FileUpstream {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(tr, maxLayerFile+1))
		if err != nil {
			return files, fmt.Errorf("%w: read %s: %v", ErrLayer, name, err)
		}
		if len(data) > maxLayerFile {
			return files, fmt.Errorf("%w: %s is over %d bytes", ErrLayer, name, maxLayerFile)
		}
		if name == FilePB {
			files.PB = data
			return files, nil
		}
		files.Upstream = data
	}
	if files.Upstream == nil {
		return files, fmt.Errorf("%w: neither %s nor %s in the layer", ErrNoTrace, FilePB, FileUpstream)
	}
	return files, nil
}

// Trace decodes the files: trace.pb when present, else upstream's binary trace, whose frames
// index layers (the image's layers bottom first; the binary form names none). An upstream path
// list is not a trace: the error wraps ErrNoTrace and trace.ErrPathList.
func (f LayerFiles) Trace(layers []trace.Layer) (*trace.Trace, error) {
	if f.PB != nil {
		t, err := trace.UnmarshalPB(f.PB)
		if err != nil {
			return nil, fmt.Errorf("image: file %q: %w", FilePB, err)
		}
		return t, nil
	}
	switch k := trace.Detect(f.Upstream); k {
	case trace.KindBinary:
		frames, err := trace.ReadBinary(bytes.NewReader(f.Upstream), int64(len(f.Upstream)))
		if err != nil {
			return nil, fmt.Errorf("image: file %q: %w", FileUpstream, err)
		}
		t, err := trace.FromBinary(frames, layers)
		if err != nil {
			return nil, fmt.Errorf("image: file %q: %w", FileUpstream, err)
		}
		return t, nil
	case trace.KindPathList:
		return nil, fmt.Errorf("%w: %s holds a path list (%w)", ErrNoTrace, FileUpstream, trace.ErrPathList)
	default:
		return nil, fmt.Errorf("%w: %s holds %s content", ErrNoTrace, FileUpstream, k)
	}
}

// ReadLayer reads a trace layer's tar stream and decodes its trace; see LayerFiles.Trace for
// layers.
func ReadLayer(r io.Reader, layers []trace.Layer) (*trace.Trace, error) {
	f, err := ReadLayerFiles(r)
	if err != nil {
		return nil, err
	}
	return f.Trace(layers)
}

// IsTraceLayer says whether desc is annotated as a trace (acceleration) layer.
func IsTraceLayer(desc ocispec.Descriptor) bool {
	return desc.Annotations[AnnotationAcceleration] == "yes"
}
