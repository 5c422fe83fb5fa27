package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// Sentinel errors; the errors Convert returns wrap them (or those of the
// packages it uses) with what was wrong and where.
var (
	// ErrReference reports a SRC or DST that cannot be parsed or resolved.
	ErrReference = errors.New("convert: bad image location")
	// ErrInvalidImage reports a malformed manifest, index, config or layer.
	ErrInvalidImage = errors.New("convert: invalid image")
	// ErrUnsupportedLayer reports a layer media type this converter cannot
	// apply (foreign, encrypted, or not a tar).
	ErrUnsupportedLayer = errors.New("convert: unsupported layer")
	// ErrAlreadyConverted reports a source image that is overlaybd already.
	ErrAlreadyConverted = errors.New("convert: already an overlaybd image")
	// ErrDigest reports content that does not match its digest or diff_id.
	ErrDigest = errors.New("convert: content does not match its digest")
	// ErrNoFilesystem reports a conversion with neither a baselayer nor
	// mkfs.
	ErrNoFilesystem = errors.New("convert: no filesystem to apply layers to")
	// ErrOptions reports Options that cannot be honoured.
	ErrOptions = errors.New("convert: bad options")
)

// Defaults for the zero values of Options.
const (
	DefaultVirtualSize = 64 << 30
	DefaultCacheDir    = "/var/cache/obdtrace/convert"
	DefaultBaselayer   = "/opt/obdtrace/baselayers/ext4_64"
	DefaultConcurrency = 4
)

// Options configure a Converter.
type Options struct {
	// Baselayer is upstream's ext4 baselayer blob (ext4_64). The first
	// layer is built on it, and it becomes the image's bottom layer, unless
	// Mkfs is set. Default DefaultBaselayer.
	Baselayer string
	// Mkfs formats the filesystem in the first layer instead.
	Mkfs bool
	// VirtualSize is the disk size of every layer; default 64 GiB, what
	// the baselayer has. Only Mkfs images may choose another.
	VirtualSize int64
	// CacheDir keeps converted layers, keyed by chain id; default
	// DefaultCacheDir.
	CacheDir string
	// WorkDir holds the writable layers while converting (about the
	// image's unpacked size); default os.TempDir().
	WorkDir string
	// PlainHTTP lists registry hosts spoken to over plain HTTP.
	PlainHTTP []string
	// Concurrency bounds parallel blob downloads and uploads; default 4.
	Concurrency int
	// Progress, when set (a terminal), gets a progress line per layer.
	Progress io.Writer
	// Logger receives per-layer events.
	Logger zerolog.Logger
	// Frontend attaches disks as block devices; default device.FUSELoop{}.
	Frontend device.Frontend
	// ZFile is how layer blobs are compressed. The zero value is what
	// upstream's converter writes: LZ4, 4 KiB blocks, with CRCs. ZSTD with
	// 16-64 KiB blocks moves about 0.67-0.71x the bytes of LZ4 in a lazy
	// pull (both upstream and this project read it); see docs/convert.md.
	ZFile zfile.Options
}

// Converter converts images. It is safe to use from one goroutine at a
// time; converters in several processes may share a cache directory.
type Converter struct {
	opts    Options
	log     zerolog.Logger
	cache   *layerCache
	tmp     string // in the cache's filesystem, so blobs rename into it
	baseKey string // what the bottom layer is built on, for cache keys
	base    *cachedBlob
}

// New returns a Converter for opts.
func New(opts Options) (*Converter, error) {
	if opts.VirtualSize == 0 {
		opts.VirtualSize = DefaultVirtualSize
	}
	if opts.CacheDir == "" {
		opts.CacheDir = DefaultCacheDir
	}
	if opts.WorkDir == "" {
		opts.WorkDir = os.TempDir()
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = DefaultConcurrency
	}
	if opts.Frontend == nil {
		opts.Frontend = device.FUSELoop{}
	}
	if opts.Baselayer == "" && !opts.Mkfs {
		opts.Baselayer = DefaultBaselayer
	}
	if opts.VirtualSize <= 0 || opts.VirtualSize%lsmt.ChangeBlockSize != 0 {
		return nil, fmt.Errorf("convert: virtual size %d is not a positive multiple of 4 KiB", opts.VirtualSize)
	}
	if !opts.Mkfs && opts.VirtualSize != DefaultVirtualSize {
		return nil, fmt.Errorf("convert: a virtual size other than 64 GiB needs mkfs (the baselayer is 64 GiB)")
	}
	if err := checkZFileOptions(opts.ZFile); err != nil {
		return nil, err
	}
	cache, err := newLayerCache(opts.CacheDir)
	if err != nil {
		return nil, err
	}
	c := &Converter{opts: opts, log: opts.Logger, cache: cache, tmp: filepath.Join(opts.CacheDir, "tmp")}
	if err := os.MkdirAll(c.tmp, 0o700); err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	if opts.Mkfs {
		c.baseKey = fmt.Sprintf("mkfs vsize=%d", opts.VirtualSize) + zfileKey(opts.ZFile)
		return c, nil
	}
	if err := c.loadBaselayer(); err != nil {
		return nil, err
	}
	return c, nil
}

