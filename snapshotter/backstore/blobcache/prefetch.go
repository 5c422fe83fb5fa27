package blobcache

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Prefetch fetches the blocks covering [off, off+n) that are not cached
// yet, and only those (not their whole refill windows: a trace's ranges
// are small, and window-sized fills cost nearly twice their bytes), one
// window's worth per request, and returns when they are on disk. At most
// Options.PrefetchConcurrency prefetch fetches run at once across the
// cache, no more bytes than about a second of data (on a slow source), and
// only one while a demand read is fetching, so a miss shares the link with
// few prefetch fetches. Callers order and parallelise their own prefetch
// queues (the replayer runs several Prefetch calls at once), and should
// not prefetch more than MaxBytes ahead: prefetched blocks are not
// protected from eviction until read.
func (b *Blob) Prefetch(ctx context.Context, off, n int64) error {
	s := b.s
	if off < 0 || n < 0 {
		return fmt.Errorf("%w: %s: prefetch range [%d, +%d)", ErrInvalidBlob, s.dgst, off, n)
	}
	end := s.size
	if n < s.size-off {
		end = off + n
	}
	if off >= end || s.complete.Load() {
		return nil
	}
	if b.c.storageDown() {
		return fmt.Errorf("%s: prefetch [%d, %d): %w", s.dgst, off, end, errStorageDown)
	}
	lo, hi := off/s.bs, (end-1)/s.bs+1
	ticket := b.c.gate.enter()
	defer b.c.gate.leave(ticket)
	for w := s.window(lo); w <= s.window(hi-1); w++ {
		if err := b.prefetchWindow(ctx, ticket, w, lo, hi); err != nil {
			return err
		}
	}
	return nil
}

// prefetchWindow fetches the missing blocks of window w within [lo, hi).
// It tries a bounded number of times: a block can lose a race with
// eviction, or with another fetch that failed for its own reason (its
// reader gave up, say), and then this call fetches it itself.
func (b *Blob) prefetchWindow(ctx context.Context, ticket uint64, w, lo, hi int64) error {
	s := b.s
	var last error
	for tries := 0; ; tries++ {
		need := s.firstMissing(w, lo, hi)
		if need < 0 {
			return nil
		}
		if tries == maxBlockAttempts {
			if last == nil { // lost to eviction each time
				return fmt.Errorf("%w: %s: prefetch of block %d still missing after %d tries", ErrFetch, s.dgst, need, tries)
			}
			return fmt.Errorf("%w: %s: prefetch of block %d still missing after %d tries: %w", ErrFetch, s.dgst, need, tries, last)
		}
		reserve := s.windowSpanBytes(w, lo, hi)
		if err := b.c.gate.acquire(ctx, ticket, b.c.opts.PrefetchConcurrency, b.c.prefetchBudget, reserve); err != nil {
			return err
		}
		sp, call := s.claim(need, lo, hi, w+1)
		var n int64
		var err error
		if sp != nil {
			n = sp.bytes(s)
			b.c.gate.addBytes(n - reserve)
			reserve = n
			err = b.run(ctx, sp, fillPrefetch)
		}
		// Out of the waiting line while awaiting another's fetch, so
		// that fetch (a demand read's, maybe hung) holds back no other
		// Prefetch; back in, under the same ticket, at the next acquire.
		b.c.gate.release(reserve)
		if err != nil {
			return err
		}
		if call == nil {
			continue
		}
		if err := b.await(ctx, call); err != nil {
			if ctx.Err() != nil {
				return err
			}
			last = err
		}
	}
}

// windowSpanBytes is the most a prefetch claim of window w within
// [lo, hi) can fetch: the bytes of those of its blocks.
func (s *blobState) windowSpanBytes(w, lo, hi int64) int64 {
	first, end := s.windowBlocks(w)
	first, end = max(first, lo), min(end, hi)
	if first >= end {
		return 0
	}
	return min(end*s.bs, s.size) - first*s.bs
}

// Expect tells the cache that a replay plan will prefetch [off, off+n):
// a demand fetch of those blocks then counts as the prefetch running
// behind the reader (Stats.DemandPlannedBytes), any other as a read the
// plan does not know (Stats.DemandUnplannedBytes). It fetches nothing.
// From the first Expect until EndExpect the blob is in a trace replay:
// the cache's sequential readahead pauses and misses fetch only their own
// blocks, since the trace brings what the start-up reads next.
func (b *Blob) Expect(off, n int64) {
	s := b.s
	if s.planning.CompareAndSwap(false, true) {
		b.c.tracing.Add(1)
	}
	if off < 0 || n <= 0 || off >= s.size {
		return
	}
	end := min(off+min(n, s.size-off), s.size)
	var unused atomic.Int64 // the planned bytes not fetched yet are not kept
	for i := off / s.bs; i <= (end-1)/s.bs; i++ {
		s.planned.mark(i, s.blockLen(i), &s.c.stats.planned, &unused)
	}
}

// EndExpect ends the trace replay Expect began: readahead resumes and the
// plan's marks are dropped, so a later demand fetch of a block the plan
// never got counts as unplanned. The blob's misses go on fetching only
// their own blocks, not whole refill windows (see ReadAtContext). Replays
// of one blob that overlap share its marks: the first to end drops them.
func (b *Blob) EndExpect() {
	s := b.s
	if !s.planning.CompareAndSwap(true, false) {
		return
	}
	b.c.tracing.Add(-1)
	s.replayed.Store(true)
	for k := range s.planned {
		s.planned[k].Store(0)
	}
}

