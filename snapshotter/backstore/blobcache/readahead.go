package blobcache

import (
	"sync"
	"sync/atomic"
	"time"
)

// Sequential readahead.
//
// A registry answers a range request in a few milliseconds however small it
// is (5-6 ms for Debian's docker-registry on the loopback), so a reader that
// fetches one 256 KiB refill window at a time is bound to some 40 MB/s while
// one GET of the whole blob runs at hundreds. More small GETs in parallel do
// not help there; larger ones do. So, like the kernel's page-cache
// readahead, the cache watches for sequential readers and fetches ahead of
// them in spans that double up to Options.Readahead.
//
// Detection follows ZFS's zfetch: a blob tracks a few streams, each the
// position of one sequential reader. A request that misses and starts where
// a stream stands — at most one request length behind it (FUSE and the
// kernel's own readahead reorder a stream's requests a little), or inside
// or just past the windows the stream has brought in — continues it; any
// other missing request starts a new stream in place of the least recently
// used one. The third request of a stream starts the readahead: a span
// after the windows its request fetched, filled in the background, whose
// first block carries the stream's mark. A request touching a mark, hit or
// miss, starts the next span, twice as large, and the mark moves to it, so
// a steady reader has one span in flight beyond the one it is reading.
// Once a stream has read Options.Readahead bytes (16 MiB) it keeps two:
// with one, the reader waits for a span to arrive whole, spends a while
// reading it (FUSE, decompression), and only then starts the next, which
// reaches a link a round trip later, so the link idles between spans (a
// quarter of the time through 1 Gbit/s with 20 ms round trips). Shorter
// streams keep one, as most of a container's start-up reads are: a second
// span is what a stream that stops never reads, and on a slow link it
// held the numpy start-up without a trace back by half a second. Random
// readers rarely continue a stream twice in a row and fetch only the
// windows their requests cover.

// maxStreams bounds the sequential readers tracked per blob.
const maxStreams = 4

// seqToReadahead is how many requests must continue a stream before it
// reads ahead.
const seqToReadahead = 2

// stream is one sequential reader as the readahead sees it (byte offsets).
type stream struct {
	start int64 // where its first request started
	next  int64 // end of the last request seen
	hi    int64 // end of the windows fetched or in flight for it
	ra    int64 // size of its last readahead span; 0 before the first
	// ahead holds the first blocks of the spans started beyond the one
	// the reader is in, oldest first (nAhead of them); the mark is on
	// ahead[0].
	ahead  [spansAhead]int64
	nAhead int
	seq    int    // requests that continued it
	stamp  uint64 // last use, for replacement
}

// streams is a blob's readahead state. marks are read on every request
// without the lock.
type streams struct {
	mu    sync.Mutex
	s     [maxStreams]stream
	clock uint64
	marks [maxStreams]atomic.Int64 // block starting stream k's next span; -1: none
}

func (st *streams) init() {
	for k := range st.marks {
		st.marks[k].Store(-1)
	}
}

// match returns the stream that request [off, end) continues, or -1.
// Caller holds mu.
func (st *streams) match(off, end, bs int64) int {
	back := max(end-off, bs)
	for k := range st.s {
		s := &st.s[k]
		if s.stamp != 0 && off >= s.next-back && off <= max(s.next, s.hi)+bs {
			return k
		}
	}
	return -1
}

// victim returns the least recently used stream slot. Caller holds mu.
func (st *streams) victim() int {
	v := 0
	for k := range st.s {
		if st.s[k].stamp < st.s[v].stamp {
			v = k
		}
	}
	return v
}

// grow returns the next readahead span of a stream whose last span was ra,
// for a request of n bytes: four times the request at first, then doubling,
// in whole windows, at most max.
func grow(ra, n, window, maxRA int64) int64 {
	if ra == 0 {
		ra = max(4*n, 2*window)
	} else {
		ra *= 2
	}
	ra = (ra + window - 1) / window * window
	return min(ra, maxRA)
}

