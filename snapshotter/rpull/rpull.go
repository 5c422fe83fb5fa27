// Package rpull pulls an image through containerd for a remote snapshotter:
// containerd fetches the manifest and config, and the unpack hands each
// layer's annotations (the overlaybd blob digest among them) to the
// snapshotter as labels, with the image reference and manifest digest, so
// the snapshotter can commit overlaybd layers without downloading them. It
// is upstream's `ctr rpull`, on containerd's client library.
package rpull

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/core/snapshots"
	snpkg "github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/docker/go-units"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/snapshotter"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// DefaultSnapshotter is the proxy plugin name the snapshotter is registered
// under by default, as upstream's.
const DefaultSnapshotter = "overlaybd"

// ErrPull is wrapped by every error Pull returns.
var ErrPull = errors.New("rpull")

// Options configure a pull.
type Options struct {
	// Snapshotter is the snapshotter to unpack into (DefaultSnapshotter).
	Snapshotter string
	// PlainHTTP talks plain HTTP to the registry.
	PlainHTTP bool
	// Platform selects the manifest of a multi-platform image ("" = host's).
	Platform string
	// FullFetch asks the snapshotter to fetch the whole image in the
	// background once a container's device attaches (upstream's
	// --download-blobs).
	FullFetch bool
	// DockerConfigDir holds the docker CLI's config.json with registry
	// credentials ("" = $DOCKER_CONFIG, else ~/.docker).
	DockerConfigDir string
	// Progress, when set, receives a line per descriptor handled and a
	// summary.
	Progress io.Writer
}

// Result says what a pull did.
type Result struct {
	Image containerd.Image
	// Layers is the number of layers in the image; Downloaded of them had
	// their blob fetched into containerd's content store (the others are
	// remote snapshots).
	Layers, Downloaded int
}

// Pull pulls ref with client into opts.Snapshotter, passing the labels a
// remote snapshotter needs.
func Pull(ctx context.Context, client *containerd.Client, ref string, opts Options) (*Result, error) {
	if opts.Snapshotter == "" {
		opts.Snapshotter = DefaultSnapshotter
	}
	creds, err := registry.DockerConfigCredentials(opts.DockerConfigDir)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPull, err)
	}
	hostOpts := dockerconfig.HostOptions{}
	if creds != nil {
		hostOpts.Credentials = creds
	}
	if opts.PlainHTTP {
		hostOpts.DefaultScheme = "http"
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: dockerconfig.ConfigureHosts(ctx, hostOpts)})
	labels := map[string]string{snapshotter.LabelImageRef: ref}
	if opts.FullFetch {
		labels[snapshotter.LabelDownloadRemoteBlob] = "download"
	}
	p := &progress{w: opts.Progress}
	ropts := []containerd.RemoteOpt{
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(opts.Snapshotter, snapshots.WithLabels(labels)),
		// Layer annotations reach the snapshotter as labels; this adds the
		// reference and manifest digest to them, as CRI pulls do.
		containerd.WithImageHandlerWrapper(snpkg.AppendInfoHandlerWrapper(ref)),
		containerd.WithImageHandler(images.HandlerFunc(p.handle)),
	}
	if opts.Platform != "" {
		ropts = append(ropts, containerd.WithPlatform(opts.Platform))
	}
	img, err := client.Pull(ctx, ref, ropts...)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrPull, ref, err)
	}
	res := &Result{Image: img}
	if err := countDownloads(ctx, client.ContentStore(), img, res, p); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrPull, ref, err)
	}
	p.printf("pulled %s into %s: %d layers, %d downloaded, %d remote\n",
		ref, opts.Snapshotter, res.Layers, res.Downloaded, res.Layers-res.Downloaded)
	return res, nil
}

// countDownloads counts the image's layers and those whose blob is in the
// content store, and reports each.
func countDownloads(ctx context.Context, cs content.Store, img containerd.Image, res *Result, p *progress) error {
	manifest, err := images.Manifest(ctx, cs, img.Target(), img.Platform())
	if err != nil {
		return err
	}
	res.Layers = len(manifest.Layers)
	for _, l := range manifest.Layers {
		state := "downloaded"
		_, err := cs.Info(ctx, l.Digest)
		switch {
		case err == nil:
			res.Downloaded++
		case errdefs.IsNotFound(err):
			state = "remote, read on demand"
		default:
			return err
		}
		p.printf("%-15s %s %s: %s\n", layerKind(l), l.Digest, units.HumanSize(float64(l.Size)), state)
	}
	return nil
}

func layerKind(desc ocispec.Descriptor) string {
	switch {
	case desc.Annotations[snapshotter.LabelAccelerationLayer] == "yes":
		return "trace layer"
	case desc.Annotations[snapshotter.LabelBlobDigest] != "":
		return "overlaybd layer"
	}
	return "layer"
}

// progress prints a line per descriptor the pull handles.
type progress struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *progress) printf(format string, args ...any) {
	if p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format, args...)
}

func (p *progress) handle(_ context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
	kind := "blob"
	switch {
	case images.IsIndexType(desc.MediaType):
		kind = "index"
	case images.IsManifestType(desc.MediaType):
		kind = "manifest"
	case images.IsConfigType(desc.MediaType):
		kind = "config"
	case images.IsLayerType(desc.MediaType):
		kind = layerKind(desc)
	}
	p.printf("%-15s %s %s\n", kind, desc.Digest, units.HumanSize(float64(desc.Size)))
	return nil, nil
}
