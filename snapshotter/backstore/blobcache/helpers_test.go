package blobcache

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// memFetcher serves a blob from memory. The cache tests use it instead of a
// registry because they test the cache's own logic (coalescing, refill,
// persistence, integrity, eviction); the registry package tests the network
// path against a real registry.
type memFetcher struct {
	data  []byte
	dgst  digest.Digest
	delay time.Duration

	mu     sync.Mutex
	ranges [][2]int64 // every [off, end) fetched
	calls  atomic.Int64
	// hook, when set, runs before serving and may fail the fetch.
	hook func(ctx context.Context, off int64, n int) error
	// corrupt flips a byte of every answer covering this offset (>= 0).
	corrupt int64
}

func newMemFetcher(size int, seed uint64) *memFetcher {
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	return &memFetcher{data: data, dgst: digest.FromBytes(data), corrupt: -1}
}

func (m *memFetcher) FetchRange(ctx context.Context, dgst digest.Digest, off int64, p []byte) error {
	m.calls.Add(1)
	if dgst != m.dgst {
		return errors.New("memFetcher: unknown digest")
	}
	if m.hook != nil {
		if err := m.hook(ctx, off, len(p)); err != nil {
			return err
		}
	}
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return errors.New("memFetcher: range out of bounds")
	}
	copy(p, m.data[off:])
	if m.corrupt >= off && m.corrupt < off+int64(len(p)) {
		p[m.corrupt-off] ^= 0xFF
	}
	m.mu.Lock()
	m.ranges = append(m.ranges, [2]int64{off, off + int64(len(p))})
	m.mu.Unlock()
	return nil
}

func (m *memFetcher) fetched() [][2]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([][2]int64(nil), m.ranges...)
}

func (m *memFetcher) reset() {
	m.mu.Lock()
	m.ranges = nil
	m.mu.Unlock()
	m.calls.Store(0)
}

// failFetcher fails the test if the cache fetches anything.
type failFetcher struct{ t *testing.T }

func (f failFetcher) FetchRange(_ context.Context, _ digest.Digest, off int64, p []byte) error {
	f.t.Errorf("unexpected fetch of [%d, %d)", off, off+int64(len(p)))
	return errors.New("no fetch expected")
}

func openCache(t testing.TB, dir string, opts Options) *Cache {
	t.Helper()
	c, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func openBlob(t testing.TB, c *Cache, m *memFetcher, f Fetcher) *Blob {
	t.Helper()
	if f == nil {
		f = m
	}
	b, err := c.Blob(m.dgst, int64(len(m.data)), f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func digestOf(s string) digest.Digest { return digest.Digest(s) }

// readInBackground reads 4 KiB of b at off in a goroutine; the channel
// gets the read's error.
func readInBackground(ctx context.Context, b *Blob, off int64) <-chan error {
	read := make(chan error, 1)
	go func() {
		_, err := b.ReadAtContext(ctx, make([]byte, 4096), off)
		read <- err
	}()
	return read
}
