package blobcache

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// blobState is the shared, in-memory view of one cached blob. The presence
// bits and CRCs are atomics so hits never take a lock; mu serialises fills,
// evictions and meta writes of the blob.
type blobState struct {
	c       *Cache
	dgst    digest.Digest
	size    int64
	bs      int64 // block size
	nblocks int64
	bpw     int64 // blocks per refill window
	nwin    int64
	data    *os.File
	meta    *os.File

	layout  metaLayout
	present []atomic.Uint64 // one bit per block
	// prefetched marks blocks a Prefetch fetched that no read has asked
	// for yet: a demand read that finds one is a prefetch hit, and what is
	// still marked is prefetch that has not paid off (so far). In memory
	// only: it describes this run's prefetching.
	prefetched blockFlags
	// ahead marks blocks the sequential readahead fetched that no read
	// has asked for yet (in memory only, like prefetched).
	ahead blockFlags
	// planned marks blocks a replay plan will prefetch (Expect), so that a
	// demand fetch can tell a prefetch running behind the reader from a
	// read the plan does not know. In memory only.
	planned  blockFlags
	planning atomic.Bool // between Expect and EndExpect
	// replayed is set by EndExpect: a replay has brought what the
	// start-up reads, and this blob's misses fetch only their own blocks
	// from then on (see ReadAtContext). In memory only.
	replayed atomic.Bool
	// exact counts the FetchExactly calls not yet ended.
	exact    atomic.Int64
	streams  streams
	crcs     []atomic.Uint32 // one per 4 KiB page
	ref      []atomic.Uint64 // CLOCK referenced bit per window
	complete atomic.Bool
	cached   atomic.Int64 // bytes of present blocks

	mu        sync.Mutex
	inflight  map[int64]*fillCall // by block
	pins      map[int64]int       // windows readers are filling and about to read
	verifying bool                // a digest check is reading the data file
	pending   []int64             // published blocks whose marks are not on disk yet
	flushing  bool                // a flusher goroutine owns pending
	dropEpoch uint64              // bumped by every dropBlocks

	stats blobCounters
}

func (c *Cache) newState(dgst digest.Digest, size int64, data, meta *os.File) *blobState {
	bs := c.opts.BlockSize
	n := numBlocks(size, bs)
	bpw := c.opts.RefillSize / bs
	nwin := (n + bpw - 1) / bpw
	s := &blobState{
		c: c, dgst: dgst, size: size, bs: bs, nblocks: n, bpw: bpw, nwin: nwin,
		data: data, meta: meta, layout: layoutFor(size, bs),
		present:    make([]atomic.Uint64, (n+63)/64),
		prefetched: newBlockFlags(n),
		ahead:      newBlockFlags(n),
		planned:    newBlockFlags(n),
		crcs:       make([]atomic.Uint32, numBlocks(size, pageSize)),
		ref:        make([]atomic.Uint64, (nwin+63)/64),
		inflight:   make(map[int64]*fillCall),
		pins:       make(map[int64]int),
	}
	s.streams.init()
	return s
}

// createBlob makes empty data and meta files for a blob new to the cache.
func (c *Cache) createBlob(dgst digest.Digest, size int64) (*blobState, error) {
	dataPath, metaPath := c.paths(dgst)
	if err := os.MkdirAll(filepath.Dir(dataPath), 0o700); err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	data, err := os.OpenFile(dataPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	meta, err := os.OpenFile(metaPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		data.Close()
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	err = data.Truncate(size)
	if err == nil {
		_, err = meta.WriteAt(encodeHeader(dgst, c.opts.BlockSize, size, false), 0)
	}
	if err == nil {
		err = meta.Truncate(layoutFor(size, c.opts.BlockSize).size)
	}
	if err != nil {
		data.Close()
		meta.Close()
		return nil, fmt.Errorf("blobcache: create %s: %w", dgst, err)
	}
	return c.newState(dgst, size, data, meta), nil
}

// load reopens the blobs earlier runs cached. Files that are damaged, from
// another block size or orphaned are removed: the cache can always refetch.
func (c *Cache) load() error {
	algs, err := os.ReadDir(c.dir)
	if err != nil {
		return fmt.Errorf("blobcache: %w", err)
	}
	for _, a := range algs {
		if !a.IsDir() {
			continue
		}
		algDir := filepath.Join(c.dir, a.Name())
		files, err := os.ReadDir(algDir)
		if err != nil {
			return fmt.Errorf("blobcache: %w", err)
		}
		for _, f := range files {
			name := f.Name()
			hex, ok := strings.CutSuffix(name, ".meta")
			if !ok {
				continue
			}
			dgst := digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), hex)
			s, err := c.loadBlob(dgst, filepath.Join(algDir, name), filepath.Join(algDir, hex+".data"))
			if err != nil {
				c.stats.discarded.Add(1)
				os.Remove(filepath.Join(algDir, name))
				os.Remove(filepath.Join(algDir, hex+".data"))
				continue
			}
			c.blobs[dgst] = s
			c.order = append(c.order, s)
			c.used.Add(s.cached.Load())
		}
		for _, f := range files { // data files whose meta is gone
			if hex, ok := strings.CutSuffix(f.Name(), ".data"); ok {
				if _, err := os.Stat(filepath.Join(algDir, hex+".meta")); errors.Is(err, fs.ErrNotExist) {
					os.Remove(filepath.Join(algDir, f.Name()))
				}
			}
		}
	}
	return nil
}

