// Package blobcache is the block backstore's on-disk cache of registry blobs.
// It serves random reads of a blob from a local sparse file and fetches what
// it lacks through a Fetcher (the registry) in aligned refill windows
// (default 256 KiB) around the missing blocks (default 4 KiB): one GET
// covers the windows a read misses, and sequential readers get readahead
// in spans that double up to 16 MiB (readahead.go), because a registry's
// per-request latency, not its bandwidth, bounds small fetches. Prefetch
// (a trace replay) fetches only the blocks it is asked for; while a trace
// replay runs (Expect to EndExpect), a miss fetches only the blocks of its
// read and readahead pauses, since the trace brings what start-up reads
// next; after it, that blob's misses stay that small (a read the trace did
// not see is seldom next to others it did not see). On a slow source (the rate
// single fetches achieve) readahead spans shrink to about 250 ms of data
// and prefetch in flight to about a second, one fetch beside a miss, so a
// miss never queues long behind either.
//
// Layout: one sparse data file and one meta file per blob, keyed by digest
// (<dir>/<algorithm>/<hex>.data and .meta). The meta file is the persisted
// presence map: a mark per block and a CRC32C per 4 KiB page (see meta.go for
// the format and the crash ordering; a mark reaches the disk only after the
// block's data was fdatasynced). Every read checks the pages it touches
// against their CRCs, so bytes corrupted on disk are fetched again rather than
// served. When the last block of a blob arrives, the whole blob is hashed in
// the background and, if it matches the digest, flagged complete; if not,
// all of it is dropped.
//
// Concurrency: hits take no lock; misses on a block being fetched wait for
// that fetch. Prefetch fills are capped (Options.PrefetchConcurrency),
// fetch only the blocks asked for, and only one starts while a demand fill
// is in flight (none would leave the link idle for the miss's round trip);
// demand fills are never capped, so demand reads never queue behind
// prefetch (they share the link only with prefetch already under way and
// that one).
//
// Eviction: when MaxBytes is set, cached data is kept under it by a CLOCK
// (second-chance) sweep over the refill windows of all blobs, an
// approximation of LRU that costs a reader only an atomic bit test. Evicted
// windows are punched out of the data file (FALLOC_FL_PUNCH_HOLE).
package blobcache

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Errors returned (wrapped) by this package.
var (
	ErrClosed         = errors.New("blobcache: cache closed")
	ErrOptions        = errors.New("blobcache: invalid options")
	ErrLocked         = errors.New("blobcache: directory in use by another process")
	ErrInvalidBlob    = errors.New("blobcache: invalid blob")
	ErrSizeMismatch   = errors.New("blobcache: blob size differs from the cached one")
	ErrFetch          = errors.New("blobcache: fetch failed")
	ErrCorrupt        = errors.New("blobcache: block corrupt after refetch")
	ErrDigestMismatch = errors.New("blobcache: blob content does not match its digest")
	ErrIncomplete     = errors.New("blobcache: blob not fully cached")
	ErrInvalidMeta    = errors.New("blobcache: invalid meta file")
	// ErrStorage wraps a failure of the cache's own files (a full or
	// failing disk). Reads do not fail with it: they read through to the
	// source (Stats.UncachedBytes) while the disk fails.
	ErrStorage = errors.New("blobcache: cache storage failed")
)

// Defaults for the zero values of Options (upstream overlaybd's cacheConfig,
// but for the block size: upstream's 64 KiB rounds each of a trace's small
// ranges out to whole blocks, 24 MB of a python3 start's plan to 30 MB;
// 4 KiB, the ZFile block of upstream's LZ4 images, leaves 33.0 MB of the
// numpy start-up's 32 MB where 16 KiB left 35.6 MB, and replay on a 25
// Mbit/s link 4-8 % faster once ranges that lie side by side are fetched
// together, see replayer's coalescer; warm reads take a run of cached
// blocks in one read, so small blocks cost them nothing).
const (
	DefaultBlockSize           = 4 << 10
	DefaultRefillSize          = 256 << 10
	DefaultPrefetchConcurrency = 8
	DefaultReadahead           = 16 << 20
	maxRefillSize              = 64 << 20
)

// Fetcher reads a blob's bytes from its source. registry.Repository
// implements it.
type Fetcher interface {
	// FetchRange fills p with the bytes [off, off+len(p)) of blob dgst, or
	// fails; it never returns nil with p partly filled.
	FetchRange(ctx context.Context, dgst digest.Digest, off int64, p []byte) error
}

// FetcherFunc adapts a function to Fetcher.
type FetcherFunc func(ctx context.Context, dgst digest.Digest, off int64, p []byte) error

// FetchRange calls f.
func (f FetcherFunc) FetchRange(ctx context.Context, dgst digest.Digest, off int64, p []byte) error {
	return f(ctx, dgst, off, p)
}

