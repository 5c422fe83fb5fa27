package blobcache

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// evict brings usage under MaxBytes with a CLOCK sweep over refill windows:
// the hand walks every window of every blob; a window read since the hand
// last passed (its referenced bit set) gets a second chance, otherwise its
// blocks are dropped. Windows being filled, or filled and not yet read by the
// reader that missed (pinned), and blobs under a digest check are skipped, so
// usage can exceed MaxBytes by the windows in use at that moment. Two full
// turns without reaching the target end the sweep.
func (c *Cache) evict() {
	if c.opts.MaxBytes == 0 || c.used.Load() <= c.opts.MaxBytes {
		return
	}
	c.evictMu.Lock()
	defer c.evictMu.Unlock()
	c.mu.Lock()
	blobs := c.order
	c.mu.Unlock()
	var total int64
	for _, s := range blobs {
		total += s.nwin
	}
	for steps := int64(0); steps < 2*total && c.used.Load() > c.opts.MaxBytes; steps++ {
		if c.hand.blob >= len(blobs) {
			c.hand.blob, c.hand.win = 0, 0
		}
		s, w := blobs[c.hand.blob], c.hand.win
		if c.hand.win++; c.hand.win >= s.nwin {
			c.hand.blob, c.hand.win = c.hand.blob+1, 0
		}
		if w >= s.nwin {
			continue
		}
		word, bit := &s.ref[w/64], uint64(1)<<(w%64)
		if word.Load()&bit != 0 {
			word.And(^bit)
			continue
		}
		s.evictWindow(w)
	}
}

func (s *blobState) evictWindow(w int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	first, end := s.windowBlocks(w)
	if s.pins[w] > 0 || s.verifying {
		return
	}
	for i := first; i < end; i++ {
		if s.inflight[i] != nil {
			return
		}
	}
	n, err := s.dropBlocks(first, end)
	s.c.stats.evicted.Add(n)
	if err != nil {
		s.c.stats.ioErrors.Add(1)
	}
}

// punchHole frees the disk space of [off, off+n) in f, keeping its size.
func punchHole(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) {
		// The file system cannot free the space; the records are already
		// cleared, so correctness holds and only disk usage suffers.
		return nil
	}
	return err
}
