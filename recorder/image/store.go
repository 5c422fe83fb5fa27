package image

import (
	"bytes"
	"context"
	"fmt"
	"io"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/trace"
)

// Store is where images are read and written: a local OCI layout (Layout) or a registry
// (containerd's remotes: a Resolver's Fetcher and Pusher give all four methods).
type Store interface {
	// ResolveManifest returns the descriptor of the manifest ref names. ref is a store-specific
	// name (an OCI layout's ref name, a registry reference) or a digest.
	ResolveManifest(ctx context.Context, ref string) (ocispec.Descriptor, error)
	// ReadBlob opens the blob desc names. The caller checks size and digest.
	ReadBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)
	// WriteBlob stores the blob desc names, read from r, failing if r's bytes do not match
	// desc's size and digest. A blob the store already has is not written again.
	WriteBlob(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error
	// PutManifest stores manifest, the blob desc names, and points ref at it.
	PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error
}

// Result says what AddTraceLayer wrote.
type Result struct {
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layer    ocispec.Descriptor
	// Replaced is the old trace layer, if the source image had one.
	Replaced *ocispec.Descriptor
}

// AddTraceLayer writes the image src with t as its trace layer, replacing any trace layer src
// has, and names it dst (which may equal src). The layer, the config and the manifest are
// written in that order, so dst never names a manifest whose blobs are missing.
func AddTraceLayer(ctx context.Context, s Store, src, dst string, t *trace.Trace, opts UpdateOptions) (*Result, error) {
	desc, m, manifest, err := fetchManifest(ctx, s, src)
	if err != nil {
		return nil, err
	}
	cfg, err := ReadVerified(ctx, s, m.Config, MaxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("image: config of %s: %w", src, err)
	}
	layer, err := BuildLayer(t, m.TraceLayerType())
	if err != nil {
		return nil, err
	}
	u, err := Update(manifest, cfg, layer.Desc, opts)
	if err != nil {
		return nil, err
	}
	if err := s.WriteBlob(ctx, layer.Desc, bytes.NewReader(layer.Data)); err != nil {
		return nil, fmt.Errorf("image: write trace layer: %w", err)
	}
	if err := s.WriteBlob(ctx, u.ConfigDesc, bytes.NewReader(u.Config)); err != nil {
		return nil, fmt.Errorf("image: write config: %w", err)
	}
	u.ManifestDesc.Platform = desc.Platform
	if err := s.PutManifest(ctx, dst, u.ManifestDesc, u.Manifest); err != nil {
		return nil, fmt.Errorf("image: put manifest %s: %w", dst, err)
	}
	return &Result{Manifest: u.ManifestDesc, Config: u.ConfigDesc, Layer: layer.Desc, Replaced: u.Replaced}, nil
}

// ReadTraceLayer returns the trace carried by the image ref names and its layer's descriptor.
// An upstream binary trace is matched to the image's other layers, bottom first. The error
// wraps ErrNoTrace when the image has no trace layer.
func ReadTraceLayer(ctx context.Context, s Store, ref string) (*trace.Trace, ocispec.Descriptor, error) {
	_, m, _, err := fetchManifest(ctx, s, ref)
	if err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	k := m.TraceLayer()
	if k < 0 {
		return nil, ocispec.Descriptor{}, fmt.Errorf("%w: %s has no layer annotated %s", ErrNoTrace, ref, AnnotationAcceleration)
	}
	desc := m.Layers[k]
	rc, err := s.ReadBlob(ctx, desc)
	if err != nil {
		return nil, desc, fmt.Errorf("image: trace layer %s: %w", desc.Digest, err)
	}
	defer rc.Close()
	// Read through a verifier and drain what ReadLayerFiles leaves, so a tampered blob fails
	// even when trace.pb comes early.
	v := desc.Digest.Verifier()
	lr := &io.LimitedReader{R: io.TeeReader(rc, v), N: desc.Size + 1}
	files, err := ReadLayerFiles(lr)
	if err != nil {
		return nil, desc, fmt.Errorf("image: trace layer %s: %w", desc.Digest, err)
	}
	if _, err := io.Copy(io.Discard, lr); err != nil {
		return nil, desc, fmt.Errorf("image: trace layer %s: %w", desc.Digest, err)
	}
	if lr.N != 1 || !v.Verified() {
		return nil, desc, fmt.Errorf("%w: trace layer %s", ErrDigest, desc.Digest)
	}
	var layers []trace.Layer
	for i, l := range m.Layers {
		if i != k {
			layers = append(layers, trace.Layer{Digest: l.Digest, Size: l.Size, MediaType: l.MediaType})
		}
	}
	t, err := files.Trace(layers)
	return t, desc, err
}

func fetchManifest(ctx context.Context, s Store, ref string) (ocispec.Descriptor, *Manifest, []byte, error) {
	desc, err := s.ResolveManifest(ctx, ref)
	if err != nil {
		return desc, nil, nil, fmt.Errorf("image: resolve %s: %w", ref, err)
	}
	if desc.MediaType == ocispec.MediaTypeImageIndex || desc.MediaType == MediaTypeDockerManifestList {
		return desc, nil, nil, fmt.Errorf("%w: %s is an image index (%s): name a platform's manifest", ErrUnsupported, ref, desc.MediaType)
	}
	data, err := ReadVerified(ctx, s, desc, MaxManifestSize)
	if err != nil {
		return desc, nil, nil, fmt.Errorf("image: manifest of %s: %w", ref, err)
	}
	m, err := ParseManifest(data)
	if err != nil {
		return desc, nil, nil, fmt.Errorf("image: manifest of %s: %w", ref, err)
	}
	return desc, m, data, nil
}

// ReadVerified reads the blob desc names from s, checking its size (at most limit) and digest.
func ReadVerified(ctx context.Context, s Store, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if desc.Size < 0 || desc.Size > limit {
		return nil, fmt.Errorf("%w: blob %s of %d bytes, at most %d", ErrTooLarge, desc.Digest, desc.Size, limit)
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%w: digest %q: %v", ErrInvalid, desc.Digest, err)
	}
	rc, err := s.ReadBlob(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, desc.Size+1))
	if err != nil {
		return nil, fmt.Errorf("image: read blob %s: %w", desc.Digest, err)
	}
	if int64(len(data)) != desc.Size || desc.Digest.Algorithm().FromBytes(data) != desc.Digest {
		return nil, fmt.Errorf("%w: blob %s: %d bytes read, %d expected, or different content",
			ErrDigest, desc.Digest, len(data), desc.Size)
	}
	return data, nil
}
