package blobcache

import (
	"context"
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// verifyInBackground starts a digest check of a fully cached blob, so the
// read that fetched its last block does not wait for the whole blob to be
// hashed. Close waits for it.
func (c *Cache) verifyInBackground(s *blobState) {
	c.inBackground(func() { _ = s.verify(context.Background()) })
}

// Verify checks a fully cached blob against its digest and marks it
// complete. Blocks failing their CRC are dropped (to be refetched) and
// reported as ErrCorrupt; intact blocks that hash to the wrong digest mean
// the source served wrong bytes: every block is dropped and the error wraps
// ErrDigestMismatch. A blob not fully cached gives ErrIncomplete.
func (b *Blob) Verify(ctx context.Context) error { return b.s.verify(ctx) }

func (s *blobState) verify(ctx context.Context) error {
	s.mu.Lock()
	if s.complete.Load() {
		s.mu.Unlock()
		return nil
	}
	if s.verifying {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s: a digest check is already running", ErrIncomplete, s.dgst)
	}
	if s.cached.Load() != s.size {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s: %d of %d bytes cached", ErrIncomplete, s.dgst, s.cached.Load(), s.size)
	}
	// Eviction skips a blob while it is being verified, so the blocks hashed
	// stay the blocks recorded.
	s.verifying = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.verifying = false
		s.mu.Unlock()
	}()

	h := s.dgst.Algorithm().Hash()
	bufp := s.c.getBlock()
	defer s.c.putBlock(bufp)
	var bad []int64
	for i := range s.nblocks {
		if err := ctx.Err(); err != nil {
			return err
		}
		buf := (*bufp)[:s.blockLen(i)]
		ok, err := s.readPages(i*s.bs/pageSize, buf)
		if err != nil {
			return err
		}
		if !ok {
			bad = append(bad, i)
		}
		h.Write(buf)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(bad) == 0 && s.cached.Load() != s.size {
		// A reader dropped a block while we hashed: judge nothing.
		return fmt.Errorf("%w: %s: a block was dropped during the digest check", ErrIncomplete, s.dgst)
	}
	if len(bad) > 0 {
		s.c.stats.corrupt.Add(int64(len(bad)))
		var errs []error
		for _, i := range bad {
			_, err := s.dropBlocks(i, i+1)
			errs = append(errs, err)
		}
		return errors.Join(append(errs, fmt.Errorf("%w: %s: %d blocks failed their checksum during the digest check", ErrCorrupt, s.dgst, len(bad)))...)
	}
	if got := digest.NewDigest(s.dgst.Algorithm(), h); got != s.dgst {
		s.c.stats.digestMismatches.Add(1)
		_, err := s.dropBlocks(0, s.nblocks)
		return errors.Join(err, fmt.Errorf("%w: %s: the fetched bytes hash differently; all blocks dropped", ErrDigestMismatch, s.dgst))
	}
	if err := s.setComplete(true); err != nil {
		return fmt.Errorf("blobcache: mark %s complete: %w", s.dgst, err)
	}
	return nil
}
