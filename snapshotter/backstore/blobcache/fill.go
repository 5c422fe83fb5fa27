package blobcache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// fillCall is one fetch in flight, registered under every window it
// covers; readers that miss in one of them wait on it instead of fetching
// again.
type fillCall struct {
	done chan struct{}
	err  error
	kind fillKind // who led it; set before done closes
}

// fillKind says who asked for a fill: a read waiting for it, the
// replayer's Prefetch, or the cache's own sequential readahead.
type fillKind int

const (
	fillDemand fillKind = iota
	fillPrefetch
	fillReadahead
)

// span is a run of windows [w, wEnd) with blocks claimed for one fetch
// (claimed[k] is block first+k).
type span struct {
	w, wEnd int64
	first   int64
	missing []bool
	call    *fillCall
}

// claim registers a fetch of the blocks in [lo, hi) of the windows from
// need's that are missing and not in flight, up to window w1 and the
// largest fetch; it stops at a later window with a block in flight or none
// missing. If block need is in flight it returns that fetch to wait for
// instead; if the first window has nothing to fetch, neither. In-flight
// state is per block, so a prefetch of a window's first block does not make
// a demand read of its last one wait.
func (s *blobState) claim(need, lo, hi, w1 int64) (sp *span, wait *fillCall) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if call := s.inflight[need]; call != nil {
		return nil, call
	}
	w := s.window(need)
	first, _ := s.windowBlocks(w)
	first = max(first, lo)
	var missing []bool
	wEnd := w
	for maxWin := s.c.maxSpan() / s.c.opts.RefillSize; wEnd < min(w1, w+maxWin); wEnd++ {
		a, z := s.windowBlocks(wEnd)
		a, z = max(a, lo), min(z, hi)
		want, busy := false, false
		for i := a; i < z; i++ {
			if s.inflight[i] != nil {
				busy = true
			} else if !s.has(i) {
				want = true
			}
		}
		if !want || (busy && wEnd > w) {
			break
		}
		for i := first + int64(len(missing)); i < z; i++ {
			missing = append(missing, !s.has(i) && s.inflight[i] == nil)
		}
	}
	if wEnd == w {
		return nil, nil
	}
	sp = &span{w: w, wEnd: wEnd, first: first, missing: missing, call: &fillCall{done: make(chan struct{})}}
	for k, m := range missing {
		if m {
			s.inflight[first+int64(k)] = sp.call
		}
	}
	return sp, nil
}

// bytes is the span's size on the link: from its first missing block to
// its last.
func (sp *span) bytes(s *blobState) int64 {
	lo, hi := missingBounds(sp.missing)
	if lo == hi {
		return 0
	}
	return min((sp.first+int64(hi))*s.bs, s.size) - (sp.first+int64(lo))*s.bs
}

// missingBounds returns the index range [lo, hi) from the first missing
// block to the last (lo == hi when none is).
func missingBounds(missing []bool) (lo, hi int) {
	lo, hi = 0, len(missing)
	for lo < hi && !missing[lo] {
		lo++
	}
	for hi > lo && !missing[hi-1] {
		hi--
	}
	return lo, hi
}

// fillRange is what a fill may fetch: the blocks in [lo, hi) of the
// windows before w1.
type fillRange struct{ lo, hi, w1 int64 }

// fill fetches, with one request, the missing blocks of want from need's
// window on — stopping early at a window that is cached or being fetched,
// or at the largest fetch — or waits for the fetch in flight for block
// need. It returns the window after the last one it dealt with. Readahead
// does not wait for a fetch in flight: whoever started it will finish it.
func (b *Blob) fill(ctx context.Context, need int64, want fillRange, kind fillKind) (int64, error) {
	w := b.s.window(need)
	for retried := false; ; retried = true {
		sp, call := b.s.claim(need, want.lo, want.hi, want.w1)
		switch {
		case sp != nil:
			return sp.wEnd, b.run(ctx, sp, kind)
		case call == nil || kind == fillReadahead:
			return w + 1, nil
		}
		err := b.await(ctx, call)
		// A readahead or prefetch that failed was not this reader's
		// request: it tries once itself, and reports its own error;
		// unless the cache could not store what it fetched, which would
		// fail the same way.
		if err == nil || retried || kind != fillDemand || call.kind == fillDemand || ctx.Err() != nil || errors.Is(err, ErrStorage) {
			return w + 1, err
		}
	}
}

