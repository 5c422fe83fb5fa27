package blobcache

import (
	"encoding/binary"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// startFlush runs the blob's flusher unless one is running. The flusher
// persists the marks of published blocks: it takes the pending blocks,
// fdatasyncs the data file and only then writes their marks, so no mark on
// disk ever covers data that is not. Fills arriving meanwhile share the next
// fdatasync, so a burst of fills costs a few syncs, not one each, and no
// reader ever waits for one.
func (c *Cache) startFlush(s *blobState) {
	s.mu.Lock()
	if s.flushing || len(s.pending) == 0 {
		s.mu.Unlock()
		return
	}
	s.flushing = true
	s.mu.Unlock()
	// Under c.mu, so Close cannot start waiting between the check and the Add.
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		s.mu.Lock()
		s.flushing = false // marks of a closing cache are lost: refetched later
		s.mu.Unlock()
		return
	}
	c.background.Go(func() {
		for s.flushOnce() {
		}
	})
}

// flushOnce persists one batch of pending marks and reports whether the
// flusher should go on.
func (s *blobState) flushOnce() bool {
	s.mu.Lock()
	batch, epoch := s.pending, s.dropEpoch
	s.pending = nil
	if len(batch) == 0 {
		s.flushing = false
		s.mu.Unlock()
		return false
	}
	s.mu.Unlock()

	if err := unix.Fdatasync(int(s.data.Fd())); err != nil {
		// Leave the marks unwritten: the blocks stay readable now and are
		// refetched after a restart.
		s.c.storageFailed()
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dropEpoch != epoch {
		// A block of the batch may have been dropped and filled again after
		// our sync; its new bytes wait for the next round's sync.
		for _, i := range batch {
			if s.has(i) {
				s.pending = append(s.pending, i)
			}
		}
		return true
	}
	if err := s.writeMarks(batch); err != nil {
		s.c.storageFailed()
	}
	return true
}

// writeMarks writes markPresent for the blocks in batch, one write per run of
// consecutive blocks. Caller holds mu.
func (s *blobState) writeMarks(batch []int64) error {
	slices.Sort(batch)
	for k := 0; k < len(batch); {
		j := k + 1
		for j < len(batch) && batch[j] == batch[j-1]+1 {
			j++
		}
		marks := make([]byte, (j-k)*4)
		for m := range j - k {
			binary.LittleEndian.PutUint32(marks[m*4:], markPresent)
		}
		if _, err := s.meta.WriteAt(marks, s.layout.marks+batch[k]*4); err != nil {
			return fmt.Errorf("blobcache: mark %s blocks: %w", s.dgst, err)
		}
		k = j
	}
	return nil
}