// loadBaselayer hashes the baselayer and prepares its wrapped blob, the
// image's bottom layer as upstream uploads it.
func (c *Converter) loadBaselayer() error {
	f, err := os.Open(c.opts.Baselayer)
	if err != nil {
		return fmt.Errorf("%w: baselayer: %w", ErrNoFilesystem, err)
	}
	d, err := digest.SHA256.FromReader(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("convert: baselayer: %w", err)
	}
	c.baseKey = fmt.Sprintf("baselayer %s vsize=%d", d, c.opts.VirtualSize) + zfileKey(c.opts.ZFile)
	key := cacheKey(d, "wrapped baselayer")
	b, ok, err := c.cache.get(key)
	if err != nil {
		return err
	}
	if !ok {
		w, err := baselayerBlob(c.tmp, c.opts.Baselayer)
		if err != nil {
			return err
		}
		if b, err = c.cache.put(key, w.Path, w.Desc); err != nil {
			return err
		}
	}
	c.base = &b
	return nil
}

// Result says what Convert wrote.
type Result struct {
	// Desc is what DST now names: the converted manifest, or index.
	Desc ocispec.Descriptor `json:"descriptor"`
	// Images are the converted manifests, one per platform.
	Images []ImageResult `json:"images"`
}

// ImageResult describes one converted manifest.
type ImageResult struct {
	Platform *ocispec.Platform  `json:"platform,omitempty"`
	Source   ocispec.Descriptor `json:"source"`
	Manifest ocispec.Descriptor `json:"manifest"`
	Config   ocispec.Descriptor `json:"config"`
	// Layers are the converted image's layers, bottom first; the
	// baselayer, when used, is the first.
	Layers []LayerResult `json:"layers"`
}

// LayerResult describes one converted layer.
type LayerResult struct {
	Source  digest.Digest      `json:"source,omitempty"` // the source layer ("" for the baselayer)
	ChainID digest.Digest      `json:"chain_id,omitempty"`
	Desc    ocispec.Descriptor `json:"descriptor"`
	// Cached says the blob came from the cache; the rest is zero then.
	Cached   bool             `json:"cached"`
	TarBytes int64            `json:"tar_bytes,omitempty"` // the source layer's uncompressed tar
	Apply    time.Duration    `json:"apply_ns,omitempty"`
	Commit   time.Duration    `json:"commit_ns,omitempty"`
	Changes  lsmt.ChangeStats `json:"changed_blocks"`
}

// Convert converts the image at src and stores it at dst (see
// ParseLocation for their forms). A multi-platform index is converted per
// platform into an index.
func (c *Converter) Convert(ctx context.Context, src, dst string) (*Result, error) {
	removed, err := reclaimStale(ctx, c.opts.WorkDir)
	for _, dir := range removed {
		os.RemoveAll(filepath.Join(c.tmp, filepath.Base(dir)))
		c.log.Warn().Str("dir", dir).Msg("cleaned up after a converter that was killed")
	}
	if err != nil {
		c.log.Warn().Err(err).Msg("could not clean up after a killed converter")
	}
	from, srcRef, err := c.openLocation(src, false)
	if err != nil {
		return nil, err
	}
	to, dstRef, err := c.openLocation(dst, true)
	if err != nil {
		return nil, err
	}
	desc, err := from.ResolveManifest(ctx, srcRef)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrReference, src, err)
	}
	res := &Result{}
	var data []byte
	switch {
	case isIndex(desc.MediaType):
		data, res.Desc, err = c.convertIndex(ctx, from, to, desc, res)
	case isManifest(desc.MediaType):
		var img ImageResult
		if data, img, err = c.convertImage(ctx, from, to, desc); err == nil {
			res.Images, res.Desc = []ImageResult{img}, img.Manifest
		}
	default:
		err = fmt.Errorf("%w: %s is a %q, not a manifest or index", ErrInvalidImage, src, desc.MediaType)
	}
	if err != nil {
		return nil, err
	}
	if err := to.PutManifest(ctx, dstRef, res.Desc, data); err != nil {
		return nil, fmt.Errorf("convert: store %s: %w", dst, err)
	}
	return res, nil
}

// openLocation opens a SRC (create false) or DST location and returns the
// store and the reference within it.
func (c *Converter) openLocation(s string, create bool) (Store, string, error) {
	loc, err := ParseLocation(s)
	if err != nil {
		return nil, "", err
	}
	if loc.Layout != "" {
		l, err := openLayout(loc.Layout, create)
		if err != nil {
			return nil, "", err
		}
		ref := loc.Ref
		switch {
		case ref == "" && create:
			ref = "latest"
		case ref == "":
			if ref, err = layoutDefaultRef(loc.Layout); err != nil {
				return nil, "", err
			}
		}
		return l, ref, nil
	}
	resolver, err := newResolver(c.opts.PlainHTTP)
	if err != nil {
		return nil, "", err
	}
	st, err := newRegistryStore(resolver, loc.Ref)
	if err != nil {
		return nil, "", err
	}
	return st, loc.Ref, nil
}

