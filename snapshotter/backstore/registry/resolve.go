package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Docker media types accepted beside the OCI ones.
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	// maxManifestSize bounds manifests, indexes and configs read into memory.
	maxManifestSize = 4 << 20
	// maxIndexDepth bounds nested indexes.
	maxIndexDepth = 4
)

// Image is a resolved image: one platform's manifest with its config (the
// config only when Resolve or FetchConfig read it).
type Image struct {
	// Ref is the normalised reference resolved, e.g.
	// "docker.io/library/hello-world:latest".
	Ref string
	// Repo reads the image's blobs; Repo.BlobURL() is upstream's repoBlobUrl.
	Repo *Repository
	// IndexDigest is the index the manifest was picked from, if any.
	IndexDigest digest.Digest
	// ManifestDescriptor describes the chosen manifest.
	ManifestDescriptor ocispec.Descriptor
	Manifest           ocispec.Manifest
	Config             ocispec.Image
	// Platform is the chosen index entry's platform, or the config's when the
	// reference named a manifest directly.
	Platform ocispec.Platform
	// Layers are the manifest's layers, bottom first, annotations included.
	Layers []ocispec.Descriptor

	fetcher remotes.Fetcher // what resolved it, for FetchConfig
}

// Resolve resolves ref (a tag or digest reference) to an image. An index is
// narrowed to the client's platform. Every manifest, index and config read is
// checked against its digest.
func (c *Client) Resolve(ctx context.Context, ref string) (*Image, error) {
	img, err := c.ResolveManifest(ctx, ref)
	if err != nil {
		return nil, err
	}
	if err := c.FetchConfig(ctx, img); err != nil {
		return nil, err
	}
	return img, nil
}

// ResolveManifest is Resolve without the config: img.Config is left zero,
// and img.Platform too unless an index named it. A block device needs only
// the layers, so mounting skips the config's round trip.
func (c *Client) ResolveManifest(ctx context.Context, ref string) (*Image, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidReference, ref, err)
	}
	repo, err := c.repository(reference.Domain(named), reference.Path(named))
	if err != nil {
		return nil, err
	}
	img := &Image{Ref: named.String(), Repo: repo}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts:   c.hosts,
		Headers: http.Header{"User-Agent": []string{c.opts.UserAgent}},
	})
	var desc ocispec.Descriptor
	err = c.retry(ctx, func() (err error) {
		_, desc, err = resolver.Resolve(ctx, img.Ref)
		return err
	})
	if err != nil {
		return nil, classify(img.Ref, err)
	}
	fetcher, err := resolver.Fetcher(ctx, img.Ref)
	if err != nil {
		return nil, classify(img.Ref, err)
	}
	if err := c.resolveManifest(ctx, fetcher, img, desc); err != nil {
		return nil, err
	}
	img.fetcher = fetcher
	return img, nil
}

// FetchConfig reads img's config into img.Config, checked against its
// digest, and takes img.Platform from it when no index named one.
func (c *Client) FetchConfig(ctx context.Context, img *Image) error {
	if img.fetcher == nil {
		return fmt.Errorf("registry: FetchConfig: %s did not come from Resolve or ResolveManifest", img.Ref)
	}
	raw, err := c.fetchVerified(ctx, img.fetcher, img.Manifest.Config)
	if err != nil {
		return classify(img.Ref, err)
	}
	if err := json.Unmarshal(raw, &img.Config); err != nil {
		return fmt.Errorf("%w: config %s of %s: %w", ErrInvalidManifest, img.Manifest.Config.Digest, img.Ref, err)
	}
	if img.IndexDigest == "" {
		img.Platform = img.Config.Platform
	}
	return nil
}

