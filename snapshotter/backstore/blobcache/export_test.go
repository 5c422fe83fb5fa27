package blobcache

import "time"

// SetStorageRetry sets how long after a failure of its files c reads
// through before it tries to store again, so a test need not wait the
// default 5 s.
func SetStorageRetry(c *Cache, d time.Duration) { c.storageRetry = d }