// await waits for a fetch another reader started.
func (b *Blob) await(ctx context.Context, call *fillCall) error {
	b.c.stats.coalesced.Add(1)
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run fetches a claimed span and then releases its windows, once the mark
// flush and any digest check are under way, so a reader that waited for
// the fill finds them started (and Close waits for them).
func (b *Blob) run(ctx context.Context, sp *span, kind fillKind) error {
	s := b.s
	sp.call.kind = kind
	start := time.Now()
	if kind == fillDemand {
		b.c.gate.demandStart()
	}
	err := b.fetchSpan(ctx, sp.first, sp.missing)
	if kind == fillDemand {
		b.c.gate.demandEnd()
		b.c.observeDemandFetch(time.Since(start))
	}
	if err == nil {
		if kind == fillDemand {
			s.countDemand(sp)
		}
		for k, m := range sp.missing {
			if m {
				// Fetched: a later demand fetch of it (after eviction)
				// is no longer the plan's prefetch running behind.
				s.planned.clear(sp.first + int64(k))
			}
			switch i := sp.first + int64(k); {
			case !m:
			case kind == fillPrefetch:
				s.markPrefetched(i)
			case kind == fillReadahead:
				s.markAhead(i)
			}
		}
		for k := sp.w; k < sp.wEnd; k++ {
			s.touch(k)
		}
		if s.cached.Load() == s.size && !s.complete.Load() {
			b.c.verifyInBackground(s)
		}
	}
	s.release(sp, err)
	if err != nil {
		if !errors.Is(err, ErrStorage) {
			b.c.stats.fetchErrors.Add(1)
		}
		return err
	}
	b.c.evict()
	return nil
}

// countDemand splits a demand fetch's bytes into those a replay plan held
// and the rest.
func (s *blobState) countDemand(sp *span) {
	var planned, other int64
	for k, m := range sp.missing {
		i := sp.first + int64(k)
		switch {
		case !m:
		case s.planned.has(i):
			planned += s.blockLen(i)
		default:
			other += s.blockLen(i)
		}
	}
	s.c.stats.demandPlanned.Add(planned)
	s.c.stats.demandOther.Add(other)
	if planned > 0 {
		s.c.stats.demandPlannedFetches.Add(1)
	}
}

// release unregisters a span's fetch and wakes its waiters with err.
func (s *blobState) release(sp *span, err error) {
	s.mu.Lock()
	for k, m := range sp.missing {
		if m {
			delete(s.inflight, sp.first+int64(k))
		}
	}
	s.mu.Unlock()
	sp.call.err = err
	close(sp.call.done)
}

// fetchSpan fetches the span of the missing blocks (which start at block
// first) in one request, writes them, and publishes them; the flusher
// makes them durable and only then records them on disk.
func (b *Blob) fetchSpan(ctx context.Context, first int64, missing []bool) error {
	s := b.s
	lo, hi := missingBounds(missing)
	off := (first + int64(lo)) * s.bs
	end := min((first+int64(hi))*s.bs, s.size)
	bufp := b.c.getSpan(end - off)
	defer b.c.putSpan(bufp)
	buf := (*bufp)[:end-off]
	start := time.Now()
	if err := b.f.FetchRange(ctx, s.dgst, off, buf); err != nil {
		return fmt.Errorf("%w: %s [%d, %d): %w", ErrFetch, s.dgst, off, end, err)
	}
	b.c.rate.observe(int64(len(buf)), time.Since(start))
	b.c.stats.fetches.Add(1)
	b.c.stats.fetched.Add(int64(len(buf)))
	s.stats.fetched.Add(int64(len(buf)))
	// Write only the blocks that were missing: a present block may be being
	// read right now, and rewriting it gains nothing.
	for _, run := range runs(missing[lo:hi]) {
		a, z := int64(run[0])*s.bs, min(int64(run[1])*s.bs, int64(len(buf)))
		if _, err := s.data.WriteAt(buf[a:z], off+a); err != nil {
			b.c.storageFailed()
			return fmt.Errorf("%w: write %s at %d: %w", ErrStorage, s.dgst, off+a, err)
		}
	}
	if err := s.publish(first+int64(lo), missing[lo:hi], buf); err != nil {
		b.c.storageFailed()
		return err
	}
	s.c.startFlush(s)
	return nil
}

// publish makes the blocks just written (those flagged in missing, starting
// at block first, whose bytes are in buf) readable: their page CRCs go to
// memory and to the meta file, their presence bits are set, and they are
// queued for the flusher, which writes their on-disk marks once the data is
// durable. Readers need no fsync: they read the page cache, and the CRCs
// check whatever they read.
func (s *blobState) publish(first int64, missing []bool, buf []byte) error {
	base := first * s.bs // buf starts here
	crcs := make([]byte, (int64(len(buf))+pageSize-1)/pageSize*4)
	for k, m := range missing {
		for a := int64(k) * s.bs; m && a < min(int64(k+1)*s.bs, int64(len(buf))); a += pageSize {
			binary.LittleEndian.PutUint32(crcs[a/pageSize*4:], blockCRC(buf[a:min(a+pageSize, int64(len(buf)))]))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, run := range runs(missing) {
		c0, c1 := int64(run[0])*s.bs/pageSize*4, min(int64(run[1])*s.bs/pageSize*4, int64(len(crcs)))
		if _, err := s.meta.WriteAt(crcs[c0:c1], s.layout.crcs+base/pageSize*4+c0); err != nil {
			return fmt.Errorf("%w: record %s checksums: %w", ErrStorage, s.dgst, err)
		}
	}
	var added int64
	for k, m := range missing {
		i := first + int64(k)
		if !m || s.has(i) {
			continue
		}
		for a := int64(k) * s.bs; a < min(int64(k+1)*s.bs, int64(len(buf))); a += pageSize {
			s.crcs[(base+a)/pageSize].Store(binary.LittleEndian.Uint32(crcs[a/pageSize*4:]))
		}
		s.present[i/64].Or(1 << (i % 64))
		s.pending = append(s.pending, i)
		added += s.blockLen(i)
	}
	s.cached.Add(added)
	s.c.used.Add(added)
	return nil
}

// runs returns the [start, end) index ranges of the true stretches of m.
func runs(m []bool) [][2]int {
	var out [][2]int
	for i := 0; i < len(m); {
		if !m[i] {
			i++
			continue
		}
		j := i
		for j < len(m) && m[j] {
			j++
		}
		out = append(out, [2]int{i, j})
		i = j
	}
	return out
}
