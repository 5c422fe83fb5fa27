package convert

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Layer annotations upstream writes on every overlaybd layer.
const (
	AnnotationBlobDigest = "containerd.io/snapshot/overlaybd/blob-digest"
	AnnotationBlobSize   = "containerd.io/snapshot/overlaybd/blob-size"
	AnnotationVersion    = "containerd.io/snapshot/overlaybd/version"
	// OverlaybdVersion is the value upstream writes in AnnotationVersion.
	OverlaybdVersion = "0.1.0"
)

// Docker media types read beside the OCI ones.
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerLayer        = "application/vnd.docker.image.rootfs.diff.tar"
	mediaTypeDockerLayerGzip    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	// attestationAnnotation marks buildkit's attestation manifests in an
	// index, which upstream drops: they describe the source image.
	attestationAnnotation = "vnd.docker.reference.type"
)

func isIndex(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex || mediaType == mediaTypeDockerManifestList
}

func isManifest(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageManifest || mediaType == mediaTypeDockerManifest
}

// layerDescriptor describes a converted layer blob as upstream does.
func layerDescriptor(d digest.Digest, size int64) ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayer,
		Digest:    d,
		Size:      size,
		Annotations: map[string]string{
			AnnotationBlobDigest: d.String(),
			AnnotationBlobSize:   strconv.FormatInt(size, 10),
			AnnotationVersion:    OverlaybdVersion,
		},
	}
}

// chainIDs returns the chain id of each layer, bottom first.
func chainIDs(diffIDs []digest.Digest) []digest.Digest {
	out := make([]digest.Digest, len(diffIDs))
	for i := range diffIDs {
		out[i] = identity.ChainID(diffIDs[:i+1])
	}
	return out
}

// chainUUID formats a chain id as the UUID of its LSMT layer: the first 32
// hex digits as 8-4-4-4-12, upper case as upstream's commit tool prints it.
func chainUUID(chainID digest.Digest) (string, error) {
	h := chainID.Encoded()
	if chainID.Validate() != nil || len(h) < 32 {
		return "", fmt.Errorf("convert: chain id %q is not a sha256 digest", chainID)
	}
	u := fmt.Sprintf("%s-%s-%s-%s-%s", h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])
	return strings.ToUpper(u), nil
}

// parseConfig reads an image config as upstream's converter does: into the
// OCI struct, which drops docker's extra fields when it is written back.
func parseConfig(data []byte) (*ocispec.Image, error) {
	var img ocispec.Image
	if err := json.Unmarshal(data, &img); err != nil {
		return nil, fmt.Errorf("%w: config: %v", ErrInvalidImage, err)
	}
	if img.RootFS.Type != "layers" {
		return nil, fmt.Errorf("%w: config rootfs type %q, want \"layers\"", ErrInvalidImage, img.RootFS.Type)
	}
	return &img, nil
}

// convertedConfig returns the converted image's config: the source's with
// diff_ids replaced by the converted layers' digests (an overlaybd layer is
// an uncompressed tar, so its diff_id is its digest).
func convertedConfig(src *ocispec.Image, layers []ocispec.Descriptor) ([]byte, ocispec.Descriptor, error) {
	cfg := *src
	cfg.RootFS.DiffIDs = make([]digest.Digest, len(layers))
	for i, l := range layers {
		cfg.RootFS.DiffIDs[i] = l.Digest
	}
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("convert: marshal config: %w", err)
	}
	return data, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(data), Size: int64(len(data))}, nil
}

// convertedManifest returns the converted image's manifest: the source's,
// as an OCI manifest with the new config and layers.
func convertedManifest(src ocispec.Manifest, config ocispec.Descriptor, layers []ocispec.Descriptor) ([]byte, ocispec.Descriptor, error) {
	m := src
	m.Versioned = specs.Versioned{SchemaVersion: 2}
	m.MediaType = ocispec.MediaTypeImageManifest
	m.Config = config
	m.Layers = layers
	data, err := json.Marshal(m)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("convert: marshal manifest: %w", err)
	}
	return data, ocispec.Descriptor{MediaType: m.MediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}, nil
}

// convertedIndex returns the converted index: the source's, as an OCI
// index listing the converted manifests (attestations dropped); each entry
// keeps its platform and annotations.
func convertedIndex(src ocispec.Index, entries []ocispec.Descriptor) ([]byte, ocispec.Descriptor, error) {
	x := src
	x.Versioned = specs.Versioned{SchemaVersion: 2}
	x.MediaType = ocispec.MediaTypeImageIndex
	x.Manifests = entries
	data, err := json.Marshal(x)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("convert: marshal index: %w", err)
	}
	return data, ocispec.Descriptor{MediaType: x.MediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}, nil
}

// parseManifest reads a manifest and checks its layers can be converted.
func parseManifest(data []byte) (*ocispec.Manifest, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrInvalidImage, err)
	}
	if m.SchemaVersion != 2 {
		return nil, fmt.Errorf("%w: manifest schemaVersion %d", ErrInvalidImage, m.SchemaVersion)
	}
	for i, l := range m.Layers {
		if _, ok := l.Annotations[AnnotationBlobDigest]; ok {
			return nil, fmt.Errorf("%w: layer %d (%s) is already an overlaybd layer", ErrAlreadyConverted, i, l.Digest)
		}
		if _, err := compressionOf(l.MediaType); err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
		if err := l.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("%w: layer %d digest %q: %v", ErrInvalidImage, i, l.Digest, err)
		}
	}
	return &m, nil
}
