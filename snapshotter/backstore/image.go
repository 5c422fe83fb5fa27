package backstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// Layer annotations of overlaybd images (upstream's spelling).
const (
	AnnotationPrefix            = "containerd.io/snapshot/overlaybd/"
	AnnotationBlobDigest        = AnnotationPrefix + "blob-digest"
	AnnotationBlobSize          = AnnotationPrefix + "blob-size"
	AnnotationVersion           = AnnotationPrefix + "version"
	AnnotationAccelerationLayer = AnnotationPrefix + "acceleration-layer"
	AnnotationFSType            = AnnotationPrefix + "blob-fs-type"
)

// BaselayerDigest is the sha256 of upstream's ext4 baselayer (ext4_64).
const BaselayerDigest = digest.Digest("sha256:c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9")

// Errors.
var (
	ErrNotOverlaybd = errors.New("backstore: not an overlaybd image")
	ErrNoBaselayer  = errors.New("backstore: the image needs the ext4 baselayer")
	ErrNoFilesystem = errors.New("backstore: the image's disk holds no ext4 filesystem")
)

// Layer is one layer of an opened image, bottom first.
type Layer struct {
	Digest digest.Digest
	Size   int64 // blob size
	Blob   *lsmt.Blob
	// Cache is the cached remote blob; nil for the local baselayer.
	Cache *blobcache.Blob
	// Local is the open file of a local layer (the baselayer).
	Local *os.File
}

// Image is an overlaybd image opened for serving: its layers stacked into
// the disk a container sees.
type Image struct {
	Remote *registry.Image
	Layers []Layer // bottom first; the baselayer, when used, is Layers[0]
	Stack  *lsmt.Stack
	// TraceLayer is the image's acceleration (trace) layer, if it has one.
	TraceLayer *ocispec.Descriptor
	// BytesServed counts bytes read from the merged disk.
	BytesServed atomic.Int64
}

// OpenOptions say where the pieces an image needs come from.
type OpenOptions struct {
	// Baselayer is the path of upstream's ext4 baselayer blob, used when the
	// image's bottom layer carries no filesystem of its own.
	Baselayer string
}