// resolveManifest follows indexes from desc down to one manifest.
func (c *Client) resolveManifest(ctx context.Context, f remotes.Fetcher, img *Image, desc ocispec.Descriptor) error {
	for depth := 0; depth <= maxIndexDepth; depth++ {
		raw, err := c.fetchVerified(ctx, f, desc)
		if err != nil {
			return classify(img.Ref, err)
		}
		var probe struct {
			MediaType string            `json:"mediaType"`
			Manifests []json.RawMessage `json:"manifests"`
			Layers    []json.RawMessage `json:"layers"`
		}
		if err := json.Unmarshal(raw, &probe); err != nil {
			return fmt.Errorf("%w: %s of %s: %w", ErrInvalidManifest, desc.Digest, img.Ref, err)
		}
		mt := desc.MediaType
		if mt == "" || mt == "application/json" || mt == "application/octet-stream" {
			mt = probe.MediaType
		}
		switch mt {
		case ocispec.MediaTypeImageIndex, mediaTypeDockerManifestList:
			var idx ocispec.Index
			if err := json.Unmarshal(raw, &idx); err != nil {
				return fmt.Errorf("%w: index %s of %s: %w", ErrInvalidManifest, desc.Digest, img.Ref, err)
			}
			chosen, err := choosePlatform(c.platform, idx)
			if err != nil {
				return fmt.Errorf("%w: index %s of %s", err, desc.Digest, img.Ref)
			}
			img.IndexDigest, img.Platform, desc = desc.Digest, *chosen.Platform, chosen
		case ocispec.MediaTypeImageManifest, mediaTypeDockerManifest:
			if err := json.Unmarshal(raw, &img.Manifest); err != nil {
				return fmt.Errorf("%w: manifest %s of %s: %w", ErrInvalidManifest, desc.Digest, img.Ref, err)
			}
			if err := img.Manifest.Config.Digest.Validate(); err != nil {
				return fmt.Errorf("%w: manifest %s of %s: config digest: %w", ErrInvalidManifest, desc.Digest, img.Ref, err)
			}
			for i, l := range img.Manifest.Layers {
				if err := l.Digest.Validate(); err != nil || l.Size < 0 {
					return fmt.Errorf("%w: manifest %s of %s: layer %d: digest %q size %d",
						ErrInvalidManifest, desc.Digest, img.Ref, i, l.Digest, l.Size)
				}
			}
			desc.MediaType = mt
			img.ManifestDescriptor, img.Layers = desc, img.Manifest.Layers
			return nil
		default:
			return fmt.Errorf("%w: %s of %s has unsupported media type %q", ErrInvalidManifest, desc.Digest, img.Ref, mt)
		}
	}
	return fmt.Errorf("%w: %s: indexes nested deeper than %d", ErrInvalidManifest, img.Ref, maxIndexDepth)
}

// choosePlatform picks the best-matching manifest of an index.
func choosePlatform(m platforms.MatchComparer, idx ocispec.Index) (ocispec.Descriptor, error) {
	var best *ocispec.Descriptor
	for i := range idx.Manifests {
		d := &idx.Manifests[i]
		if d.Platform == nil || !m.Match(*d.Platform) {
			continue
		}
		if best == nil || m.Less(*d.Platform, *best.Platform) {
			best = d
		}
	}
	if best == nil {
		return ocispec.Descriptor{}, ErrNoPlatform
	}
	return *best, nil
}

// fetchVerified reads a small blob (manifest, index, config) whole and checks
// its size and digest, so a registry cannot substitute content.
func (c *Client) fetchVerified(ctx context.Context, f remotes.Fetcher, desc ocispec.Descriptor) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%w: digest %q: %w", ErrInvalidManifest, desc.Digest, err)
	}
	if desc.Size < 0 || desc.Size > maxManifestSize {
		return nil, fmt.Errorf("%w: %s: size %d outside [0, %d]", ErrInvalidManifest, desc.Digest, desc.Size, maxManifestSize)
	}
	var raw []byte
	err := c.retry(ctx, func() error {
		rc, err := f.Fetch(ctx, desc)
		if err != nil {
			return err
		}
		defer rc.Close()
		raw, err = io.ReadAll(io.LimitReader(rc, maxManifestSize+1))
		return err
	})
	if err != nil {
		return nil, err
	}
	if int64(len(raw)) != desc.Size && desc.Size != 0 {
		return nil, fmt.Errorf("%w: %s: got %d bytes, descriptor says %d", ErrInvalidManifest, desc.Digest, len(raw), desc.Size)
	}
	if got := desc.Digest.Algorithm().FromBytes(raw); got != desc.Digest {
		return nil, fmt.Errorf("%w: content digest %s, expected %s", ErrInvalidManifest, got, desc.Digest)
	}
	return raw, nil
}

// retry runs fn until it succeeds, fails permanently, or the retry budget is
// spent.
func (c *Client) retry(ctx context.Context, fn func() error) error {
	for attempt := 1; ; attempt++ {
		err := fn()
		if err == nil || ctx.Err() != nil || !isTransient(err) || attempt > c.opts.MaxRetries {
			return err
		}
		if serr := sleep(ctx, c.backoff(attempt)); serr != nil {
			return err
		}
	}
}

// classify maps containerd's errors onto this package's sentinels.
func classify(ref string, err error) error {
	switch {
	case errors.Is(err, ErrInvalidManifest), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errdefs.IsNotFound(err):
		return fmt.Errorf("%w: %s: %w", ErrNotFound, ref, err)
	case errors.Is(err, docker.ErrInvalidAuthorization), errdefs.IsNotImplemented(err), errdefs.IsUnauthorized(err),
		errdefs.IsPermissionDenied(err), hasStatus(err, http.StatusUnauthorized), hasStatus(err, http.StatusForbidden):
		return fmt.Errorf("%w: %s: %w", ErrUnauthorized, ref, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrFetch, ref, err)
}
