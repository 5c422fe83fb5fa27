package blobcache

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"
)

// fillCall is one fetch of a window in flight; readers that miss in the same
// window wait on it instead of fetching again.
type fillCall struct {
	done chan struct{}
	err  error
}

// fillKind says who asked for a fill: a read waiting for it, the
// replayer's Prefetch, or the cache's own sequential readahead.
type fillKind int

const (
	fillDemand fillKind = iota
	fillPrefetch
	fillReadahead
)

// fill fetches the missing blocks of window w, or waits for the fetch already
// in flight for it.
func (b *Blob) fill(ctx context.Context, w int64, kind fillKind) error {
	s := b.s
	s.mu.Lock()
	if call := s.inflight[w]; call != nil {
		s.mu.Unlock()
		b.c.stats.coalesced.Add(1)
		select {
		case <-call.done:
			return call.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	first, end := s.windowBlocks(w)
	missing := make([]bool, end-first)
	anyMissing := false
	for i := first; i < end; i++ {
		missing[i-first] = !s.has(i)
		anyMissing = anyMissing || missing[i-first]
	}
	if !anyMissing {
		s.mu.Unlock()
		return nil
	}
	call := &fillCall{done: make(chan struct{})}
	s.inflight[w] = call
	s.mu.Unlock()

	start := time.Now()
	call.err = b.fetchWindow(ctx, first, missing)
	if kind == fillDemand {
		b.c.observeDemandFetch(time.Since(start))
	}
	s.mu.Lock()
	delete(s.inflight, w)
	s.mu.Unlock()
	close(call.done)
	if call.err != nil {
		b.c.stats.fetchErrors.Add(1)
		return call.err
	}
	if kind == fillPrefetch {
		for k, m := range missing {
			if m {
				s.markPrefetched(first + int64(k))
			}
		}
	}
	s.touch(w)
	if s.cached.Load() == s.size && !s.complete.Load() {
		b.c.verifyInBackground(s)
	}
	b.c.evict()
	return nil
}

// fetchWindow fetches the span of the missing blocks (which start at block
// first), writes them, makes them durable and only then records them.
func (b *Blob) fetchWindow(ctx context.Context, first int64, missing []bool) error {
	s := b.s
	lo, hi := 0, len(missing)
	for !missing[lo] {
		lo++
	}
	for !missing[hi-1] {
		hi--
	}
	off := (first + int64(lo)) * s.bs
	end := min((first+int64(hi))*s.bs, s.size)
	bufp := b.c.getRefill()
	defer b.c.putRefill(bufp)
	buf := (*bufp)[:end-off]
	if err := b.f.FetchRange(ctx, s.dgst, off, buf); err != nil {
		return fmt.Errorf("%w: %s [%d, %d): %w", ErrFetch, s.dgst, off, end, err)
	}
	b.c.stats.fetches.Add(1)
	b.c.stats.fetched.Add(int64(len(buf)))
	s.stats.fetched.Add(int64(len(buf)))
	// Write only the blocks that were missing: a present block may be being
	// read right now, and rewriting it gains nothing.
	for _, run := range runs(missing[lo:hi]) {
		a, z := int64(run[0])*s.bs, min(int64(run[1])*s.bs, int64(len(buf)))
		if _, err := s.data.WriteAt(buf[a:z], off+a); err != nil {
			return fmt.Errorf("blobcache: write %s at %d: %w", s.dgst, off+a, err)
		}
	}
	if err := s.publish(first+int64(lo), missing[lo:hi], buf); err != nil {
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
			return fmt.Errorf("blobcache: record %s checksums: %w", s.dgst, err)
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