// onMiss updates the streams for request [off, end), which misses, and
// starts a readahead span when the request continues an established
// stream that has nothing in flight beyond it.
func (b *Blob) onMiss(off, end int64) {
	s, st := b.s, &b.s.streams
	win := b.c.opts.RefillSize
	st.mu.Lock()
	defer st.mu.Unlock()
	st.clock++
	k := st.match(off, end, s.bs)
	if k < 0 {
		k = st.victim()
		st.s[k] = stream{start: off, next: end, hi: s.windowEnd(end), stamp: st.clock}
		st.marks[k].Store(-1)
		return
	}
	cur := &st.s[k]
	cur.stamp = st.clock
	cur.seq++
	cur.next = max(cur.next, end)
	cur.hi = max(cur.hi, s.windowEnd(end))
	if cur.seq < seqToReadahead || cur.hi > s.windowEnd(end) || b.c.tracing.Load() > 0 {
		// Not established yet, or its readahead is still ahead of this
		// request (the mark there starts the next span), or a trace
		// replay is fetching what the reader will need.
		return
	}
	cur.nAhead = 0
	cur.ra = grow(cur.ra, end-off, win, b.c.maxReadahead())
	b.launch(cur)
	b.setMark(k, cur)
}

// onMark is called for a request [off, end) that touched stream k's mark m:
// the reader has reached the span read ahead last, so the next one starts.
func (b *Blob) onMark(k int, m, off, end int64) {
	st := &b.s.streams
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.marks[k].CompareAndSwap(m, -1) {
		return // another request got there first
	}
	if b.c.tracing.Load() > 0 {
		return // a replay is under way; the next miss restarts the stream
	}
	st.clock++
	cur := &st.s[k]
	cur.stamp = st.clock
	cur.seq++
	cur.next = max(cur.next, end)
	if cur.nAhead > 0 { // the span touched is no longer ahead
		cur.nAhead--
		copy(cur.ahead[:], cur.ahead[1:])
	}
	want := 1
	if cur.next-cur.start >= b.c.opts.Readahead {
		want = spansAhead
	}
	for cur.nAhead < want {
		cur.ra = grow(cur.ra, end-off, b.c.opts.RefillSize, b.c.maxReadahead())
		if !b.launch(cur) {
			break
		}
	}
	b.setMark(k, cur)
}

// spansAhead is how many readahead spans a long stream keeps started
// beyond the one its reader is in.
const spansAhead = 2

// setMark puts stream k's mark on the first span ahead of its reader, or
// clears it. Caller holds streams.mu.
func (b *Blob) setMark(k int, cur *stream) {
	m := int64(-1)
	if cur.nAhead > 0 {
		m = cur.ahead[0]
	}
	b.s.streams.marks[k].Store(m)
}

// launch starts the stream's next readahead span, cur.ra bytes from
// cur.hi, and adds it to cur.ahead; it reports false, starting nothing,
// at the blob's end or with spansAhead spans ahead already. Caller holds
// streams.mu.
func (b *Blob) launch(cur *stream) bool {
	s := b.s
	w0 := cur.hi / b.c.opts.RefillSize // hi is a window boundary or the end
	if cur.hi >= s.size || cur.ra == 0 || cur.nAhead == spansAhead {
		return false
	}
	w1 := min(w0+cur.ra/b.c.opts.RefillSize, s.nwin)
	cur.hi = min(w1*b.c.opts.RefillSize, s.size)
	cur.ahead[cur.nAhead] = w0 * s.bpw
	cur.nAhead++
	// Claim the span's first windows now: the reader may be about to miss
	// in them, and should wait for this fetch rather than start its own.
	sp, _ := s.claim(w0*s.bpw, w0*s.bpw, s.nblocks, w1)
	ok := b.c.inBackground(func() {
		w := w0 + 1
		if sp != nil {
			if b.run(b.c.bgCtx, sp, fillReadahead) != nil {
				return // a reader that needs the bytes fetches them itself
			}
			w = sp.wEnd
		}
		for w < w1 {
			next, err := b.fill(b.c.bgCtx, w*s.bpw, fillRange{lo: 0, hi: s.nblocks, w1: w1}, fillReadahead)
			if err != nil {
				return
			}
			w = next
		}
	})
	if !ok && sp != nil {
		s.release(sp, ErrClosed)
	}
	return true
}

// checkMarks starts the next readahead span of every stream whose mark
// lies in blocks [first, last] of request [off, end).
func (b *Blob) checkMarks(first, last, off, end int64) {
	st := &b.s.streams
	for k := range st.marks {
		if m := st.marks[k].Load(); m >= first && m <= last {
			b.onMark(k, m, off, end)
		}
	}
}

// windowEnd is the end of the window holding byte end-1.
func (s *blobState) windowEnd(end int64) int64 {
	w := s.c.opts.RefillSize
	return min((end+w-1)/w*w, s.size)
}

