package blobcache

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

func TestGrow(t *testing.T) {
	const w = 256 * kib
	for _, c := range []struct{ ra, n, want int64 }{
		{0, 512 * kib, 2 * mib},    // four times the request
		{0, 10 * kib, 2 * w},       // at least two windows
		{0, 300 * kib, 1280 * kib}, // rounded up to whole windows
		{2 * mib, 512 * kib, 4 * mib},
		{8 * mib, 512 * kib, 16 * mib},
		{16 * mib, 512 * kib, 16 * mib}, // capped
		{0, 8 * mib, 16 * mib},
	} {
		if got := grow(c.ra, c.n, w, 16*mib); got != c.want {
			t.Errorf("grow(%d, %d) = %d, want %d", c.ra, c.n, got, c.want)
		}
	}
}

// readSeq reads [from, to) of b in requests of n bytes, checking the bytes.
func readSeq(t *testing.T, b *Blob, m *memFetcher, from, to, n int64) {
	t.Helper()
	p := make([]byte, n)
	for off := from; off < to; off += n {
		k, err := b.ReadAt(p, off)
		if (err != nil && off+n <= int64(len(m.data))) || !bytes.Equal(p[:k], m.data[off:off+int64(k)]) {
			t.Fatalf("read at %d: %d bytes, %v", off, k, err)
		}
	}
}

// fetchSizes returns the sizes of the fetches m served, in order, and
// fails the test if any window was fetched twice.
func fetchSizes(t *testing.T, m *memFetcher) []int64 {
	t.Helper()
	var sizes []int64
	seen := map[int64]bool{}
	for _, r := range m.fetched() {
		sizes = append(sizes, r[1]-r[0])
		for w := r[0]; w < r[1]; w += DefaultRefillSize {
			if seen[w] {
				t.Errorf("window at %d fetched twice", w)
			}
			seen[w] = true
		}
	}
	return sizes
}

// TestReadaheadRampsForSequentialReader: a reader going through a blob in
// 512 KiB requests gets spans that grow to the 16 MiB maximum, so the blob
// arrives in a few large fetches, each window once, all of it read.
func TestReadaheadRampsForSequentialReader(t *testing.T) {
	m := newMemFetcher(64*mib, 20)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	readSeq(t, b, m, 0, int64(len(m.data)), 512*kib)
	c.background.Wait()
	sizes := fetchSizes(t, m)
	if len(sizes) > 24 || slices.Max(sizes) != DefaultReadahead {
		t.Errorf("%d fetches of %v; want a few, growing to %d", len(sizes), sizes, DefaultReadahead)
	}
	st := c.Stats()
	if st.BytesFetched != int64(len(m.data)) || st.ReadaheadBytes < 48*mib || st.ReadaheadUnusedBytes != 0 || st.ReadaheadHits == 0 {
		t.Errorf("stats: fetched %d, readahead %d (unused %d, hits %d)",
			st.BytesFetched, st.ReadaheadBytes, st.ReadaheadUnusedBytes, st.ReadaheadHits)
	}
	t.Logf("fetch sizes %v", sizes)
}

