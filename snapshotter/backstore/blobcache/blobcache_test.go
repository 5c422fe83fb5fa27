package blobcache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

func TestReadAtMatchesSource(t *testing.T) {
	m := newMemFetcher(5*mib+123, 1) // a short last block
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	var _ io.ReaderAt = b
	size := int64(len(m.data))
	r := rand.New(rand.NewPCG(2, 2))
	for range 300 {
		off := r.Int64N(size)
		p := make([]byte, 1+r.IntN(300*kib))
		n, err := b.ReadAt(p, off)
		want := min(int64(len(p)), size-off)
		if int64(n) != want || (n < len(p) && err != io.EOF) || (n == len(p) && err != nil) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", len(p), off, n, err)
		}
		if !bytes.Equal(p[:n], m.data[off:off+int64(n)]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", len(p), off)
		}
	}
	if n, err := b.ReadAt(make([]byte, 10), size); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v", n, err)
	}
	if _, err := b.ReadAt(make([]byte, 10), -1); !errors.Is(err, ErrInvalidBlob) {
		t.Errorf("negative offset: %v", err)
	}
	if st := c.Stats(); st.BytesServed == 0 || st.Hits == 0 || st.Misses == 0 {
		t.Errorf("stats not counting: %+v", st)
	}
}

// TestRefillWindow checks that a miss fetches the aligned refill window around
// it, and that the rest of that window is then served without fetching.
func TestRefillWindow(t *testing.T) {
	m := newMemFetcher(2*mib, 3)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib, RefillSize: 256 * kib})
	b := openBlob(t, c, m, nil)
	p := make([]byte, 100)
	if _, err := b.ReadAt(p, 300*kib); err != nil {
		t.Fatal(err)
	}
	if got := m.fetched(); len(got) != 1 || got[0] != [2]int64{256 * kib, 512 * kib} {
		t.Fatalf("fetched %v, want the window [256 KiB, 512 KiB)", got)
	}
	for _, off := range []int64{256 * kib, 511 * kib, 400 * kib} {
		if _, err := b.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if m.calls.Load() != 1 {
		t.Errorf("%d fetches, want 1", m.calls.Load())
	}
	if st := b.Stats(); st.CachedBytes != 256*kib || st.Misses != 1 || st.Hits != 3 {
		t.Errorf("blob stats %+v", st)
	}
}

// TestConcurrentReadsCoalesce hammers one blob from many goroutines: every
// read must be right, and no window may be fetched twice.
func TestConcurrentReadsCoalesce(t *testing.T) {
	m := newMemFetcher(8*mib, 4)
	m.delay = 2 * time.Millisecond // keep fetches in flight long enough to overlap
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	size := int64(len(m.data))
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 9))
			for range 60 {
				off := r.Int64N(size)
				p := make([]byte, 1+r.IntN(128*kib))
				n, err := b.ReadAtContext(context.Background(), p, off)
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
	c.background.Wait() // any readahead a chance run of reads started
	// A fetch covers whole aligned windows: those one read missed, or a
	// readahead span when reads happened to line up.
	seen := map[int64]int{}
	fetches := m.fetched()
	for _, r := range fetches {
		if r[0]%DefaultRefillSize != 0 || (r[1]%DefaultRefillSize != 0 && r[1] != size) || r[1] <= r[0] {
			t.Errorf("fetch [%d, %d) is not a run of aligned refill windows", r[0], r[1])
		}
		for w := r[0]; w < r[1]; w += DefaultRefillSize {
			seen[w]++
		}
	}
	for off, n := range seen {
		if n > 1 {
			t.Errorf("window at %d fetched %d times", off, n)
		}
	}
	st := c.Stats()
	if st.Coalesced == 0 {
		t.Error("no fill was coalesced")
	}
	if st.Fetches != int64(len(fetches)) || st.BytesFetched != int64(len(seen))*DefaultRefillSize {
		t.Errorf("stats %+v for %d windows in %d fetches", st, len(seen), len(fetches))
	}
	t.Logf("%d windows fetched once each in %d fetches; %d coalesced waits; %d hits, %d misses",
		len(seen), len(fetches), st.Coalesced, st.Hits, st.Misses)
}