// convertIndex converts every manifest an index lists, but attestations.
func (c *Converter) convertIndex(ctx context.Context, from, to Store, desc ocispec.Descriptor, res *Result) ([]byte, ocispec.Descriptor, error) {
	var x ocispec.Index
	if _, err := readJSON(ctx, from, desc, &x); err != nil {
		return nil, desc, err
	}
	var entries []ocispec.Descriptor
	for _, m := range x.Manifests {
		if _, ok := m.Annotations[attestationAnnotation]; ok {
			c.log.Warn().Str("manifest", m.Digest.String()).Msg("skipping attestation manifest: it describes the source image")
			continue
		}
		if !isManifest(m.MediaType) {
			return nil, desc, fmt.Errorf("%w: index entry %s is a %q", ErrInvalidImage, m.Digest, m.MediaType)
		}
		data, img, err := c.convertImage(ctx, from, to, m)
		if err != nil {
			return nil, desc, fmt.Errorf("platform %s: %w", platformString(m.Platform), err)
		}
		if err := to.WriteBlob(ctx, img.Manifest, bytes.NewReader(data)); err != nil {
			return nil, desc, fmt.Errorf("convert: store manifest: %w", err)
		}
		e := m
		e.MediaType, e.Digest, e.Size = img.Manifest.MediaType, img.Manifest.Digest, img.Manifest.Size
		entries = append(entries, e)
		res.Images = append(res.Images, img)
	}
	return convertedIndex(x, entries)
}

func platformString(p *ocispec.Platform) string {
	if p == nil {
		return "unknown"
	}
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// convertImage converts one manifest's image: its layers, config and
// manifest. The blobs are stored in to; the manifest is returned.
func (c *Converter) convertImage(ctx context.Context, from, to Store, desc ocispec.Descriptor) ([]byte, ImageResult, error) {
	res := ImageResult{Platform: desc.Platform, Source: desc}
	var m *ocispec.Manifest
	raw, err := readJSON(ctx, from, desc, nil)
	if err == nil {
		m, err = parseManifest(raw)
	}
	if err != nil {
		return nil, res, err
	}
	cfgData, err := readJSON(ctx, from, m.Config, nil)
	if err != nil {
		return nil, res, fmt.Errorf("convert: config: %w", err)
	}
	cfg, err := parseConfig(cfgData)
	if err != nil {
		return nil, res, err
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, res, fmt.Errorf("%w: %d diff_ids for %d layers", ErrInvalidImage, len(cfg.RootFS.DiffIDs), len(m.Layers))
	}
	if len(m.Layers) == 0 {
		return nil, res, fmt.Errorf("%w: the image has no layers", ErrInvalidImage)
	}
	if res.Layers, err = c.convertLayers(ctx, from, m.Layers, cfg.RootFS.DiffIDs); err != nil {
		return nil, res, err
	}
	if err := c.storeLayers(ctx, to, res.Layers); err != nil {
		return nil, res, err
	}
	descs := make([]ocispec.Descriptor, len(res.Layers))
	for i, l := range res.Layers {
		descs[i] = l.Desc
	}
	cfgOut, cfgDesc, err := convertedConfig(cfg, descs)
	if err != nil {
		return nil, res, err
	}
	if err := to.WriteBlob(ctx, cfgDesc, bytes.NewReader(cfgOut)); err != nil {
		return nil, res, fmt.Errorf("convert: store config: %w", err)
	}
	data, mdesc, err := convertedManifest(*m, cfgDesc, descs)
	if err != nil {
		return nil, res, err
	}
	mdesc.Platform = desc.Platform
	res.Manifest, res.Config = mdesc, cfgDesc
	return data, res, nil
}

// storeLayers writes the converted layer blobs to the destination.
func (c *Converter) storeLayers(ctx context.Context, to Store, layers []LayerResult) error {
	var g errgroup.Group
	g.SetLimit(c.opts.Concurrency)
	for _, l := range layers {
		g.Go(func() error {
			path := c.blobPath(l)
			f, err := os.Open(path)
			if err != nil {
				return fmt.Errorf("convert: %w", err)
			}
			defer f.Close()
			if err := to.WriteBlob(ctx, l.Desc, f); err != nil {
				return fmt.Errorf("convert: store layer %s: %w", l.Desc.Digest, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// blobPath is where a converted layer's blob is in the cache.
func (c *Converter) blobPath(l LayerResult) string {
	if l.Source == "" {
		return c.base.Path
	}
	return filepath.Join(c.cache.entry(cacheKey(l.ChainID, c.baseKey)), cacheBlobFile)
}
