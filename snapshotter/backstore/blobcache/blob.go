package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"
)

// maxBlockAttempts bounds how often one read refetches a block that keeps
// failing its CRC before giving up.
const maxBlockAttempts = 4

// maxEvictedRetries bounds how often one read may lose a block to eviction
// between filling and reading it.
const maxEvictedRetries = 16

// readResult is the outcome of reading a block from disk.
type readResult int

const (
	readOK      readResult = iota
	readEvicted            // the block was dropped meanwhile
	readCorrupt            // the bytes failed the CRC; the block was dropped
)

// Blob reads one cached blob. It implements io.ReaderAt and is safe for
// concurrent use.
type Blob struct {
	c *Cache
	s *blobState
	f Fetcher
}

// Digest is the blob's digest.
func (b *Blob) Digest() digest.Digest { return b.s.dgst }

// Size is the blob's length in bytes.
func (b *Blob) Size() int64 { return b.s.size }

// Complete reports whether every block is cached and the blob has passed its
// digest check.
func (b *Blob) Complete() bool { return b.s.complete.Load() }

// ReadAt implements io.ReaderAt with no deadline; prefer ReadAtContext.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(context.Background(), p, off)
}

// FetchExactly makes the blob's misses fetch only the blocks they read,
// without their refill windows or readahead, until the function it returns
// is called (calls nest: an image may list one blob twice). It is for reads
// whose neighbours are known to be of no use, as the header and indexes an
// image reads when it is opened (on the cold-start benchmark's images,
// 12-24 KiB of a blob's first 256 KiB window were in the start-up's trace,
// and the rest crossed a slow link before any prefetch could start).
func (b *Blob) FetchExactly() (end func()) {
	b.s.exact.Add(1)
	var once sync.Once
	return func() { once.Do(func() { b.s.exact.Add(-1) }) }
}