func TestRestartReusesCache(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(3*mib+5, 5)
	c := openCache(t, dir, Options{})
	b := openBlob(t, c, m, nil)
	half := make([]byte, 3*mib/2)
	if _, err := b.ReadAt(half, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.ReadAt(half, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("read after Close: %v", err)
	}

	c = openCache(t, dir, Options{})
	if c.Usage() != 3*mib/2 {
		t.Errorf("usage after reopen %d, want %d", c.Usage(), 3*mib/2)
	}
	b = openBlob(t, c, m, failFetcher{t})
	got := make([]byte, len(half))
	if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, m.data[:len(got)]) {
		t.Fatalf("cached half after reopen: %v", err)
	}
	// Finish the blob, then the digest check marks it complete on disk.
	b = openBlob(t, c, m, nil)
	all := make([]byte, len(m.data))
	if _, err := b.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = openCache(t, dir, Options{})
	b = openBlob(t, c, m, failFetcher{t})
	if !b.Complete() {
		t.Error("blob not complete after a full read and reopen")
	}
	if _, err := b.ReadAt(all, 0); err != nil || !bytes.Equal(all, m.data) {
		t.Fatalf("complete blob after reopen: %v", err)
	}
	if _, err := c.Blob(m.dgst, 12, m); !errors.Is(err, ErrSizeMismatch) {
		t.Errorf("other size for a cached digest: %v", err)
	}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5A
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptBlockRefetched flips a byte in the data file, both while the
// cache is open and across a restart: the read must return the right bytes,
// having refetched exactly the damaged block.
func TestCorruptBlockRefetched(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(1*mib, 6)
	c := openCache(t, dir, Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	all := make([]byte, len(m.data))
	if _, err := b.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	dataPath, _ := c.paths(m.dgst)
	for round, off := range []int64{200*kib + 17, 700 * kib} {
		m.reset()
		flipByte(t, dataPath, off)
		p := make([]byte, 4*kib)
		at := off &^ (4*kib - 1)
		if _, err := b.ReadAt(p, at); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, m.data[at:at+4*kib]) {
			t.Fatalf("round %d: corrupt bytes served", round)
		}
		blk := off / (64 * kib) * (64 * kib)
		if got := m.fetched(); len(got) != 1 || got[0] != [2]int64{blk, blk + 64*kib} {
			t.Errorf("round %d: fetched %v, want only the damaged block [%d, %d)", round, got, blk, blk+64*kib)
		}
		if st := c.Stats(); st.CorruptBlocks != 1 { // counters start afresh at each Open
			t.Errorf("round %d: %d corrupt blocks counted", round, st.CorruptBlocks)
		}
		if round == 0 { // the second flip is found after a restart
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			c = openCache(t, dir, Options{BlockSize: 64 * kib})
			b = openBlob(t, c, m, nil)
		}
	}
}

func TestDamagedMetaDiscarded(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(1*mib, 7)
	c := openCache(t, dir, Options{})
	b := openBlob(t, c, m, nil)
	if _, err := b.ReadAt(make([]byte, 100), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	dataPath, metaPath := c.paths(m.dgst)
	flipByte(t, metaPath, 20) // inside the header: its CRC fails
	c = openCache(t, dir, Options{})
	if st := c.Stats(); st.DiscardedBlobs != 1 || st.UsedBytes != 0 {
		t.Errorf("stats after a damaged header: %+v", st)
	}
	if _, err := os.Stat(dataPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("data file of a discarded blob: %v", err)
	}
	c.Close()
	// A different block size also discards (and then re-caches) the blob.
	c = openCache(t, dir, Options{BlockSize: 128 * kib})
	b = openBlob(t, c, m, nil)
	if _, err := b.ReadAt(make([]byte, 100), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = openCache(t, dir, Options{BlockSize: 64 * kib})
	if st := c.Stats(); st.DiscardedBlobs != 1 {
		t.Errorf("block size change: %+v", st)
	}
}

// TestDigestMismatchDetected serves consistently wrong bytes for one offset:
// every block passes its CRC (computed at fill time), so only the digest
// check of the complete blob can notice, and then it must drop everything.
func TestDigestMismatchDetected(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(1*mib+100, 8)
	m.corrupt = 500 * kib
	c := openCache(t, dir, Options{})
	b := openBlob(t, c, m, nil)
	if _, err := b.ReadAt(make([]byte, len(m.data)), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil { // waits for the background digest check
		t.Fatal(err)
	}
	// The read still in progress may re-cache its last block after the
	// drop, or, when the drop lands before it read its first block, fetch
	// the whole blob again and have it dropped again.
	if st := c.Stats(); st.DigestMismatches < 1 || st.UsedBytes >= int64(len(m.data)) {
		t.Fatalf("after a bad blob: %+v", st)
	}
	c = openCache(t, dir, Options{})
	b = openBlob(t, c, m, nil)
	if b.Complete() || b.Stats().CachedBytes >= b.Size() {
		t.Errorf("bad blob kept: %+v", b.Stats())
	}
	// Verify reports the same synchronously.
	if err := b.Prefetch(context.Background(), 0, b.Size()); err != nil {
		t.Fatal(err)
	}
	c.background.Wait()
	if err := b.Verify(context.Background()); !errors.Is(err, ErrIncomplete) {
		t.Errorf("Verify after the background check dropped the blob: %v", err)
	}
	m.corrupt = -1
	if err := b.Prefetch(context.Background(), 0, b.Size()); err != nil {
		t.Fatal(err)
	}
	c.background.Wait()
	if err := b.Verify(context.Background()); err != nil || !b.Complete() {
		t.Errorf("good bytes: Verify %v, complete %v", err, b.Complete())
	}
}

func TestPrefetch(t *testing.T) {
	m := newMemFetcher(2*mib+1, 10)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	if err := b.Prefetch(context.Background(), 100*kib, 1*mib); err != nil {
		t.Fatal(err)
	}
	// Blocks 1..17 cover [100K, 1124K): one request per window they
	// touch (windows 0..4), each for the covering blocks only.
	got := m.fetched()
	var n int64
	for _, r := range got {
		n += r[1] - r[0]
	}
	if len(got) != 5 || got[0][0] != 64*kib || n != 17*64*kib {
		t.Errorf("prefetch fetched %v (%d bytes)", got, n)
	}
	m.reset()
	if _, err := b.ReadAt(make([]byte, 1*mib), 100*kib); err != nil || m.calls.Load() != 0 {
		t.Errorf("read after prefetch: %d fetches, %v", m.calls.Load(), err)
	}
	if err := b.Prefetch(context.Background(), -1, 5); !errors.Is(err, ErrInvalidBlob) {
		t.Errorf("bad range: %v", err)
	}
	// Only the 17 blocks of 64 KiB ([64K, 1152K)) were prefetched, and the
	// read used all of them: nothing is unused.
	st := c.Stats()
	if st.PrefetchedBytes != 17*64*kib || st.PrefetchHits != 17 || st.PrefetchUnusedBytes != 0 {
		t.Errorf("prefetch stats: prefetched %d, hits %d, unused %d", st.PrefetchedBytes, st.PrefetchHits, st.PrefetchUnusedBytes)
	}
	// A second read of the same blocks is an ordinary hit.
	b.ReadAt(make([]byte, 4096), 100*kib)
	if st2 := c.Stats(); st2.PrefetchHits != 17 {
		t.Errorf("re-read counted as a prefetch hit: %d", st2.PrefetchHits)
	}
}

// TestDemandNotBehindPrefetch blocks every prefetch fetch and fills the
// prefetch cap: a demand read elsewhere must still complete.
func TestDemandNotBehindPrefetch(t *testing.T) {
	m := newMemFetcher(4*mib, 11)
	release := make(chan struct{})
	m.hook = func(ctx context.Context, off int64, n int) error {
		if off >= 2*mib { // the prefetched half
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	c := openCache(t, t.TempDir(), Options{PrefetchConcurrency: 2})
	b := openBlob(t, c, m, nil)
	var wg sync.WaitGroup
	for i := range 4 { // more prefetchers than the cap: some queue
		wg.Go(func() {
			if err := b.Prefetch(context.Background(), 2*mib+int64(i)*256*kib, 256*kib); err != nil {
				t.Error(err)
			}
		})
	}
	time.Sleep(20 * time.Millisecond) // let the prefetchers take the cap
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p := make([]byte, 64*kib)
	if _, err := b.ReadAtContext(ctx, p, 1*mib); err != nil {
		t.Fatalf("demand read while prefetch holds the cap: %v", err)
	}
	if !bytes.Equal(p, m.data[1*mib:1*mib+64*kib]) {
		t.Error("wrong bytes")
	}
	close(release)
	wg.Wait()
}

func TestFetchErrorsAndCancellation(t *testing.T) {
	m := newMemFetcher(1*mib, 12)
	boom := errors.New("source down")
	var fail bool
	var mu sync.Mutex
	m.hook = func(ctx context.Context, off int64, n int) error {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			return boom
		}
		return nil
	}
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	mu.Lock()
	fail = true
	mu.Unlock()
	if _, err := b.ReadAt(make([]byte, 10), 0); !errors.Is(err, ErrFetch) || !errors.Is(err, boom) {
		t.Fatalf("source failure: %v", err)
	}
	mu.Lock()
	fail = false
	mu.Unlock()
	p := make([]byte, 10)
	if _, err := b.ReadAt(p, 0); err != nil || !bytes.Equal(p, m.data[:10]) {
		t.Fatalf("retry after the source recovered: %v", err)
	}

	// A leader that gives up must not fail a waiter whose context is live.
	m.delay = 100 * time.Millisecond
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := b.ReadAtContext(short, make([]byte, 10), 600*kib); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("leader: %v, want its deadline", err)
		}
	})
	time.Sleep(5 * time.Millisecond)
	if _, err := b.ReadAtContext(context.Background(), p, 600*kib); err != nil || !bytes.Equal(p, m.data[600*kib:600*kib+10]) {
		t.Errorf("waiter: %v", err)
	}
	wg.Wait()
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	c := openCache(t, dir, Options{})
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrLocked) {
		t.Errorf("second Open of a directory: %v", err)
	}
	for _, o := range []Options{{BlockSize: 1000}, {BlockSize: 64 * kib, RefillSize: 100 * kib}, {MaxBytes: -1}} {
		if _, err := Open(t.TempDir(), o); !errors.Is(err, ErrOptions) {
			t.Errorf("options %+v: %v", o, err)
		}
	}
	m := newMemFetcher(10, 1)
	for _, tc := range []struct {
		dgst string
		size int64
		f    Fetcher
	}{{"sha256:zz", 10, m}, {string(m.dgst), -1, m}, {string(m.dgst), 10, nil}} {
		if _, err := c.Blob(digestOf(tc.dgst), tc.size, tc.f); !errors.Is(err, ErrInvalidBlob) {
			t.Errorf("Blob(%s, %d): %v", tc.dgst, tc.size, err)
		}
	}
	c.Close()
	if _, err := c.Blob(m.dgst, 10, m); !errors.Is(err, ErrClosed) {
		t.Errorf("Blob after Close: %v", err)
	}
}

func TestEmptyBlob(t *testing.T) {
	m := newMemFetcher(0, 1)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, failFetcher{t})
	if n, err := b.ReadAt(make([]byte, 4), 0); n != 0 || err != io.EOF {
		t.Errorf("empty blob: %d %v", n, err)
	}
}