// OpenImage opens the overlaybd image ref through client and cache. Only
// the layers' headers and indexes are fetched.
func OpenImage(ctx context.Context, client *registry.Client, cache *blobcache.Cache, ref string, opts OpenOptions) (*Image, error) {
	remote, err := client.ResolveManifest(ctx, ref)
	if err != nil {
		return nil, err
	}
	img := &Image{Remote: remote}
	ok := false
	defer func() {
		if !ok {
			img.Close()
		}
	}()
	// Layers open side by side: each needs its blob's header and index
	// (two or three round trips), so a ten-layer image would otherwise
	// spend tens of round trips before the device exists.
	var descs []int
	for i := range remote.Layers {
		desc := remote.Layers[i]
		if desc.Annotations[AnnotationAccelerationLayer] == "yes" {
			img.TraceLayer = &remote.Layers[i]
			continue
		}
		if _, ok := desc.Annotations[AnnotationBlobDigest]; !ok {
			return nil, fmt.Errorf("%w: %s: layer %d (%s) has no %s annotation", ErrNotOverlaybd, ref, i, desc.Digest, AnnotationBlobDigest)
		}
		descs = append(descs, i)
	}
	img.Layers = make([]Layer, len(descs))
	var g errgroup.Group
	g.SetLimit(openLayersAtOnce)
	for k, i := range descs {
		g.Go(func() error {
			l, err := openLayer(ctx, cache, remote, i)
			img.Layers[k] = l
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if len(img.Layers) == 0 {
		return nil, fmt.Errorf("%w: %s has no overlaybd layers", ErrNotOverlaybd, ref)
	}
	if err := img.addBaselayer(opts.Baselayer); err != nil {
		return nil, err
	}
	stackLayers := make([]lsmt.StackLayer, len(img.Layers))
	for i, l := range img.Layers {
		stackLayers[i] = l.Blob
	}
	if img.Stack, err = lsmt.NewStack(stackLayers); err != nil {
		return nil, err
	}
	ok = true
	return img, nil
}

// openLayersAtOnce bounds the layers whose headers are fetched at once,
// below the registry client's per-host cap.
const openLayersAtOnce = 8

// openLayer opens layer i of remote through the cache. Opening reads the
// blob's head (headers, the first compressed block) and tail (trailer,
// jump table, LSMT index); both are fetched side by side before the open
// parses them, so they share a round trip, and fetched exactly: the rest
// of the refill windows around them is seldom what the start-up reads
// (12-24 KiB of the first 256 KiB window on the cold-start benchmark's
// images), and it would cross the link before any prefetch could start.
func openLayer(ctx context.Context, cache *blobcache.Cache, remote *registry.Image, i int) (Layer, error) {
	desc := remote.Layers[i]
	cb, err := cache.Blob(desc.Digest, desc.Size, remote.Repo)
	if err != nil {
		return Layer{}, fmt.Errorf("backstore: layer %d: %w", i, err)
	}
	defer cb.FetchExactly()()
	var wg sync.WaitGroup
	head := [2]int64{0, min(desc.Size, openHeadBytes, cache.RefillSize())}
	for _, r := range [][2]int64{head, openTail(desc.Size, cache.RefillSize())} {
		wg.Go(func() {
			// A failure shows again, and is reported, when the open reads it.
			_, _ = cb.ReadAtContext(ctx, make([]byte, r[1]), r[0])
		})
	}
	wg.Wait()
	// The blob keeps this reader for the life of the mount, so it reads
	// without the caller's context; the fetcher's retry budget bounds it.
	b, err := lsmt.OpenBlob(cb, desc.Size)
	if err != nil {
		return Layer{}, fmt.Errorf("backstore: layer %d (%s): %w", i, desc.Digest, err)
	}
	return Layer{Digest: desc.Digest, Size: desc.Size, Blob: b, Cache: cb}, nil
}

// openHeadBytes is how much of a blob's start openLayer reads ahead of the
// open: a tar wrapper's header, the ZFile header and the first compressed
// block, which holds the LSMT header (a ZFile block is at most 64 KiB
// before compression, and seldom more after it); or a refill window if that
// is smaller, so the open reads no more at once than a miss would. Whatever
// the open reads beyond it, it fetches then.
const openHeadBytes = 64 << 10

// openTail is the range of a blob's end openLayer reads ahead of the open,
// as offset and length: the last refill window, which holds the trailer and
// often the jump table and index before it; and when that window is short
// (under a quarter of one, as often as not shorter than the jump table),
// the window before it too, rather than a second round trip once the
// trailer is parsed.
func openTail(size, refill int64) [2]int64 {
	n := size % refill
	if n == 0 {
		n = refill
	}
	if n < refill/4 && size > refill+n {
		n += refill
	}
	n = min(n, size)
	return [2]int64{size - n, n}
}

// addBaselayer puts the ext4 baselayer beneath the image's layers when the
// image was converted onto it: unless its bottom layer holds a filesystem
// of its own, a superblock whose UUID is set and differs from the
// baselayer's (what mkfs into the first layer makes). Upstream's converter
// leaves the UUID of a layer built on the baselayer null, and an older one
// copied the baselayer's, so both count as built on it.
func (img *Image) addBaselayer(path string) error {
	bottom, hasFS := ext4UUID(img.Layers[0].Blob)
	ownFS := hasFS && bottom != [16]byte{}
	if path == "" {
		if ownFS {
			return nil
		}
		return fmt.Errorf("%w (--baselayer): no baselayer configured", ErrNoBaselayer)
	}
	base, err := openLocalLayer(path)
	if err != nil {
		if ownFS {
			return nil
		}
		return fmt.Errorf("%w (--baselayer): %w", ErrNoBaselayer, err)
	}
	if baseUUID, ok := ext4UUID(base.Blob); ownFS && (!ok || baseUUID != bottom) {
		base.close()
		return nil
	}
	// Current converters (upstream's and ours) ship the baselayer as the
	// image's first layer: then it is there already.
	if img.Layers[0].Blob.Trailer().UUID == base.Blob.Trailer().UUID {
		base.close()
		return nil
	}
	img.Layers = append([]Layer{base}, img.Layers...)
	return nil
}

// ext4UUID returns the filesystem UUID of the ext4 superblock a layer maps
// at byte 1024, and whether it maps one.
func ext4UUID(b *lsmt.Blob) ([16]byte, bool) {
	var uuid [16]byte
	s, err := lsmt.NewStack([]lsmt.StackLayer{b})
	if err != nil {
		return uuid, false
	}
	sb := make([]byte, 1024)
	if _, err := s.ReadAt(sb, 1024); err != nil {
		return uuid, false
	}
	const magicOff, uuidOff = 0x38, 0x68
	if sb[magicOff] != 0x53 || sb[magicOff+1] != 0xEF {
		return uuid, false
	}
	copy(uuid[:], sb[uuidOff:uuidOff+16])
	return uuid, true
}

func openLocalLayer(path string) (Layer, error) {
	if path == "" {
		return Layer{}, errors.New("no baselayer configured")
	}
	f, err := os.Open(path)
	if err != nil {
		return Layer{}, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return Layer{}, err
	}
	b, err := lsmt.OpenBlob(f, st.Size())
	if err != nil {
		f.Close()
		return Layer{}, fmt.Errorf("%s: %w", path, err)
	}
	// The digest names the layer in traces; hashing 4.7 MB once per mount is
	// cheap, and a baselayer other than upstream's still gets a true name.
	d, err := fileDigest(f)
	if err != nil {
		b.Close()
		f.Close()
		return Layer{}, err
	}
	return Layer{Digest: d, Size: st.Size(), Blob: b, Local: f}, nil
}

func (l Layer) close() error {
	var errs []error
	if l.Blob != nil {
		errs = append(errs, l.Blob.Close())
	}
	if l.Local != nil {
		errs = append(errs, l.Local.Close())
	}
	return errors.Join(errs...)
}

// ReadAt reads the merged disk and counts the bytes served.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	n, err := img.Stack.ReadAt(p, off)
	img.BytesServed.Add(int64(n))
	return n, err
}

// Size is the merged disk's size.
func (img *Image) Size() int64 { return img.Stack.VirtualSize() }

// Close releases the layers' readers.
func (img *Image) Close() error {
	var errs []error
	for _, l := range img.Layers {
		errs = append(errs, l.close())
	}
	return errors.Join(errs...)
}