// firstMissing returns the first block of window w within [lo, hi) that is
// not cached, or -1.
func (s *blobState) firstMissing(w, lo, hi int64) int64 {
	first, end := s.windowBlocks(w)
	for i := max(first, lo); i < min(end, hi); i++ {
		if !s.has(i) {
			return i
		}
	}
	return -1
}

// prefetchGate admits prefetch fetches: at most limit at once and, on a
// slow source, while fewer bytes than about prefetchHorizon of data are in
// flight (a link of 25 Mbit/s and 40 ms round trips needs several small
// fetches in flight to stay busy: each spends a round trip before its
// first byte); while a demand fetch is in flight, only
// prefetchBesideDemand, since every prefetch byte on the link delays a
// miss that shares it (none at all starves the replay: a start-up that
// misses keeps one demand fetch in flight much of the time, and alone it
// leaves the link idle for a round trip per fetch).
//
// Waiters are admitted in the order their Prefetch calls began (ticket
// order), not at random: a replayer's workers call Prefetch in the trace's
// first-access order, and the start-up needs the earliest ranges first.
type prefetchGate struct {
	mu      sync.Mutex
	demand  int             // demand fetches in flight
	running int             // prefetch fetches in flight
	bytes   int64           // their bytes
	next    uint64          // the next Prefetch call's ticket
	waiting map[uint64]bool // tickets of calls not fetching or awaiting a fetch
	changed chan struct{}   // closed (and replaced) when a count drops
}

func newPrefetchGate() prefetchGate {
	return prefetchGate{waiting: make(map[uint64]bool), changed: make(chan struct{})}
}

// enter registers a Prefetch call and returns its ticket; leave ends it.
func (g *prefetchGate) enter() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.next++
	g.waiting[g.next] = true
	return g.next
}

func (g *prefetchGate) leave(ticket uint64) {
	g.mu.Lock()
	delete(g.waiting, ticket)
	g.wake()
	g.mu.Unlock()
}

// acquire waits until ticket is the oldest call waiting, fewer than limit
// prefetch fetches are in flight (fewer than prefetchBesideDemand while a
// demand fetch is) and fewer bytes than budget() (0: no bound), and takes
// a place with reserve bytes, the most its fetch can claim (addBytes
// corrects them once it has), so the budget is passed by one fetch at
// most: the next waiter sees them before it is woken.
func (g *prefetchGate) acquire(ctx context.Context, ticket uint64, limit int, budget func() int64, reserve int64) error {
	g.mu.Lock()
	g.waiting[ticket] = true
	g.mu.Unlock()
	for {
		g.mu.Lock()
		n := limit
		if g.demand > 0 {
			n = min(n, prefetchBesideDemand)
		}
		room := g.bytes < budget() || budget() == 0
		if g.running < n && room && g.oldest() == ticket {
			g.running++
			g.bytes += reserve
			delete(g.waiting, ticket)
			g.wake() // the next oldest may go too
			g.mu.Unlock()
			return nil
		}
		ch := g.changed
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// addBytes counts n more bytes of an admitted fetch as in flight (n < 0:
// fewer).
func (g *prefetchGate) addBytes(n int64) {
	g.mu.Lock()
	g.bytes += n
	g.mu.Unlock()
}

// oldest is the smallest ticket waiting. Caller holds mu.
func (g *prefetchGate) oldest() uint64 {
	first := true
	var m uint64
	for t := range g.waiting {
		if first || t < m {
			m, first = t, false
		}
	}
	return m
}

// release gives back a place and the n bytes its fetch counted. The call
// is not waiting until its next acquire: it may be awaiting another's
// fetch, and must not hold back the Prefetch calls behind it meanwhile.
func (g *prefetchGate) release(n int64) {
	g.mu.Lock()
	g.running--
	g.bytes -= n
	g.wake()
	g.mu.Unlock()
}

func (g *prefetchGate) demandStart() {
	g.mu.Lock()
	g.demand++
	g.mu.Unlock()
}

func (g *prefetchGate) demandEnd() {
	g.mu.Lock()
	g.demand--
	g.wake()
	g.mu.Unlock()
}

// wake tells every waiter to look again. Caller holds mu.
func (g *prefetchGate) wake() {
	close(g.changed)
	g.changed = make(chan struct{})
}

// prefetchHorizon bounds the prefetch bytes in flight to what single
// fetches move in this time. A quarter of a second (what the readahead
// keeps) left a 25 Mbit/s link idle a fifth of a replay, the prefetch
// behind the start-up it was for; a second keeps it busy, and a miss
// still shares the link with only the fetches under way when it began.
const prefetchHorizon = time.Second

// prefetchBesideDemand is how many prefetch fetches start while a demand
// fetch is in flight: one keeps the link busy through the miss's round
// trip and takes half the link from it at most.
const prefetchBesideDemand = 1

// prefetchBudget is the prefetch bytes that may be in flight: about
// prefetchHorizon of data at the rate single fetches achieve, at least a
// refill window; 0 (no bound) until a rate is known.
func (c *Cache) prefetchBudget() int64 {
	bps := c.rate.bytesPerSecond()
	if bps <= 0 {
		return 0
	}
	return max(c.opts.RefillSize, int64(float64(bps)*prefetchHorizon.Seconds()))
}
