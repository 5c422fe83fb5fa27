package record

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"

	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/recorder/image"
)

// distributionSource is containerd's annotation naming, per registry host,
// the repositories a blob can be mounted from: containerd's pusher then asks
// the registry for a cross-repository mount instead of uploading the blob.
const distributionSource = "containerd.io/distribution.source."

// pushImage pushes the image whose manifest desc names to dst and tags it
// ref. Each blob the registry lacks is read from the first of sources that
// has it: containerd's content store holds the new config and trace layer,
// while the overlaybd layers were never downloaded and come from the source
// image's repository (mounted from it when on the same registry).
func pushImage(ctx context.Context, dst image.Store, ref string, desc ocispec.Descriptor, from reference.Named, sources ...image.Store) error {
	if len(sources) == 0 {
		return fmt.Errorf("record: push %s: no store to read blobs from", ref)
	}
	manifest, err := image.ReadVerified(ctx, sources[0], desc, image.MaxManifestSize)
	if err != nil {
		return fmt.Errorf("record: push %s: %w", ref, err)
	}
	m, err := image.ParseManifest(manifest)
	if err != nil {
		return fmt.Errorf("record: push %s: %w", ref, err)
	}
	for _, b := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		b.Annotations = maps.Clone(b.Annotations)
		if b.Annotations == nil {
			b.Annotations = map[string]string{}
		}
		b.Annotations[distributionSource+reference.Domain(from)] = reference.Path(from)
		r := &lazyReader{open: func() (io.ReadCloser, error) { return openFirst(ctx, b, sources) }}
		err := dst.WriteBlob(ctx, b, r)
		r.Close()
		if err != nil {
			return fmt.Errorf("record: push %s: blob %s: %w", ref, b.Digest, err)
		}
	}
	if err := dst.PutManifest(ctx, ref, desc, manifest); err != nil {
		return fmt.Errorf("record: push %s: %w", ref, err)
	}
	return nil
}

// openFirst opens desc from the first store that has it.
func openFirst(ctx context.Context, desc ocispec.Descriptor, stores []image.Store) (io.ReadCloser, error) {
	var errs []error
	for _, s := range stores {
		rc, err := s.ReadBlob(ctx, desc)
		if err == nil {
			return rc, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("%w: blob %s in no source: %w", image.ErrNotFound, desc.Digest, errors.Join(errs...))
}

// lazyReader opens its source on the first Read, so a blob the registry
// already has (the pusher checks before reading) is never fetched.
type lazyReader struct {
	open func() (io.ReadCloser, error)
	rc   io.ReadCloser
	err  error
}

func (l *lazyReader) Read(p []byte) (int, error) {
	if l.rc == nil && l.err == nil {
		l.rc, l.err = l.open()
	}
	if l.err != nil {
		return 0, l.err
	}
	return l.rc.Read(p)
}

func (l *lazyReader) Close() error {
	if l.rc == nil {
		return nil
	}
	return l.rc.Close()
}
