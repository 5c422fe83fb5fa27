package blobcache

import (
	"context"
	"fmt"
	"time"
)

// storageRetryAfter is how long after its files last failed a cache stops
// trying to store (Cache.storageRetry): misses read through, prefetch and
// readahead pause. A full disk stays full for a while, and each try would
// fetch a whole window only to throw it away; after it, the cache tries
// again, in case space was freed.
const storageRetryAfter = 5 * time.Second

// storageFailed records a failure of the cache's own files (a full or
// failing disk).
func (c *Cache) storageFailed() {
	c.stats.ioErrors.Add(1)
	c.storageFailedAt.Store(time.Now().UnixNano())
}

// storageDown reports whether the cache's files failed within the last
// c.storageRetry.
func (c *Cache) storageDown() bool {
	t := c.storageFailedAt.Load()
	return t != 0 && time.Since(time.Unix(0, t)) < c.storageRetry
}

// readThrough fills dst with the blob's bytes from off straight from the
// source, stored nowhere, for a read the cache cannot serve because its
// files fail. A container's reads then keep working on a node whose disk
// filled up, at the cost of a round trip each. The bytes are the source's
// either way: the cache's page CRCs guard only its own disk.
func (b *Blob) readThrough(ctx context.Context, dst []byte, off int64) error {
	s := b.s
	if err := b.f.FetchRange(ctx, s.dgst, off, dst); err != nil {
		b.c.stats.fetchErrors.Add(1)
		return fmt.Errorf("%w: %s [%d, %d), read through the cache: %w", ErrFetch, s.dgst, off, off+int64(len(dst)), err)
	}
	n := int64(len(dst))
	b.c.stats.fetches.Add(1)
	b.c.stats.fetched.Add(n)
	b.c.stats.uncached.Add(n)
	s.stats.fetched.Add(n)
	return nil
}

// errStorageDown stands for the failure that made storageDown true, for a
// miss that does not try the disk again.
var errStorageDown = fmt.Errorf("%w: failed a moment ago, not tried again yet", ErrStorage)