func TestPrometheusCollector(t *testing.T) {
	m := newMemFetcher(1*mib, 13)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	if _, err := b.ReadAt(make([]byte, 100), 0); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, mt := range f.GetMetric() {
			switch {
			case mt.Counter != nil:
				got[f.GetName()] = mt.GetCounter().GetValue()
			case mt.Gauge != nil:
				got[f.GetName()] = mt.GetGauge().GetValue()
			case mt.Histogram != nil:
				got[f.GetName()] = float64(mt.GetHistogram().GetSampleCount())
			}
		}
	}
	want := map[string]float64{
		"obd_blobcache_misses_total": 1, "obd_blobcache_fetched_bytes_total": 256 * kib,
		"obd_blobcache_served_bytes_total": 100, "obd_blobcache_demand_fetch_seconds": 1,
		"obd_blobcache_used_bytes": 256 * kib,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if !strings.HasPrefix(families[0].GetName(), "obd_blobcache_") {
		t.Errorf("metric %s", families[0].GetName())
	}
}

// TestRunReadAcrossBlocks: a read over many cached blocks (one pread for
// the run) returns the right bytes and counts a hit a block; a damaged
// block inside the run is refetched, alone, and never served; unaligned
// and tail reads take the block-by-block path and agree.
func TestRunReadAcrossBlocks(t *testing.T) {
	m := newMemFetcher(1*mib+3000, 8) // a short last page
	c := openCache(t, t.TempDir(), Options{BlockSize: 4 * kib, RefillSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	all := make([]byte, len(m.data))
	if _, err := b.ReadAt(all, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	m.reset()
	hits := c.Stats().Hits
	p := make([]byte, 256*kib)
	if _, err := b.ReadAt(p, 128*kib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, m.data[128*kib:384*kib]) {
		t.Fatal("wrong bytes from a run of cached blocks")
	}
	if got := c.Stats().Hits - hits; got != 64 {
		t.Errorf("%d hits for a read of 64 cached blocks", got)
	}
	dataPath, _ := c.paths(m.dgst)
	flipByte(t, dataPath, 300*kib+5)
	if _, err := b.ReadAt(p, 128*kib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, m.data[128*kib:384*kib]) {
		t.Fatal("corrupt bytes served from a run of cached blocks")
	}
	if got := m.fetched(); len(got) != 1 || got[0] != [2]int64{300 * kib, 304 * kib} {
		t.Errorf("fetched %v, want only the damaged block [%d, %d)", got, 300*kib, 304*kib)
	}
	for _, r := range [][2]int64{{100, 50_000}, {1*mib - 8192, 8192 + 3000}, {1 * mib, 3000}} {
		q := make([]byte, r[1])
		if n, err := b.ReadAt(q, r[0]); int64(n) != r[1] || (err != nil && !errors.Is(err, io.EOF)) {
			t.Fatalf("read [%d, +%d): %d, %v", r[0], r[1], n, err)
		}
		if !bytes.Equal(q, m.data[r[0]:r[0]+r[1]]) {
			t.Errorf("read [%d, +%d): wrong bytes", r[0], r[1])
		}
	}
}
