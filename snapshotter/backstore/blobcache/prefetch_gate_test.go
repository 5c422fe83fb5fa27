package blobcache

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
)

// awaiting reports whether a fetch in flight has been awaited (by a
// Prefetch, in the tests that use it).
func awaiting(c *Cache) bool { return c.stats.coalesced.Load() == 1 }

// TestAwaitingPrefetchHoldsBackNoOther: a Prefetch waiting for a held
// demand fetch of its block leaves the gate to others, so a Prefetch of
// another range starts (beside the demand fetch) and ends before it.
func TestAwaitingPrefetchHoldsBackNoOther(t *testing.T) {
	m := newMemFetcher(2*mib, 41)
	release := make(chan struct{})
	holdFetches(m, func(off int64) bool { return off == 0 }, release) // the demand fetch
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib, Readahead: -1})
	b := openBlob(t, c, m, nil)
	read := readInBackground(context.Background(), b, 0)
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	first := make(chan error, 1)
	go func() { first <- b.Prefetch(context.Background(), 0, 100) }()
	waitFor(t, func() bool { return awaiting(c) })
	second := make(chan error, 1)
	go func() { second <- b.Prefetch(context.Background(), 1*mib, 64*kib) }()
	var err error
	waitFor(t, func() bool {
		select {
		case err = <-second:
			return true
		default:
			return false
		}
	})
	if err != nil {
		t.Fatalf("second Prefetch beside an awaiting one: %v", err)
	}
	select {
	case err := <-first:
		t.Fatalf("the first Prefetch ended (%v) before the demand fetch it awaits", err)
	default:
	}
	close(release)
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if got := m.calls.Load(); got != 2 {
		t.Errorf("%d fetches, want the demand fetch and the second Prefetch's", got)
	}
}

// TestPrefetchRetriesAfterReaderGaveUp: a Prefetch waiting for a demand
// fetch whose reader cancels its read fetches the block itself instead of
// failing with the reader's error.
func TestPrefetchRetriesAfterReaderGaveUp(t *testing.T) {
	m := newMemFetcher(1*mib, 42)
	var n atomic.Int64
	m.hook = func(ctx context.Context, off int64, _ int) error {
		if n.Add(1) > 1 {
			return nil
		}
		<-ctx.Done() // the first, the reader's, waits for its reader to go
		return ctx.Err()
	}
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib, Readahead: -1})
	b := openBlob(t, c, m, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	read := readInBackground(ctx, b, 0)
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	done := make(chan error, 1)
	go func() { done <- b.Prefetch(context.Background(), 0, 100) }()
	waitFor(t, func() bool { return awaiting(c) })
	cancel()
	if err := <-read; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled read: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Prefetch failed with its waited-for reader: %v", err)
	}
	if !b.s.has(0) || m.calls.Load() != 2 {
		t.Errorf("block 0 cached %v after %d fetches, want cached after 2", b.s.has(0), m.calls.Load())
	}
}

// TestPrefetchGivesUp: a block that stays missing through every try (here
// someone else's fetch of it keeps failing) fails the Prefetch with
// ErrFetch instead of being skipped silently.
func TestPrefetchGivesUp(t *testing.T) {
	m := newMemFetcher(1*mib, 43)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib, Readahead: -1})
	b := openBlob(t, c, m, nil)
	failed := &fillCall{done: make(chan struct{}), err: errors.New("reader's fetch failed")}
	close(failed.done)
	b.s.mu.Lock()
	b.s.inflight[1] = failed
	b.s.mu.Unlock()
	defer func() {
		b.s.mu.Lock()
		delete(b.s.inflight, 1)
		b.s.mu.Unlock()
	}()
	err := b.Prefetch(context.Background(), 0, 128*kib)
	if !errors.Is(err, ErrFetch) {
		t.Fatalf("Prefetch of a block that never arrives: %v, want ErrFetch", err)
	}
	if !b.s.has(0) {
		t.Error("block 0, beside the failing one, was not fetched")
	}
}

