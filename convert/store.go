package convert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Store is where images are read and written: an OCI image layout or a
// registry repository.
type Store = image.Store

// Location is a parsed SRC or DST argument: a registry reference, or an
// OCI image layout directory with an optional tag, as skopeo spells them
// ("oci:DIR[:TAG]"; "docker://" before a registry reference is accepted).
type Location struct {
	// Layout is the layout directory, "" for a registry.
	Layout string
	// Ref is the layout's tag ("" when none was given) or the normalised
	// registry reference.
	Ref string
}

// String gives the location in the form it was parsed from.
func (l Location) String() string {
	if l.Layout == "" {
		return l.Ref
	}
	if l.Ref == "" {
		return "oci:" + l.Layout
	}
	return "oci:" + l.Layout + ":" + l.Ref
}

// ParseLocation parses an image location argument.
func ParseLocation(s string) (Location, error) {
	if rest, ok := strings.CutPrefix(s, "oci:"); ok {
		dir, tag, _ := strings.Cut(rest, ":")
		if dir == "" {
			return Location{}, fmt.Errorf("%w: %q names no layout directory", ErrReference, s)
		}
		return Location{Layout: dir, Ref: tag}, nil
	}
	named, err := reference.ParseDockerRef(strings.TrimPrefix(s, "docker://"))
	if err != nil {
		return Location{}, fmt.Errorf("%w: %q: %v", ErrReference, s, err)
	}
	return Location{Ref: named.String()}, nil
}

// Host is the registry host of a registry location ("" for a layout).
func (l Location) Host() string {
	if l.Layout != "" {
		return ""
	}
	named, err := reference.ParseNormalizedNamed(l.Ref)
	if err != nil {
		return ""
	}
	return reference.Domain(named)
}

// openLayout opens an OCI layout, creating an empty one when create is set
// and the directory holds none yet.
func openLayout(dir string, create bool) (*image.Layout, error) {
	if create {
		if err := initLayout(dir); err != nil {
			return nil, err
		}
	}
	l, err := image.OpenLayout(dir)
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	return l, nil
}

func initLayout(dir string) error {
	marker := filepath.Join(dir, ocispec.ImageLayoutFile)
	if _, err := os.Stat(marker); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(dir, ocispec.ImageBlobsDir), 0o755); err != nil {
		return fmt.Errorf("convert: create layout: %w", err)
	}
	index := filepath.Join(dir, ocispec.ImageIndexFile)
	if _, err := os.Stat(index); errors.Is(err, os.ErrNotExist) {
		if err := atomicfile.Write(index, []byte(`{"schemaVersion":2,"manifests":[]}`), 0o644); err != nil {
			return fmt.Errorf("convert: create layout: %w", err)
		}
	}
	if err := atomicfile.Write(marker, []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return fmt.Errorf("convert: create layout: %w", err)
	}
	return nil
}

// layoutDefaultRef returns the digest of a layout's only manifest, which
// names the image when SRC gives no tag (as skopeo does).
func layoutDefaultRef(dir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(dir, ocispec.ImageIndexFile))
	if err != nil {
		return "", fmt.Errorf("convert: %w", err)
	}
	x, err := image.ParseIndex(data)
	if err != nil {
		return "", fmt.Errorf("convert: %s: %w", dir, err)
	}
	if len(x.Manifests) != 1 {
		return "", fmt.Errorf("%w: %s lists %d images: name one as oci:%s:TAG", ErrReference, dir, len(x.Manifests), dir)
	}
	return x.Manifests[0].Digest.String(), nil
}

// registryStore is a registry repository behind containerd's resolver,
// fetcher and pusher: the same host configuration and authorizer as the
// backstore's registry client.
type registryStore struct {
	resolver remotes.Resolver
	name     string // host/repository
}