// Options configures a Cache. Zero values take the defaults.
type Options struct {
	// BlockSize is the unit of presence (checksums are per 4 KiB page): a
	// power of two, 4 KiB to 16 MiB. Blobs cached with another block size
	// are discarded at Open.
	BlockSize int64
	// RefillSize is the unit a miss fetches: the aligned window around a
	// missing block (one request covers the windows of all the blocks a
	// read misses), and the unit of eviction. A multiple of BlockSize, at
	// most 64 MiB.
	RefillSize int64
	// MaxBytes bounds the cached block data (meta files not counted);
	// 0 means unbounded. When set it must be at least 4 refill windows. It
	// is exceeded only briefly, by windows readers are filling right then.
	MaxBytes int64
	// PrefetchConcurrency caps fills started by Prefetch. Keep it below the
	// fetcher's per-host connection cap (registry: 16) so that demand reads,
	// which are never capped here, always find a free connection. On a
	// slow source the cache runs fewer (about a second of data in flight),
	// and only one while a demand fill is in flight.
	PrefetchConcurrency int
	// Readahead is the largest span fetched ahead of a sequential reader
	// (and the largest single fetch): a multiple of RefillSize up to
	// 64 MiB; it starts at four times the reader's request and doubles.
	// Negative turns readahead off, and every fetch is then one window.
	// With MaxBytes set it is also held to MaxBytes/12, and on a slow
	// source to about 250 ms of data; it pauses during a trace replay
	// (Blob.Expect to Blob.EndExpect).
	Readahead int64
}

func (o Options) withDefaults() (Options, error) {
	if o.BlockSize == 0 {
		o.BlockSize = DefaultBlockSize
	}
	if o.RefillSize == 0 {
		o.RefillSize = max(DefaultRefillSize, o.BlockSize)
	}
	if o.PrefetchConcurrency <= 0 {
		o.PrefetchConcurrency = DefaultPrefetchConcurrency
	}
	if o.Readahead == 0 {
		o.Readahead = max(DefaultReadahead, o.RefillSize)
	}
	switch {
	case !validBlockSize(o.BlockSize):
		return o, fmt.Errorf("%w: block size %d is not a power of two in [%d, %d]", ErrOptions, o.BlockSize, minBlockSize, maxBlockSize)
	case o.RefillSize < o.BlockSize || o.RefillSize%o.BlockSize != 0 || o.RefillSize > maxRefillSize:
		return o, fmt.Errorf("%w: refill size %d is not a multiple of the block size %d up to %d", ErrOptions, o.RefillSize, o.BlockSize, maxRefillSize)
	case o.MaxBytes < 0 || (o.MaxBytes > 0 && o.MaxBytes < 4*o.RefillSize):
		return o, fmt.Errorf("%w: max bytes %d is below 4 refill windows (%d)", ErrOptions, o.MaxBytes, 4*o.RefillSize)
	case o.Readahead > 0 && (o.Readahead%o.RefillSize != 0 || o.Readahead > maxRefillSize):
		return o, fmt.Errorf("%w: readahead %d is not a multiple of the refill size %d up to %d", ErrOptions, o.Readahead, o.RefillSize, maxRefillSize)
	}
	if o.Readahead < 0 {
		o.Readahead = 0
	}
	return o, nil
}

// Cache is a directory of cached blobs. It is safe for concurrent use.
type Cache struct {
	dir  string
	opts Options
	lock *os.File // flock held while open

	mu     sync.Mutex
	blobs  map[digest.Digest]*blobState
	order  []*blobState // creation order; the eviction hand walks it
	closed atomic.Bool

	used atomic.Int64 // bytes of cached blocks, all blobs
	gate prefetchGate // admits prefetch fetches
	// tracing counts blobs in a trace replay (Expect to EndExpect);
	// readahead pauses and misses fetch only their own blocks while there
	// are any. A replayer's full fetch of whole blobs does not count: it
	// brings nothing the reader needs sooner than its own misses do.
	tracing    atomic.Int64
	rate       rateEstimate   // of single fetches; bounds the readahead
	background sync.WaitGroup // digest checks, mark flushers, readahead
	// bgCtx bounds readahead fetches; Close cancels it.
	bgCtx     context.Context
	bgStop    context.CancelFunc
	spanPools []sync.Pool // *[]byte of RefillSize << k
	blockPool sync.Pool   // *[]byte of BlockSize

	evictMu sync.Mutex
	hand    struct {
		blob int
		win  int64
	}

	stats   counters
	metrics metrics
	// storageFailedAt is when the cache's files last failed (unix ns, 0:
	// never); for storageRetry after it misses read through.
	storageFailedAt atomic.Int64
	storageRetry    time.Duration
}

