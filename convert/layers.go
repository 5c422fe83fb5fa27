package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/recorder/image"
)

// convertLayers converts an image's layers, bottom first, taking from the
// cache those converted before. Each layer is applied on the filesystem
// the ones below it make; while one is applied, the one below is committed
// and compressed (one commit at a time, in order).
func (c *Converter) convertLayers(ctx context.Context, from Store, layers []ocispec.Descriptor, diffIDs []digest.Digest) ([]LayerResult, error) {
	chains := chainIDs(diffIDs)
	out := make([]LayerResult, len(layers))
	need := make([]bool, len(layers))
	anyMiss := false
	for i := range layers {
		out[i] = LayerResult{Source: layers[i].Digest, ChainID: chains[i]}
		b, ok, err := c.cache.get(cacheKey(chains[i], c.baseKey))
		if err != nil {
			return nil, err
		}
		out[i].Cached, out[i].Desc = ok, b.Desc
		need[i] = !ok
		anyMiss = anyMiss || !ok
	}
	if anyMiss {
		if err := c.buildLayers(ctx, from, layers, diffIDs, need, out); err != nil {
			return nil, err
		}
	}
	for i, l := range out {
		c.log.Info().Int("layer", i).Str("source", l.Source.String()).Str("digest", l.Desc.Digest.String()).
			Bool("cached", l.Cached).Int64("tar_bytes", l.TarBytes).Dur("apply", l.Apply).Dur("commit", l.Commit).
			Int64("changed_blocks", l.Changes.Data+l.Changes.Zeroed).Msg("layer converted")
	}
	if c.base != nil {
		out = append([]LayerResult{{Desc: c.base.Desc, Cached: true}}, out...)
	}
	return out, nil
}

// buildLayers builds the layers need marks, filling their results in out.
func (c *Converter) buildLayers(ctx context.Context, from Store, layers []ocispec.Descriptor, diffIDs []digest.Digest,
	need []bool, out []LayerResult) (err error) {
	wd, err := newWorkDir(c.opts.WorkDir)
	if err != nil {
		return err
	}
	defer wd.remove()
	work := wd.path
	// Blobs are written next to the cache, to be renamed into it; a killed
	// converter's are removed with its work directory.
	tmp := filepath.Join(c.tmp, filepath.Base(work))
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return fmt.Errorf("convert: %w", err)
	}
	defer os.RemoveAll(tmp)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fetch := c.prefetch(ctx, from, layers, need, work)
	l := &lowers{c: c}
	defer l.close()
	if c.base != nil {
		if err := l.push(c.opts.Baselayer); err != nil {
			return err
		}
	}
	var commits errgroup.Group
	commits.SetLimit(1) // Go blocks while the previous commit runs
	defer func() {
		if werr := commits.Wait(); err == nil {
			err = werr
		}
	}()
	chains := chainIDs(diffIDs)
	for i := range layers {
		if !need[i] {
			// The layers below must be blobs to stack this one on.
			if err := commits.Wait(); err != nil {
				return err
			}
			if err := l.settle(out[:i]); err != nil {
				return err
			}
			if err := l.push(c.blobPath(out[i])); err != nil {
				return err
			}
			continue
		}
		src := layerSource{index: i, count: len(layers), desc: layers[i], diffID: diffIDs[i], chainID: chains[i],
			mkfs: i == 0 && c.opts.Mkfs, open: func(ctx context.Context) (io.ReadCloser, error) { return fetch.open(ctx, i) }}
		if i > 0 {
			src.parent = chains[i-1]
		}
		lower, err := l.disk()
		if err != nil {
			return err
		}
		b, err := c.buildLayer(ctx, work, src, lower)
		if err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, layers[i].Digest, err)
		}
		l.built(b)
		out[i].TarBytes, out[i].Apply = b.tarBytes, b.applied
		commits.Go(func() error { return c.commitBuilt(b, tmp, &out[i]) })
	}
	return nil
}

// commitBuilt commits a built layer into the cache, writing the blob in
// tmp first.
func (c *Converter) commitBuilt(b *builtLayer, tmp string, res *LayerResult) error {
	start := time.Now()
	uuid, err := chainUUID(b.src.chainID)
	if err != nil {
		return err
	}
	args := lsmt.CommitArgs{VirtualSize: c.opts.VirtualSize, UUID: uuid}
	if b.src.parent != "" {
		if args.ParentUUID, err = chainUUID(b.src.parent); err != nil {
			return err
		}
	}
	blob, st, err := commitLayer(tmp, b.view, b.base, b.candidates, args, c.opts.ZFile)
	if err != nil {
		return fmt.Errorf("layer %d: %w", b.src.index, err)
	}
	cached, err := c.cache.put(cacheKey(b.src.chainID, c.baseKey), blob.Path, blob.Desc)
	if err != nil {
		os.Remove(blob.Path)
		return err
	}
	res.Desc, res.Changes, res.Commit = cached.Desc, st, time.Since(start)
	return nil
}