// TestNoReadaheadForRandomReader: random 64 KiB reads fetch only the
// windows they touch.
func TestNoReadaheadForRandomReader(t *testing.T) {
	m := newMemFetcher(64*mib, 21)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	r := rand.New(rand.NewPCG(5, 5))
	p := make([]byte, 64*kib)
	for range 300 {
		off := r.Int64N(int64(len(m.data)) - int64(len(p)))
		if _, err := b.ReadAt(p, off); err != nil || !bytes.Equal(p, m.data[off:off+int64(len(p))]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	c.background.Wait()
	for _, n := range fetchSizes(t, m) {
		if n > 2*DefaultRefillSize {
			t.Errorf("a %d-byte fetch for 64 KiB random reads", n)
		}
	}
	if st := c.Stats(); st.ReadaheadBytes != 0 {
		t.Errorf("random reads read ahead %d bytes", st.ReadaheadBytes)
	}
}

// TestReadaheadResetsOnJump: a reader that ramped up and then jumps starts
// a new stream: its first request fetches only its own windows, and its
// readahead starts again at the initial size; what the old stream read
// ahead and nobody read is counted as unused.
func TestReadaheadResetsOnJump(t *testing.T) {
	m := newMemFetcher(128*mib, 22)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	readSeq(t, b, m, 0, 40*mib, 512*kib)
	c.background.Wait()
	if sizes := fetchSizes(t, m); slices.Max(sizes) != DefaultReadahead {
		t.Fatalf("no ramp before the jump: %v", sizes)
	}
	m.reset()
	readSeq(t, b, m, 100*mib, 100*mib+512*kib, 512*kib)
	c.background.Wait()
	if got := m.fetched(); len(got) != 1 || got[0] != [2]int64{100 * mib, 100*mib + 512*kib} {
		t.Errorf("the request after the jump fetched %v, want only its own windows", got)
	}
	readSeq(t, b, m, 100*mib+512*kib, 102*mib, 512*kib)
	c.background.Wait()
	// 1.5 MiB more of 512 KiB requests: the new stream's first span (2 MiB)
	// and the one its mark starts (4 MiB), not the old stream's 16 MiB.
	sizes := fetchSizes(t, m)
	if slices.Max(sizes) > 4*mib || !slices.Contains(sizes, 2*mib) {
		t.Errorf("fetches after the jump %v: the ramp did not start over at 2 MiB", sizes)
	}
	if st := c.Stats(); st.ReadaheadUnusedBytes == 0 {
		t.Error("the old stream's unread readahead is not counted")
	}
}

// TestReadaheadOff: with Readahead < 0 a sequential reader fetches one
// window per fill, as a cache without readahead.
func TestReadaheadOff(t *testing.T) {
	m := newMemFetcher(8*mib, 23)
	c := openCache(t, t.TempDir(), Options{Readahead: -1})
	b := openBlob(t, c, m, nil)
	readSeq(t, b, m, 0, int64(len(m.data)), 512*kib)
	for _, n := range fetchSizes(t, m) {
		if n != DefaultRefillSize {
			t.Errorf("a %d-byte fetch with readahead off", n)
		}
	}
	if _, err := Open(t.TempDir(), Options{Readahead: 300 * kib}); !errors.Is(err, ErrOptions) {
		t.Errorf("readahead not a multiple of the refill size: %v", err)
	}
}

// TestReadaheadHeldToMaxBytes: with a small cache the spans stay within
// a twelfth of it (three spans, a quarter), so readahead does not evict
// what is being read.
func TestReadaheadHeldToMaxBytes(t *testing.T) {
	m := newMemFetcher(32*mib, 24)
	c := openCache(t, t.TempDir(), Options{MaxBytes: 24 * mib})
	b := openBlob(t, c, m, nil)
	readSeq(t, b, m, 0, int64(len(m.data)), 512*kib)
	c.background.Wait()
	if sizes := fetchSizes(t, m); slices.Max(sizes) != 2*mib {
		t.Errorf("fetch sizes %v, want at most MaxBytes/12 = 2 MiB", sizes)
	}
}

// TestCloseDuringReadahead: Close cancels a readahead fetch in flight and
// waits for it, and what the reads stored is reused after a reopen.
func TestCloseDuringReadahead(t *testing.T) {
	dir := t.TempDir()
	m := newMemFetcher(64*mib, 25)
	started := make(chan struct{}, 1)
	m.hook = func(ctx context.Context, off int64, _ int) error {
		if off < 3*mib/2 {
			return nil
		}
		select {
		case started <- struct{}{}:
		default:
		}
		<-ctx.Done() // the readahead after the third request hangs
		return ctx.Err()
	}
	c := openCache(t, dir, Options{})
	b := openBlob(t, c, m, nil)
	readSeq(t, b, m, 0, 3*mib/2, 512*kib)
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("no readahead after three sequential requests")
	}
	done := make(chan error)
	go func() { done <- c.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs on a readahead in flight")
	}
	c = openCache(t, dir, Options{})
	b = openBlob(t, c, m, failFetcher{t})
	readSeq(t, b, m, 0, 3*mib/2, 512*kib)
}

// TestReadaheadFetchFailure: a failing readahead leaves no window stuck:
// the reader that needs those bytes fetches them itself, and gets the
// source's error while it lasts.
func TestReadaheadFetchFailure(t *testing.T) {
	m := newMemFetcher(32*mib, 26)
	var failing atomic.Bool
	m.hook = func(_ context.Context, off int64, n int) error {
		if failing.Load() && off+int64(n) > 4*mib {
			return errors.New("source down")
		}
		return nil
	}
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	failing.Store(true)
	readSeq(t, b, m, 0, 4*mib, 512*kib)
	c.background.Wait()
	if _, err := b.ReadAt(make([]byte, 512*kib), 4*mib); !errors.Is(err, ErrFetch) {
		t.Fatalf("read past the failure: %v", err)
	}
	if st := c.Stats(); st.FetchErrors == 0 {
		t.Error("no fetch error counted")
	}
	failing.Store(false)
	readSeq(t, b, m, 4*mib, 32*mib, 512*kib)
}

// TestReadaheadKeepsTwoSpansAhead: a stream keeps one span started
// beyond the one its reader is in until it has read Options.Readahead
// bytes, and two from then on, with the mark on the nearer one.
func TestReadaheadKeepsTwoSpansAhead(t *testing.T) {
	m := newMemFetcher(96*mib, 25)
	c := openCache(t, t.TempDir(), Options{})
	b := openBlob(t, c, m, nil)
	stream := func() stream {
		st := &b.s.streams
		st.mu.Lock()
		defer st.mu.Unlock()
		for k := range st.s {
			if st.s[k].stamp != 0 {
				if m := st.marks[k].Load(); st.s[k].nAhead > 0 && m != st.s[k].ahead[0] {
					t.Fatalf("mark at block %d, first span ahead at %d", m, st.s[k].ahead[0])
				}
				return st.s[k]
			}
		}
		t.Fatal("no stream")
		return stream{}
	}
	most := 0
	for off := int64(0); off < 80*mib; off += 512 * kib {
		readSeq(t, b, m, off, off+512*kib, 512*kib)
		s := stream()
		if s.next-s.start < DefaultReadahead && s.nAhead > 1 {
			t.Fatalf("at %d MiB: %d spans ahead before the stream read %d bytes", off/mib, s.nAhead, DefaultReadahead)
		}
		most = max(most, s.nAhead)
	}
	if most != spansAhead {
		t.Errorf("a long stream had at most %d spans ahead, want %d", most, spansAhead)
	}
	c.background.Wait()
	if st := c.Stats(); st.ReadaheadHits == 0 {
		t.Error("no read took a block from readahead")
	}
}
