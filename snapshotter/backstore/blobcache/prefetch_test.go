package blobcache

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"
)

// TestDemandMissBesidePrefetchedBlock: a prefetch of a window's first
// block holds only that block in flight, so a demand miss on another block
// of the window fetches at once instead of waiting for the prefetch.
func TestDemandMissBesidePrefetchedBlock(t *testing.T) {
	m := newMemFetcher(1*mib, 21)
	release := make(chan struct{})
	holdFetches(m, func(off int64) bool { return off == 0 }, release) // the prefetch of block 0
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	b.Expect(0, 100) // a trace replay: misses fetch only their blocks
	done := make(chan error, 1)
	go func() { done <- b.Prefetch(context.Background(), 0, 100) }()
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p := make([]byte, 4096)
	if _, err := b.ReadAtContext(ctx, p, 3*64*kib); err != nil {
		t.Fatalf("demand read beside a prefetch in flight: %v", err)
	}
	if !bytes.Equal(p, m.data[3*64*kib:3*64*kib+4096]) {
		t.Error("wrong bytes")
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The demand fill fetched block 3 (a trace replay is on, so only the
	// read's block), the prefetch block 0.
	if got := m.fetched(); len(got) != 2 {
		t.Errorf("fetched %v", got)
	}
	if st := c.Stats(); st.PrefetchedBytes != 64*kib {
		t.Errorf("prefetched %d bytes, want one block", st.PrefetchedBytes)
	}
}

// TestPrefetchHoldsBackForDemand: while a demand fetch is in flight, one
// prefetch fetch runs beside it and no more; once it ends, the rest go.
func TestPrefetchHoldsBackForDemand(t *testing.T) {
	m := newMemFetcher(2*mib, 22)
	demand, prefetch := make(chan struct{}), make(chan struct{})
	m.hook = func(ctx context.Context, off int64, n int) error {
		gate := prefetch
		if off == 0 {
			gate = demand
		}
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	c := openCache(t, t.TempDir(), Options{Readahead: -1})
	b := openBlob(t, c, m, nil)
	read := readInBackground(context.Background(), b, 0)
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	var wg sync.WaitGroup
	for _, off := range []int64{1 * mib, 1*mib + 512*kib} {
		wg.Go(func() {
			if err := b.Prefetch(context.Background(), off, 64*kib); err != nil {
				t.Error(err)
			}
		})
	}
	waitFor(t, func() bool { return m.calls.Load() == 2 })
	time.Sleep(50 * time.Millisecond)
	if n := m.calls.Load(); n != 2 {
		t.Fatalf("%d fetches beside a demand fetch; want it and one prefetch", n)
	}
	close(demand)
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return m.calls.Load() == 3 }) // the demand fetch ended
	close(prefetch)
	wg.Wait()
}

// holdFetches makes the fetches of m at the offsets held picks wait for
// release.
func holdFetches(m *memFetcher, held func(off int64) bool, release <-chan struct{}) {
	m.hook = func(ctx context.Context, off int64, n int) error {
		if !held(off) {
			return nil
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestDemandNarrowDuringPrefetch: while a trace replay runs, a miss fetches
// only the blocks of its read, not their refill window.
func TestDemandNarrowDuringPrefetch(t *testing.T) {
	m := newMemFetcher(2*mib, 23)
	release := make(chan struct{})
	holdFetches(m, func(off int64) bool { return off >= 1*mib }, release) // the prefetch
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	b.Expect(1*mib, 64*kib)
	done := make(chan error, 1)
	go func() { done <- b.Prefetch(context.Background(), 1*mib, 64*kib) }()
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	if _, err := b.ReadAt(make([]byte, 4096), 9*64*kib+100); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := m.fetched()
	if len(got) != 2 || got[0] != [2]int64{9 * 64 * kib, 10 * 64 * kib} {
		t.Errorf("fetched %v: want block 9 alone, then the prefetch", got)
	}
	// Once the replay has ended, its misses stay narrow
	// (TestMissesStaySmallAfterReplay has a blob that never replayed).
	b.EndExpect()
	m.reset()
	if _, err := b.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if got := m.fetched(); len(got) != 1 || got[0] != [2]int64{0, 64 * kib} {
		t.Errorf("fetched %v: want block 0 alone", got)
	}
}

// TestRateBoundsPrefetchAndReadahead: on a slow source, prefetch in flight
// shrinks to about a second of data and readahead spans to about 250 ms;
// on a fast one the options apply.
func TestRateBoundsPrefetchAndReadahead(t *testing.T) {
	c := openCache(t, t.TempDir(), Options{PrefetchConcurrency: 8})
	if got := c.prefetchBudget(); got != 0 {
		t.Errorf("no rate known: prefetch budget %d, want none", got)
	}
	if got := c.maxReadahead(); got != DefaultReadahead {
		t.Errorf("no rate known: readahead %d", got)
	}
	c.rate.observe(3_000_000, time.Second) // 25 Mbit/s or so
	if got := c.prefetchBudget(); got != 3_000_000 {
		t.Errorf("3 MB/s: prefetch budget %d, want 3 MB (1 s)", got)
	}
	if got := c.maxReadahead(); got != 512*kib {
		t.Errorf("3 MB/s: readahead %d, want 512 KiB (750 KB in whole windows)", got)
	}
	for range 40 { // each sample moves the average by a quarter of the gap
		c.rate.observe(1<<30, time.Second)
	}
	if got := c.prefetchBudget(); got < 1<<29 {
		t.Errorf("1 GB/s: prefetch budget %d, want about 1 GB", got)
	}
	if got := c.maxReadahead(); got != DefaultReadahead {
		t.Errorf("1 GB/s: readahead %d", got)
	}
	c.rate.observe(100, time.Second) // too small to learn from
	if got := c.rate.bytesPerSecond(); got < 1<<29 {
		t.Errorf("a small fetch moved the estimate to %d", got)
	}
}

// TestPrefetchGateBudget: a fetch is admitted while the bytes in flight
// are under the budget and within the count limit, one beside a demand
// fetch, and a waiter goes once a release makes room. An admitted fetch's
// bytes count from its admission (reserved), so the next waiter, woken
// by it, cannot go in with them uncounted.
func TestPrefetchGateBudget(t *testing.T) {
	g := newPrefetchGate()
	ctx := context.Background()
	done, cancel := context.WithCancel(ctx)
	cancel() // acquire checks for room before it waits: fails only without
	budget := func() int64 { return 100 }
	t1, t2 := g.enter(), g.enter()
	if err := g.acquire(ctx, t1, 8, budget, 150); err != nil {
		t.Fatal(err)
	}
	if err := g.acquire(done, t2, 8, budget, 10); err == nil {
		t.Fatal("admitted with 150 bytes reserved against a budget of 100")
	}
	g.addBytes(-100) // t1 claimed 50 bytes: under the budget again
	if err := g.acquire(done, t2, 8, budget, 10); err != nil {
		t.Fatalf("50 of 100 bytes in flight: %v", err)
	}
	g.release(10)
	g.release(50)
	g.leave(t1) // its Prefetch call ends
	g.demandStart()
	if err := g.acquire(ctx, t2, 8, budget, 10); err != nil {
		t.Fatalf("one beside a demand fetch: %v", err)
	}
	t3 := g.enter()
	if err := g.acquire(done, t3, 8, budget, 10); err == nil {
		t.Fatal("a second prefetch fetch was admitted beside a demand fetch")
	}
	g.demandEnd()
	if err := g.acquire(done, t3, 8, budget, 10); err != nil {
		t.Fatalf("after the demand fetch: %v", err)
	}
}

// TestDemandPlannedSplit: demand fetches of blocks a plan announced
// (Expect) count as planned, others as unplanned, by the bytes fetched;
// Expect itself fetches nothing.
func TestDemandPlannedSplit(t *testing.T) {
	m := newMemFetcher(1*mib, 29)
	c := openCache(t, t.TempDir(), Options{BlockSize: 64 * kib})
	b := openBlob(t, c, m, nil)
	b.Expect(100*kib, 100*kib) // blocks 1-3
	b.Expect(-1, 10)           // ignored
	if st := c.Stats(); st.PlannedBytes != 192*kib || st.Fetches != 0 {
		t.Fatalf("after Expect: planned %d bytes (want 192 KiB), %d fetches", st.PlannedBytes, st.Fetches)
	}
	// A plan is under way (Expect), so the reads below fetch only their
	// own blocks: each fetch is one block.
	release := make(chan struct{})
	holdFetches(m, func(off int64) bool { return off >= 768*kib }, release)
	done := make(chan error, 1)
	go func() { done <- b.Prefetch(context.Background(), 768*kib, 64*kib) }()
	waitFor(t, func() bool { return m.calls.Load() == 1 })
	for _, off := range []int64{130 * kib, 500 * kib} { // block 2 (planned), block 7
		if _, err := b.ReadAt(make([]byte, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	st := c.Stats()
	if st.DemandPlannedBytes != 64*kib || st.DemandPlannedFetches != 1 || st.DemandUnplannedBytes != 64*kib {
		t.Errorf("planned %d bytes in %d fetches, unplanned %d: want 64 KiB in 1, 64 KiB",
			st.DemandPlannedBytes, st.DemandPlannedFetches, st.DemandUnplannedBytes)
	}
}