// Open opens (creating if needed) the cache in dir, reloading what earlier
// runs cached. Only one Cache may have dir open at a time, across processes.
func Open(dir string, opts Options) (*Cache, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrLocked, dir, err)
	}
	c := &Cache{
		dir:          dir,
		opts:         opts,
		lock:         lock,
		blobs:        make(map[digest.Digest]*blobState),
		gate:         newPrefetchGate(),
		metrics:      newMetrics(),
		storageRetry: storageRetryAfter,
	}
	c.bgCtx, c.bgStop = context.WithCancel(context.Background())
	c.spanPools = make([]sync.Pool, bits.Len64(uint64(c.maxSpan()/opts.RefillSize-1))+1)
	for k := range c.spanPools {
		c.spanPools[k].New = func() any { b := make([]byte, opts.RefillSize<<k); return &b }
	}
	c.blockPool.New = func() any { b := make([]byte, opts.BlockSize); return &b }
	if err := c.load(); err != nil {
		c.bgStop()
		c.closeFiles()
		return nil, err
	}
	c.evict()
	return c, nil
}

// Blob returns a reader of blob dgst, whose size is size, fetching what is
// not cached through f. Handles of one blob share its cached blocks and may
// use different fetchers (say, two mirrors).
func (c *Cache) Blob(dgst digest.Digest, size int64, f Fetcher) (*Blob, error) {
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("%w: digest %q: %w", ErrInvalidBlob, dgst, err)
	}
	if size < 0 || size > maxBlobSize {
		return nil, fmt.Errorf("%w: %s: size %d outside [0, %d]", ErrInvalidBlob, dgst, size, int64(maxBlobSize))
	}
	if f == nil {
		return nil, fmt.Errorf("%w: %s: nil fetcher", ErrInvalidBlob, dgst)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil, ErrClosed
	}
	s := c.blobs[dgst]
	if s == nil {
		var err error
		if s, err = c.createBlob(dgst, size); err != nil {
			return nil, err
		}
		c.blobs[dgst] = s
		c.order = append(c.order, s)
	} else if s.size != size {
		return nil, fmt.Errorf("%w: %s: asked %d bytes, cached as %d", ErrSizeMismatch, dgst, size, s.size)
	}
	return &Blob{c: c, s: s, f: f}, nil
}

// Close waits for background digest checks and mark flushers, syncs the
// meta files and releases the directory. Reads must have returned before Close is called.
func (c *Cache) Close() error {
	c.mu.Lock()
	wasClosed := c.closed.Swap(true)
	c.mu.Unlock()
	if wasClosed {
		return nil
	}
	c.bgStop()
	c.background.Wait()
	// Marks of fills that ended as Close began, whose flusher was refused.
	c.mu.Lock()
	blobs := c.order
	c.mu.Unlock()
	for _, s := range blobs {
		for s.flushOnce() {
		}
	}
	return c.closeFiles()
}

func (c *Cache) closeFiles() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, s := range c.order {
		errs = append(errs, s.meta.Sync(), s.meta.Close(), s.data.Close())
	}
	errs = append(errs, c.lock.Close())
	return errors.Join(errs...)
}

// Usage is the number of bytes of cached block data.
func (c *Cache) Usage() int64 { return c.used.Load() }

// RefillSize is the unit a miss fetches: Options.RefillSize, defaults
// applied.
func (c *Cache) RefillSize() int64 { return c.opts.RefillSize }

func (c *Cache) paths(dgst digest.Digest) (data, meta string) {
	base := filepath.Join(c.dir, string(dgst.Algorithm()), dgst.Encoded())
	return base + ".data", base + ".meta"
}

// maxSpan is the most one fetch asks for.
func (c *Cache) maxSpan() int64 { return max(c.opts.RefillSize, c.opts.Readahead) }

// getSpan returns a buffer of at least n bytes (n at most maxSpan), from
// the pool of the smallest power-of-two multiple of RefillSize that fits.
func (c *Cache) getSpan(n int64) *[]byte {
	k := bits.Len64(uint64((n+c.opts.RefillSize-1)/c.opts.RefillSize - 1))
	return c.spanPools[k].Get().(*[]byte)
}

func (c *Cache) putSpan(b *[]byte) {
	k := bits.Len64(uint64(int64(cap(*b))/c.opts.RefillSize - 1))
	c.spanPools[k].Put(b)
}

func (c *Cache) getBlock() *[]byte  { return c.blockPool.Get().(*[]byte) }
func (c *Cache) putBlock(b *[]byte) { c.blockPool.Put(b) }

// inBackground runs f in a goroutine that Close waits for, unless the
// cache is closing, and reports whether it did.
func (c *Cache) inBackground(f func()) bool {
	// Under mu, so Close cannot start waiting between the check and the Add.
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return false
	}
	c.background.Go(f)
	return true
}