// readaheadHorizon is how far ahead, in time at the rate single fetches
// achieve, a readahead span reaches. Readahead exists to amortise a
// request's latency; on a slow link (25 Mbit/s: a 16 MiB span is 5 s of
// it) a long span only holds the link from the reader's next miss and
// fetches what it may never read. 250 ms keeps spans at 16 MiB on a local
// registry (hundreds of MB/s) and near 512 KiB on 25 Mbit/s.
const readaheadHorizon = 250 * time.Millisecond

// maxReadahead is the largest readahead span: Options.Readahead, lowered
// so that the three spans a stream holds (the one read and two ahead) stay
// within a quarter of MaxBytes, and to what the source delivers in
// readaheadHorizon (at least one window).
func (c *Cache) maxReadahead() int64 {
	ra := c.opts.Readahead
	if c.opts.MaxBytes > 0 {
		ra = min(ra, max(c.opts.RefillSize, c.opts.MaxBytes/12/c.opts.RefillSize*c.opts.RefillSize))
	}
	if bps := c.rate.bytesPerSecond(); bps > 0 && ra > 0 {
		ra = min(ra, max(c.opts.RefillSize, int64(float64(bps)*readaheadHorizon.Seconds())/c.opts.RefillSize*c.opts.RefillSize))
	}
	return ra
}

// readaheadOn reports whether sequential readers get readahead at all.
func (c *Cache) readaheadOn() bool { return c.opts.Readahead > 0 }

// rateEstimate is a moving average of the rate single fetches achieve
// (bytes over the time from request to last byte, so a request's latency
// counts against it, and fetches sharing a link each see their share).
type rateEstimate struct{ bps atomic.Int64 }

// observe adds a fetch of n bytes that took d. Fetches under a window
// say more about latency than bandwidth and are left out.
func (r *rateEstimate) observe(n int64, d time.Duration) {
	if d <= 0 || n < minRateSample {
		return
	}
	sample := int64(float64(n) / d.Seconds())
	for {
		old := r.bps.Load()
		next := sample
		if old > 0 {
			next = old + (sample-old)/4
		}
		if r.bps.CompareAndSwap(old, next) {
			return
		}
	}
}

// minRateSample is the smallest fetch the rate estimate learns from.
const minRateSample = 64 << 10

func (r *rateEstimate) bytesPerSecond() int64 { return r.bps.Load() }

// markAhead flags block i as read ahead and not yet read.
func (s *blobState) markAhead(i int64) {
	s.ahead.mark(i, s.blockLen(i), &s.c.stats.readahead, &s.c.stats.readaheadUnused)
}

// unmarkAhead clears block i's readahead flag and reports whether it was
// set.
func (s *blobState) unmarkAhead(i int64) bool {
	return s.ahead.unmark(i, s.blockLen(i), &s.c.stats.readaheadUnused)
}

// blockFlags flags blocks fetched ahead of any read (by Prefetch or the
// readahead) that no read has taken yet. Safe for concurrent use.
type blockFlags []atomic.Uint64

func newBlockFlags(n int64) blockFlags { return make(blockFlags, (n+63)/64) }

// mark flags block i, of n bytes; if it was not flagged, n is added to the
// bytes fetched ahead (total) and to those not read yet (unused).
func (f blockFlags) mark(i, n int64, total, unused *atomic.Int64) {
	bit := uint64(1) << (i % 64)
	if f[i/64].Or(bit)&bit == 0 {
		total.Add(n)
		unused.Add(n)
	}
}

// clear clears block i's flag.
func (f blockFlags) clear(i int64) {
	bit := uint64(1) << (i % 64)
	if f[i/64].Load()&bit != 0 { // the common case, without a write to a shared word
		f[i/64].And(^bit)
	}
}

// has reports whether block i is flagged.
func (f blockFlags) has(i int64) bool { return f[i/64].Load()&(1<<(i%64)) != 0 }

// unmark clears block i's flag and reports whether it was set (then its n
// bytes leave unused).
func (f blockFlags) unmark(i, n int64, unused *atomic.Int64) bool {
	bit := uint64(1) << (i % 64)
	if f[i/64].Load()&bit == 0 {
		return false // the common case, without a write to a shared word
	}
	if f[i/64].And(^bit)&bit == 0 {
		return false
	}
	unused.Add(-n)
	return true
}