// newResolver builds a resolver speaking plain HTTP to the plainHTTP
// hosts, with credentials from the docker CLI config.
func newResolver(plainHTTP []string) (remotes.Resolver, error) {
	creds, err := registry.DockerConfigCredentials("")
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	client := &http.Client{Transport: docker.DefaultHTTPTransport(nil)}
	authOpts := []docker.AuthorizerOpt{docker.WithAuthClient(client)}
	if creds != nil {
		authOpts = append(authOpts, docker.WithAuthCreds(creds))
	}
	hosts := docker.ConfigureDefaultRegistries(
		docker.WithClient(client),
		docker.WithAuthorizer(docker.NewDockerAuthorizer(authOpts...)),
		docker.WithPlainHTTP(func(host string) (bool, error) {
			for _, h := range plainHTTP {
				if h == host {
					return true, nil
				}
			}
			return false, nil
		}),
	)
	return docker.NewResolver(docker.ResolverOptions{Hosts: hosts}), nil
}

func newRegistryStore(resolver remotes.Resolver, ref string) (*registryStore, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrReference, ref, err)
	}
	return &registryStore{resolver: resolver, name: named.Name()}, nil
}

// ResolveManifest resolves a reference of this repository.
func (s *registryStore) ResolveManifest(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	_, desc, err := s.resolver.Resolve(ctx, ref)
	if err != nil {
		return desc, fmt.Errorf("convert: resolve %s: %w", ref, wrapNotFound(err))
	}
	return desc, nil
}

// ReadBlob opens a blob or manifest of the repository.
func (s *registryStore) ReadBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	f, err := s.resolver.Fetcher(ctx, s.name+"@"+desc.Digest.String())
	if err != nil {
		return nil, fmt.Errorf("convert: fetch %s from %s: %w", desc.Digest, s.name, err)
	}
	rc, err := f.Fetch(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("convert: fetch %s from %s: %w", desc.Digest, s.name, wrapNotFound(err))
	}
	return rc, nil
}

// WriteBlob pushes a blob, or a manifest by digest; one the registry has
// already is not sent again.
func (s *registryStore) WriteBlob(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	// A reference by the blob's own digest makes the pusher PUT manifests
	// by digest rather than to a tag.
	return s.push(ctx, s.name+"@"+desc.Digest.String(), desc, r)
}

// PutManifest pushes a manifest or index and tags it ref.
func (s *registryStore) PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return fmt.Errorf("%w: %q: %v", ErrReference, ref, err)
	}
	tagged, ok := named.(reference.Tagged)
	if !ok || named.Name() != s.name {
		return fmt.Errorf("%w: %q is not a tag of %s", ErrReference, ref, s.name)
	}
	return s.push(ctx, s.name+":"+tagged.Tag(), desc, strings.NewReader(string(manifest)))
}

func (s *registryStore) push(ctx context.Context, ref string, desc ocispec.Descriptor, r io.Reader) error {
	p, err := s.resolver.Pusher(ctx, ref)
	if err != nil {
		return fmt.Errorf("convert: push to %s: %w", ref, err)
	}
	w, err := p.Push(ctx, desc)
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("convert: push %s to %s: %w", desc.Digest, ref, err)
	}
	defer w.Close()
	if _, err := io.Copy(w, io.LimitReader(r, desc.Size)); err != nil {
		return fmt.Errorf("convert: push %s to %s: %w", desc.Digest, ref, err)
	}
	if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("convert: push %s to %s: %w", desc.Digest, ref, err)
	}
	return nil
}

func wrapNotFound(err error) error {
	if errdefs.IsNotFound(err) {
		return fmt.Errorf("%w: %w", image.ErrNotFound, err)
	}
	return err
}

// readJSON reads a small document (manifest, index, config) from s,
// checking its size and digest.
func readJSON(ctx context.Context, s Store, desc ocispec.Descriptor, v any) ([]byte, error) {
	data, err := image.ReadVerified(ctx, s, desc, image.MaxConfigSize)
	if err != nil {
		return nil, err
	}
	if v != nil {
		if err := json.Unmarshal(data, v); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalidImage, desc.Digest, err)
		}
	}
	return data, nil
}
