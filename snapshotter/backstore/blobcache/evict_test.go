package blobcache

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"
)

func TestEvictionKeepsUnderMaxBytes(t *testing.T) {
	m := newMemFetcher(8*mib, 9)
	maxBytes := int64(1 * mib) // 4 refill windows
	c := openCache(t, t.TempDir(), Options{MaxBytes: maxBytes})
	b := openBlob(t, c, m, nil)
	dataPath, _ := c.paths(m.dgst)
	r := rand.New(rand.NewPCG(3, 3))
	hot := make([]byte, 4*kib)
	for i := range 200 {
		off := r.Int64N(int64(len(m.data)) - 64*kib)
		p := make([]byte, 64*kib)
		if _, err := b.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, m.data[off:off+64*kib]) {
			t.Fatal("wrong bytes")
		}
		if _, err := b.ReadAt(hot, 0); err != nil { // keep window 0 hot
			t.Fatal(err)
		}
		if u := c.Usage(); u > maxBytes {
			t.Fatalf("read %d: usage %d over %d", i, u, maxBytes)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dataPath, &st); err != nil {
		t.Fatal(err)
	}
	if onDisk := st.Blocks * 512; onDisk > maxBytes+256*kib {
		t.Errorf("data file occupies %d bytes on disk; holes not punched", onDisk)
	}
	stats := c.Stats()
	if stats.EvictedBytes == 0 {
		t.Error("nothing evicted")
	}
	m.reset()
	if _, err := b.ReadAt(hot, 0); err != nil || m.calls.Load() != 0 {
		t.Errorf("the hot window was evicted (fetches %d, err %v)", m.calls.Load(), err)
	}
	if _, err := Open(t.TempDir(), Options{MaxBytes: 100 * kib}); !errors.Is(err, ErrOptions) {
		t.Errorf("MaxBytes below 4 windows: %v", err)
	}
}

// TestConcurrentEvictionThenRestart runs many readers against a cache far
// smaller than the blob, so fills, evictions and mark flushes interleave;
// after a restart no surviving mark may cover bytes that fail their CRC.
func TestConcurrentEvictionThenRestart(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(6*mib, 15)
	c := openCache(t, dir, Options{MaxBytes: 1 * mib})
	b := openBlob(t, c, m, nil)
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 15))
			for range 40 {
				off := r.Int64N(int64(len(m.data)))
				p := make([]byte, 1+r.IntN(96*kib))
				n, err := b.ReadAt(p, off)
				if err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if !bytes.Equal(p[:n], m.data[off:off+int64(n)]) {
					t.Errorf("wrong bytes at %d", off)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.CorruptBlocks != 0 || st.EvictedBytes == 0 {
		t.Errorf("stats %+v", st)
	}
	c = openCache(t, dir, Options{MaxBytes: 1 * mib})
	b = openBlob(t, c, m, nil)
	cached := c.Usage()
	if cached > 1*mib {
		t.Errorf("reopened with %d bytes cached, over the bound", cached)
	}
	m.reset()
	all := make([]byte, len(m.data))
	if _, err := b.ReadAt(all, 0); err != nil || !bytes.Equal(all, m.data) {
		t.Fatalf("full read after restart: %v", err)
	}
	if st := c.Stats(); st.CorruptBlocks != 0 || st.Hits == 0 {
		t.Errorf("after restart: %+v (%d bytes were cached)", st, cached)
	}
}

// TestMarksPersistWithoutClose copies the cache directory after the flusher
// has run but without Close, as a crash would leave it: the copy must serve
// what was read without fetching.
func TestMarksPersistWithoutClose(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(1*mib, 14)
	c := openCache(t, dir, Options{})
	b := openBlob(t, c, m, nil)
	if _, err := b.ReadAt(make([]byte, 600*kib), 0); err != nil {
		t.Fatal(err)
	}
	c.background.Wait()
	crashed := t.TempDir()
	if err := os.CopyFS(crashed, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	os.Remove(crashed + "/.lock")
	c2 := openCache(t, crashed, Options{})
	b2 := openBlob(t, c2, m, failFetcher{t})
	p := make([]byte, 600*kib)
	if _, err := b2.ReadAt(p, 0); err != nil || !bytes.Equal(p, m.data[:len(p)]) {
		t.Fatalf("blocks read before the crash: %v", err)
	}
	if got := c2.Usage(); got != 768*kib { // three whole refill windows
		t.Errorf("usage %d after the crash copy", got)
	}
}
