package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Store reads and writes the blobs and manifests of one repository through
// containerd's resolver, fetcher and pusher: the registry side of building
// a new image (a trace layer appended, say) and pushing it. References it
// takes are tags or digests within the repository.
type Store struct {
	c    *Client
	repo string // e.g. "127.0.0.1:5000/hello-world"
}

// Store returns a Store over the repository of ref (its tag is ignored).
func (c *Client) Store(ref string) (*Store, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidReference, ref, err)
	}
	return &Store{c: c, repo: named.Name()}, nil
}

// full turns a tag or digest into a reference of the store's repository.
func (s *Store) full(ref string) string {
	if d, err := digest.Parse(ref); err == nil {
		return s.repo + "@" + d.String()
	}
	if named, err := reference.ParseDockerRef(ref); err == nil && named.Name() == s.repo {
		return named.String()
	}
	return s.repo + ":" + ref
}

func (s *Store) resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{
		Hosts:   s.c.hosts,
		Headers: http.Header{"User-Agent": []string{s.c.opts.UserAgent}},
	})
}

// ResolveManifest returns the descriptor of the manifest ref names. An
// index is narrowed to the client's platform.
func (s *Store) ResolveManifest(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	img, err := s.c.Resolve(ctx, s.full(ref))
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d := img.ManifestDescriptor
	if d.Platform == nil && img.Platform.OS != "" {
		p := img.Platform
		d.Platform = &p
	}
	return d, nil
}

// ReadBlob opens the blob (or manifest) desc names.
func (s *Store) ReadBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	f, err := s.resolver().Fetcher(ctx, s.repo)
	if err != nil {
		return nil, classify(s.repo, err)
	}
	var rc io.ReadCloser
	err = s.c.retry(ctx, func() (err error) {
		rc, err = f.Fetch(ctx, desc)
		return err
	})
	if err != nil {
		return nil, classify(s.repo, err)
	}
	return rc, nil
}

// WriteBlob pushes the blob desc names, read from r. A blob the registry
// has already is not sent again.
func (s *Store) WriteBlob(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	return s.push(ctx, s.repo, desc, r)
}

// PutManifest pushes manifest and tags it ref.
func (s *Store) PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error {
	return s.push(ctx, s.full(ref), desc, bytes.NewReader(manifest))
}

func (s *Store) push(ctx context.Context, ref string, desc ocispec.Descriptor, r io.Reader) error {
	p, err := s.resolver().Pusher(ctx, ref)
	if err != nil {
		return classify(ref, err)
	}
	w, err := p.Push(ctx, desc)
	if errors.Is(err, errdefs.ErrAlreadyExists) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: push %s to %s: %w", ErrFetch, desc.Digest, ref, err)
	}
	defer w.Close()
	if err := content.Copy(ctx, w, r, desc.Size, desc.Digest); err != nil && !errors.Is(err, errdefs.ErrAlreadyExists) {
		return fmt.Errorf("%w: push %s to %s: %w", ErrFetch, desc.Digest, ref, err)
	}
	return nil
}