// lowers tracks the disk the next layer is built on: committed blobs
// stacked bottom first, topped (tip) by the last built layer while it is
// still being committed.
type lowers struct {
	c      *Converter
	blobs  []*openedBlob
	tip    io.ReaderAt
	layers []*builtLayer
}

func (l *lowers) push(path string) error {
	b, err := openBlob(path)
	if err != nil {
		return err
	}
	l.blobs = append(l.blobs, b)
	return nil
}

// built makes b the tip.
func (l *lowers) built(b *builtLayer) {
	l.layers = append(l.layers, b)
	l.tip = b.disk
}

// settle replaces the tip with the committed blobs of done (every layer
// below the next one, all committed).
func (l *lowers) settle(done []LayerResult) error {
	if l.tip == nil {
		return nil
	}
	base := 0
	if l.c.base != nil {
		base = 1
	}
	for _, b := range l.blobs[base:] {
		b.Close()
	}
	l.blobs = l.blobs[:base]
	for _, r := range done {
		if err := l.push(l.c.blobPath(r)); err != nil {
			return err
		}
	}
	l.tip = nil
	return nil
}

// disk returns the disk the next layer goes on (nil: an empty one).
func (l *lowers) disk() (io.ReaderAt, error) {
	if l.tip != nil {
		return l.tip, nil
	}
	if len(l.blobs) == 0 {
		return nil, nil
	}
	layers := make([]lsmt.StackLayer, len(l.blobs))
	for i, b := range l.blobs {
		layers[i] = b
	}
	s, err := lsmt.NewStack(layers)
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	return s, nil
}

func (l *lowers) close() {
	for _, b := range l.layers {
		b.close()
	}
	for _, b := range l.blobs {
		b.Close()
	}
}

// prefetcher downloads the layer blobs to build ahead of their turn, a few
// at a time; blobs of a local layout are read in place.
type prefetcher struct {
	from   Store
	layers []ocispec.Descriptor
	local  bool
	dir    string
	ready  []chan struct{}
	errs   []error
}

func (c *Converter) prefetch(ctx context.Context, from Store, layers []ocispec.Descriptor, need []bool, dir string) *prefetcher {
	p := &prefetcher{from: from, layers: layers, dir: dir, ready: make([]chan struct{}, len(layers)), errs: make([]error, len(layers))}
	_, p.local = from.(*image.Layout)
	if p.local {
		return p
	}
	sem := make(chan struct{}, c.opts.Concurrency)
	for i := range layers {
		if !need[i] {
			continue
		}
		p.ready[i] = make(chan struct{})
		go func() {
			defer close(p.ready[i])
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				p.errs[i] = ctx.Err()
				return
			}
			defer func() { <-sem }()
			p.errs[i] = p.download(ctx, i)
		}()
	}
	return p
}

func (p *prefetcher) path(i int) string { return filepath.Join(p.dir, fmt.Sprintf("source-%03d", i)) }

func (p *prefetcher) download(ctx context.Context, i int) error {
	desc := p.layers[i]
	rc, err := p.from.ReadBlob(ctx, desc)
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.Create(p.path(i))
	if err != nil {
		return fmt.Errorf("convert: %w", err)
	}
	n, err := io.Copy(f, io.LimitReader(rc, desc.Size+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("convert: download layer %s: %w", desc.Digest, err)
	}
	if n != desc.Size {
		return fmt.Errorf("%w: layer %s: %d bytes downloaded, %d expected", ErrDigest, desc.Digest, n, desc.Size)
	}
	return nil
}

// open returns layer i's blob, waiting for its download; the digest is
// checked by the reader that applies it.
func (p *prefetcher) open(ctx context.Context, i int) (io.ReadCloser, error) {
	if p.local {
		return p.from.ReadBlob(ctx, p.layers[i])
	}
	if p.ready[i] == nil {
		return nil, errors.New("convert: layer was not scheduled for download")
	}
	select {
	case <-p.ready[i]:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if p.errs[i] != nil {
		return nil, p.errs[i]
	}
	f, err := os.Open(p.path(i))
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	return &removeOnClose{f}, nil
}

// removeOnClose deletes a downloaded blob once it has been applied.
type removeOnClose struct{ *os.File }

func (r *removeOnClose) Close() error {
	err := r.File.Close()
	os.Remove(r.File.Name())
	return err
}