// TestFullFetchKeepsReadahead: a Prefetch outside a trace replay (the
// replayer's full fetch calls no Expect) leaves misses their whole refill
// windows; inside one (Expect to EndExpect) a miss fetches only its block.
func TestFullFetchKeepsReadahead(t *testing.T) {
	m := newMemFetcher(2*mib, 44)
	release := make(chan struct{})
	holdFetches(m, func(off int64) bool { return off >= 1*mib }, release)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	done := make(chan error, 1)
	go func() { done <- b.Prefetch(context.Background(), 1*mib, 64*kib) }()
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	if _, err := b.ReadAt(make([]byte, 4096), 100); err != nil {
		t.Fatal(err)
	}
	b.Expect(1*mib, 64*kib)
	if _, err := b.ReadAt(make([]byte, 4096), 9*64*kib+100); err != nil {
		t.Fatal(err)
	}
	b.EndExpect()
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := m.fetched()
	want := [][2]int64{{0, 256 * kib}, {9 * 64 * kib, 10 * 64 * kib}}
	if len(got) != 3 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("fetched %v: want window 0 (no replay), block 9 (in one), then the prefetch", got)
	}
	if n := c.tracing.Load(); n != 0 {
		t.Errorf("%d blobs still in a trace replay after EndExpect", n)
	}
}

// TestPlannedMarksCleared: a planned block stops counting as planned once
// it has been fetched (a demand fetch after its eviction is unplanned),
// and every mark goes when the replay ends.
func TestPlannedMarksCleared(t *testing.T) {
	m := newMemFetcher(1*mib, 45)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib, Readahead: -1})
	b := openBlob(t, c, m, nil)
	b.Expect(64*kib, 192*kib) // blocks 1-3
	if err := b.Prefetch(context.Background(), 64*kib, 64*kib); err != nil {
		t.Fatal(err)
	}
	b.s.mu.Lock()
	_, err := b.s.dropBlocks(1, 2) // as an eviction would
	b.s.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{64 * kib, 128 * kib} { // block 1 (fetched once), block 2 (planned)
		if _, err := b.ReadAt(make([]byte, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	b.EndExpect()
	if _, err := b.ReadAt(make([]byte, 4096), 192*kib); err != nil { // block 3
		t.Fatal(err)
	}
	st := c.Stats()
	if st.DemandPlannedBytes != 64*kib || st.DemandUnplannedBytes != 128*kib {
		t.Errorf("demand planned %d, unplanned %d: want 64 KiB (block 2), 128 KiB (blocks 1 and 3)",
			st.DemandPlannedBytes, st.DemandUnplannedBytes)
	}
}

// TestMissesStaySmallAfterReplay: once a blob's replay is over, its misses
// fetch their own blocks, not their windows; a blob never replayed keeps
// the windows.
func TestMissesStaySmallAfterReplay(t *testing.T) {
	c := openCache(t, t.TempDir(), Options{BlockSize: 16 * kib, Readahead: -1})
	replayed, plain := newMemFetcher(1*mib, 46), newMemFetcher(1*mib, 47)
	a, b := openBlob(t, c, replayed, nil), openBlob(t, c, plain, nil)
	a.Expect(0, 16*kib)
	if err := a.Prefetch(context.Background(), 0, 16*kib); err != nil {
		t.Fatal(err)
	}
	a.EndExpect()
	for _, blob := range []*Blob{a, b} {
		if _, err := blob.ReadAt(make([]byte, 4096), 512*kib+100); err != nil {
			t.Fatal(err)
		}
	}
	if got := replayed.fetched(); len(got) != 2 || got[1] != [2]int64{512 * kib, 528 * kib} {
		t.Errorf("replayed blob fetched %v: want the prefetch, then block 32 alone", got)
	}
	if got := plain.fetched(); len(got) != 1 || got[0] != [2]int64{512 * kib, 768 * kib} {
		t.Errorf("plain blob fetched %v: want window 2", got)
	}
}

// TestFetchExactly: until every FetchExactly has ended (and ending one
// twice ends it once), a miss fetches its own blocks; after, its refill
// window again.
func TestFetchExactly(t *testing.T) {
	c := openCache(t, t.TempDir(), Options{BlockSize: 4 * kib})
	m := newMemFetcher(1*mib, 48)
	b := openBlob(t, c, m, nil)
	endOuter, endInner := b.FetchExactly(), b.FetchExactly()
	endInner()
	endInner()
	if _, err := b.ReadAt(make([]byte, 512), 1*mib-512); err != nil {
		t.Fatal(err)
	}
	endOuter()
	if _, err := b.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	want := [][2]int64{{1*mib - 4*kib, 1 * mib}, {0, 256 * kib}}
	if got := m.fetched(); !slices.Equal(got, want) {
		t.Errorf("fetched %v, want %v: the last block alone, then window 0", got, want)
	}
}
