package record

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/recorder/image"
)

// Labels containerd's garbage collector follows from a manifest to the
// blobs it references; without them the new config and trace layer would be
// collected once the lease they were written under ends.
const (
	gcRefConfig = "containerd.io/gc.ref.content.config"
	gcRefLayer  = "containerd.io/gc.ref.content.l."
)

// ContainerdStore is an image.Store over containerd's content and image
// stores, so image.AddTraceLayer can write the new image where containerd
// runs it from. Manifests are named by containerd image names (normalised
// references such as docker.io/library/x:latest) or by digest. Blobs are
// written under the lease in the caller's context, if any.
type ContainerdStore struct {
	Content content.Store
	Images  images.Store
	// Platform picks the manifest of an image index (nil = this host's).
	Platform platforms.MatchComparer
}

var _ image.Store = (*ContainerdStore)(nil)

// ResolveManifest returns the descriptor of the manifest ref names: a
// containerd image's target, narrowed to the platform when it is an index,
// or the content with that digest.
func (s *ContainerdStore) ResolveManifest(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	if d, err := digest.Parse(ref); err == nil {
		return s.sniff(ctx, d)
	}
	img, err := s.Images.Get(ctx, ref)
	if errdefs.IsNotFound(err) {
		return ocispec.Descriptor{}, fmt.Errorf("%w: no image %q in containerd", image.ErrNotFound, ref)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("record: image %q: %w", ref, err)
	}
	if !images.IsIndexType(img.Target.MediaType) {
		return img.Target, nil
	}
	return s.platformManifest(ctx, ref, img.Target)
}

// sniff describes the manifest stored under d by its media type field.
func (s *ContainerdStore) sniff(ctx context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	info, err := s.Content.Info(ctx, d)
	if errdefs.IsNotFound(err) {
		return ocispec.Descriptor{}, fmt.Errorf("%w: no content %s in containerd", image.ErrNotFound, d)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("record: content %s: %w", d, err)
	}
	desc := ocispec.Descriptor{Digest: d, Size: info.Size}
	data, err := image.ReadVerified(ctx, s, desc, image.MaxManifestSize)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	var head struct {
		MediaType string `json:"mediaType"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%w: content %s is not a JSON manifest: %v", image.ErrInvalid, d, err)
	}
	desc.MediaType = head.MediaType
	if desc.MediaType == "" {
		desc.MediaType = ocispec.MediaTypeImageManifest
	}
	return desc, nil
}

// platformManifest picks from the index idx the manifest that best matches
// s.Platform, as containerd's own image resolution does.
func (s *ContainerdStore) platformManifest(ctx context.Context, ref string, idx ocispec.Descriptor) (ocispec.Descriptor, error) {
	data, err := image.ReadVerified(ctx, s, idx, image.MaxIndexSize)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("record: index of %s: %w", ref, err)
	}
	var index ocispec.Index
	if err := json.Unmarshal(data, &index); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%w: index of %s: %v", image.ErrInvalid, ref, err)
	}
	match := s.Platform
	if match == nil {
		match = platforms.Default()
	}
	var found []ocispec.Descriptor
	for _, m := range index.Manifests {
		if images.IsManifestType(m.MediaType) && (m.Platform == nil || match.Match(*m.Platform)) {
			found = append(found, m)
		}
	}
	if len(found) == 0 {
		return ocispec.Descriptor{}, fmt.Errorf("%w: index of %s lists no manifest for this platform", image.ErrNotFound, ref)
	}
	slices.SortStableFunc(found, func(a, b ocispec.Descriptor) int {
		switch {
		case a.Platform == nil || b.Platform == nil:
			return 0
		case match.Less(*a.Platform, *b.Platform):
			return -1
		case match.Less(*b.Platform, *a.Platform):
			return 1
		}
		return 0
	})
	return found[0], nil
}

// ReadBlob opens the blob desc names.
func (s *ContainerdStore) ReadBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	ra, err := s.Content.ReaderAt(ctx, desc)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("%w: blob %s is not in containerd's content store", image.ErrNotFound, desc.Digest)
	}
	if err != nil {
		return nil, fmt.Errorf("record: blob %s: %w", desc.Digest, err)
	}
	return readCloser{content.NewReader(ra), ra}, nil
}

type readCloser struct {
	io.Reader
	io.Closer
}

// WriteBlob stores the blob desc names, read from r (nothing when present).
func (s *ContainerdStore) WriteBlob(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	return s.write(ctx, desc, r, nil)
}

func (s *ContainerdStore) write(ctx context.Context, desc ocispec.Descriptor, r io.Reader, labels map[string]string) error {
	if err := content.WriteBlob(ctx, s.Content, "obd-record-"+desc.Digest.String(), r, desc, content.WithLabels(labels)); err != nil {
		return fmt.Errorf("record: write blob %s: %w", desc.Digest, err)
	}
	if len(labels) == 0 {
		return nil
	}
	// WriteBlob leaves the labels of content that was already there alone.
	info := content.Info{Digest: desc.Digest, Labels: labels}
	var paths []string
	for k := range labels {
		paths = append(paths, "labels."+k)
	}
	if _, err := s.Content.Update(ctx, info, paths...); err != nil {
		return fmt.Errorf("record: label blob %s: %w", desc.Digest, err)
	}
	return nil
}

// PutManifest stores manifest with the labels that keep its blobs from
// containerd's garbage collector, and points the image named ref at it.
func (s *ContainerdStore) PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error {
	m, err := image.ParseManifest(manifest)
	if err != nil {
		return err
	}
	labels := map[string]string{gcRefConfig: m.Config.Digest.String()}
	for i, l := range m.Layers {
		labels[fmt.Sprintf("%s%d", gcRefLayer, i)] = l.Digest.String()
	}
	if err := s.write(ctx, desc, bytes.NewReader(manifest), labels); err != nil {
		return err
	}
	img := images.Image{Name: ref, Target: ocispec.Descriptor{MediaType: desc.MediaType, Digest: desc.Digest, Size: desc.Size}}
	if _, err = s.Images.Create(ctx, img); errdefs.IsAlreadyExists(err) {
		_, err = s.Images.Update(ctx, img, "target")
	}
	if err != nil {
		return fmt.Errorf("record: image %s: %w", ref, err)
	}
	return nil
}