// ReadAtContext reads len(p) bytes at off, from disk where cached and through
// the fetcher otherwise, with io.ReaderAt's contract: a read reaching the
// blob's end returns the bytes up to it and io.EOF.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	s := b.s
	if off < 0 {
		return 0, fmt.Errorf("%w: %s: negative offset %d", ErrInvalidBlob, s.dgst, off)
	}
	if b.c.closed.Load() {
		return 0, ErrClosed
	}
	if off >= s.size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), s.size)
	n := 0
	defer func() {
		b.c.stats.served.Add(int64(n))
		s.stats.served.Add(int64(n))
	}()
	// A miss fetches, in one request, the windows from its own up to the
	// one holding the read's last byte (minus those cached or in flight);
	// while a replay is under way, only the read's own blocks: the trace
	// brings what the start-up reads next, and the rest of a window would
	// be bytes on the link ahead of it. Also once this blob's replay is
	// over: a miss then is a read the trace did not see (a recording
	// never sees quite the same requests twice), usually small and
	// isolated, and a window each cost the numpy start-up 15 windows of
	// 256 KiB at 25 Mbit/s in its last 2.5 s once the prefetch had run
	// ahead of it. Sequential readers still get the readahead.
	want := fillRange{lo: 0, hi: s.nblocks, w1: s.window((end-1)/s.bs) + 1}
	exact := s.exact.Load() > 0
	if b.c.tracing.Load() > 0 || s.replayed.Load() || exact {
		want.lo, want.hi = off/s.bs, (end-1)/s.bs+1
	}
	sequential := b.c.readaheadOn() && !s.complete.Load() && !exact && !b.c.storageDown()
	if sequential {
		b.checkMarks(off/s.bs, (end-1)/s.bs, off, end)
	}
	for pos := off; pos < end; {
		if took := b.readCachedRun(p[pos-off:end-off], pos); took > 0 {
			pos += took
			n += int(took)
			continue
		}
		i := pos / s.bs
		bstart := i * s.bs
		take := min(end, bstart+s.blockLen(i)) - pos
		if sequential && !s.has(i) {
			sequential = false // once per read
			b.onMiss(off, end)
		}
		err := errStorageDown
		if s.complete.Load() || s.has(i) || !b.c.storageDown() {
			err = b.readBlock(ctx, i, p[pos-off:pos-off+take], pos-bstart, want)
		}
		if errors.Is(err, ErrStorage) && ctx.Err() == nil {
			// The cache cannot store or read the block: the rest of the
			// read comes straight from the source, in one request.
			err = b.readThrough(ctx, p[pos-off:end-off], pos)
			take = end - pos
		}
		if err != nil {
			return n, err
		}
		pos += take
		n += int(take)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readCachedRun reads dst, the blob's bytes from pos on, as far as a run
// of cached blocks reaches, with one read of the data file and one CRC
// check a page, and returns how many bytes it took. It takes none (and
// the caller reads block by block, which refetches what is missing or
// corrupt) when pos is not on a page boundary, block pos/bs is not cached,
// or a page fails its check. One read per run instead of one per block:
// a 1 MiB read of 16 KiB blocks made 64 reads, and the per-block path
// halved warm throughput with 4 KiB blocks.
func (b *Blob) readCachedRun(dst []byte, pos int64) int64 {
	s := b.s
	if pos%pageSize != 0 {
		return 0
	}
	end := pos + int64(len(dst))
	complete := s.complete.Load()
	first := pos / s.bs
	last := first // the run is blocks [first, last)
	for last*s.bs < end && (complete || s.has(last)) {
		last++
	}
	runEnd := min(last*s.bs, end)
	if runEnd != s.size {
		runEnd = runEnd / pageSize * pageSize // whole pages, or up to the blob's end
	}
	if runEnd <= pos {
		return 0
	}
	if ok, err := s.readPages(pos/pageSize, dst[:runEnd-pos]); err != nil || !ok {
		return 0
	}
	for i := first; i*s.bs < runEnd; i++ {
		b.c.stats.hits.Add(1)
		s.stats.hits.Add(1)
		b.served(i, true)
	}
	return runEnd - pos
}

// served counts block i as read: its window used, and what readahead or
// prefetch brought it in ahead of the reader. hit says the block was
// cached when the read came, not fetched while it waited.
func (b *Blob) served(i int64, hit bool) {
	s := b.s
	s.touch(s.window(i))
	if s.unmarkAhead(i) {
		b.c.stats.readaheadHits.Add(1)
	}
	if s.unmarkPrefetched(i) {
		if hit {
			b.c.stats.prefetchHits.Add(1)
		} else {
			b.c.stats.prefetchLate.Add(1) // it waited for the prefetch in flight
		}
	}
}

// readBlock copies block i's bytes [inoff, inoff+len(dst)) into dst, fetching
// the blocks of want around it first if it is
// missing or fails its CRC.
func (b *Blob) readBlock(ctx context.Context, i int64, dst []byte, inoff int64, want fillRange) error {
	s := b.s
	counted, pinned, hit := false, false, false
	for attempt, evicted := 0, 0; ; {
		// A complete blob skips the presence map; its CRCs still guard reads.
		present := s.complete.Load() || s.has(i)
		if !counted {
			counted, hit = true, present
			if present {
				b.c.stats.hits.Add(1)
				s.stats.hits.Add(1)
			} else {
				b.c.stats.misses.Add(1)
				s.stats.misses.Add(1)
			}
		}
		if !present {
			if !pinned {
				pinned = true
				s.pin(s.window(i))
				defer s.unpin(s.window(i))
			}
			if _, err := b.fill(ctx, i, want, fillDemand); err != nil {
				// A coalesced fill led by a reader that gave up fails with
				// that reader's cancellation; ours may still be live.
				if ctx.Err() == nil && isContextErr(err) {
					continue
				}
				return err
			}
		}
		res, err := b.readVerified(i, dst, inoff)
		switch {
		case err != nil:
			return err
		case res == readOK:
			b.served(i, hit)
			return nil
		case res == readEvicted:
			// Lost a race with eviction; bounded so a cache far too small
			// for its readers fails instead of spinning.
			if evicted++; evicted > maxEvictedRetries {
				return fmt.Errorf("%w: %s block %d evicted %d times before it could be read; MaxBytes too small?",
					ErrFetch, s.dgst, i, evicted)
			}
		default:
			if attempt++; attempt >= maxBlockAttempts {
				return fmt.Errorf("%w: %s block %d (offset %d) failed its checksum %d times",
					ErrCorrupt, s.dgst, i, i*s.bs, attempt)
			}
		}
	}
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// readVerified reads the pages of block i that cover [inoff, inoff+len(dst))
// and checks their CRCs. A mismatch is re-checked under the blob lock (a
// concurrent eviction may have punched the block out between our presence
// check and the read); if it is still bad the block is dropped and
// readCorrupt tells the caller to refetch.
func (b *Blob) readVerified(i int64, dst []byte, inoff int64) (readResult, error) {
	s := b.s
	start := i*s.bs + inoff
	p0 := start / pageSize
	ps, pe := p0*pageSize, min((start+int64(len(dst))+pageSize-1)/pageSize*pageSize, s.size)
	buf := dst
	if ps != start || pe-ps != int64(len(dst)) {
		// Unaligned reads still read and check whole pages.
		scratch := b.c.getBlock()
		defer b.c.putBlock(scratch)
		buf = (*scratch)[:pe-ps]
	}
	if ok, err := s.readPages(p0, buf); err != nil || ok {
		if ok && len(buf) != len(dst) {
			copy(dst, buf[start-ps:])
		}
		return readOK, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.has(i) {
		return readEvicted, nil
	}
	if ok, err := s.readPages(p0, buf); err != nil || ok {
		if ok && len(buf) != len(dst) {
			copy(dst, buf[start-ps:])
		}
		return readOK, err
	}
	b.c.stats.corrupt.Add(1)
	if _, err := s.dropBlocks(i, i+1); err != nil {
		return readCorrupt, err
	}
	return readCorrupt, nil
}

// readPages reads buf from the data file at page p0 and reports whether
// every page in it matches its CRC.
func (s *blobState) readPages(p0 int64, buf []byte) (bool, error) {
	n, err := s.data.ReadAt(buf, p0*pageSize)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(buf)) {
		if !errors.Is(err, io.EOF) {
			s.c.storageFailed()
			return false, fmt.Errorf("%w: read %s at %d: %w", ErrStorage, s.dgst, p0*pageSize, err)
		}
		// The data file was truncated behind our back: the CRCs will fail
		// and the block is refetched.
		clear(buf[n:])
	}
	for k := 0; k*pageSize < len(buf); k++ {
		page := buf[k*pageSize : min((k+1)*pageSize, len(buf))]
		if blockCRC(page) != s.crcs[p0+int64(k)].Load() {
			return false, nil
		}
	}
	return true, nil
}