func (c *Cache) loadBlob(dgst digest.Digest, metaPath, dataPath string) (_ *blobState, err error) {
	if err := dgst.Validate(); err != nil {
		return nil, err
	}
	meta, err := os.OpenFile(metaPath, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	data, err := os.OpenFile(dataPath, os.O_RDWR, 0)
	if err != nil {
		meta.Close()
		return nil, err
	}
	defer func() {
		if err != nil {
			meta.Close()
			data.Close()
		}
	}()
	// Check the header before reading the rest, so a damaged size field
	// cannot make us read (or allocate) more than that blob's presence map.
	header := make([]byte, metaHeaderSize)
	if _, err := io.ReadFull(meta, header); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidMeta, metaPath, err)
	}
	hdgst, bs, size, _, err := parseHeader(header)
	if err != nil {
		return nil, err
	}
	if hdgst != dgst || bs != c.opts.BlockSize {
		return nil, fmt.Errorf("%w: %s holds %s in %d-byte blocks", ErrInvalidMeta, metaPath, hdgst, bs)
	}
	if st, err := meta.Stat(); err != nil || st.Size() != layoutFor(size, bs).size {
		return nil, fmt.Errorf("%w: %s: size does not match a %d-byte blob", ErrInvalidMeta, metaPath, size)
	}
	raw := make([]byte, layoutFor(size, bs).size)
	if _, err := meta.ReadAt(raw, 0); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidMeta, metaPath, err)
	}
	m, err := parseMeta(raw)
	if err != nil {
		return nil, err
	}
	if st, err := data.Stat(); err != nil || st.Size() != size {
		return nil, fmt.Errorf("%w: %s: data file size does not match %d", ErrInvalidMeta, dataPath, size)
	}
	s := c.newState(dgst, size, data, meta)
	for i, ok := range m.present {
		if ok {
			s.present[i/64].Or(1 << (i % 64))
			s.cached.Add(s.blockLen(int64(i)))
		}
	}
	for i, crc := range m.crcs {
		s.crcs[i].Store(crc)
	}
	s.complete.Store(m.complete)
	return s, nil
}

func (s *blobState) blockLen(i int64) int64 { return min(s.bs, s.size-i*s.bs) }

func (s *blobState) has(i int64) bool { return s.present[i/64].Load()&(1<<(i%64)) != 0 }

// markPrefetched flags block i as fetched by prefetch and not yet read.
func (s *blobState) markPrefetched(i int64) {
	s.prefetched.mark(i, s.blockLen(i), &s.c.stats.prefetched, &s.c.stats.prefetchUnused)
}

// unmarkPrefetched clears block i's prefetch flag and reports whether it
// was set.
func (s *blobState) unmarkPrefetched(i int64) bool {
	return s.prefetched.unmark(i, s.blockLen(i), &s.c.stats.prefetchUnused)
}

func (s *blobState) window(block int64) int64 { return block / s.bpw }

// windowBlocks returns the block range [first, end) of window w.
func (s *blobState) windowBlocks(w int64) (first, end int64) {
	return w * s.bpw, min((w+1)*s.bpw, s.nblocks)
}

func (s *blobState) touch(w int64) {
	word, bit := &s.ref[w/64], uint64(1)<<(w%64)
	if word.Load()&bit == 0 { // avoid a write to a shared line on every hit
		word.Or(bit)
	}
}

// pin keeps window w from eviction while a reader that missed fills and
// reads it; otherwise concurrent readers of a small cache could evict each
// other's windows between fill and read indefinitely.
func (s *blobState) pin(w int64) {
	s.mu.Lock()
	s.pins[w]++
	s.mu.Unlock()
}

func (s *blobState) unpin(w int64) {
	s.mu.Lock()
	if s.pins[w]--; s.pins[w] <= 0 {
		delete(s.pins, w)
	}
	s.mu.Unlock()
}

// setComplete flips the complete flag, on disk and in memory. Caller holds mu.
func (s *blobState) setComplete(v bool) error {
	if s.complete.Load() == v {
		return nil
	}
	s.complete.Store(v)
	_, err := s.meta.WriteAt(encodeHeader(s.dgst, s.bs, s.size, v), 0)
	if err == nil && v {
		err = s.meta.Sync()
	}
	return err
}

// dropBlocks forgets blocks [first, end) (eviction, corruption, a failed
// digest check): marks are cleared before the data is punched out, so a
// crash in between leaves at worst a mark over zeros, which fail their page
// CRCs, never wrong data served. Caller holds mu. Returns the bytes dropped.
func (s *blobState) dropBlocks(first, end int64) (int64, error) {
	var dropped int64
	for i := first; i < end; i++ {
		if s.has(i) {
			s.present[i/64].And(^(uint64(1) << (i % 64)))
			s.unmarkPrefetched(i)
			s.unmarkAhead(i)
			dropped += s.blockLen(i)
		}
	}
	if dropped == 0 {
		return 0, nil
	}
	// A dropped block must not get its mark from a flush of its old bytes.
	s.dropEpoch++
	s.pending = slices.DeleteFunc(s.pending, func(i int64) bool { return i >= first && i < end })
	err := s.setComplete(false)
	zeros := make([]byte, (end-first)*4)
	if _, werr := s.meta.WriteAt(zeros, s.layout.marks+first*4); werr != nil && err == nil {
		err = werr
	}
	s.cached.Add(-dropped)
	s.c.used.Add(-dropped)
	off, n := first*s.bs, min(end*s.bs, s.size)-first*s.bs
	if perr := punchHole(s.data, off, n); perr != nil && err == nil {
		err = perr
	}
	if err != nil {
		return dropped, fmt.Errorf("blobcache: drop %s blocks [%d, %d): %w", s.dgst, first, end, err)
	}
	return dropped, nil
}
