package bpf

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
)

// Ring records (see struct obd_hdr in capture.c): an 8-byte header, the
// CPU and the number of events, then that many events.
const (
	hdrSize       = 8
	hdrUnordered  = 1 << 31
	maxBatchLen   = 64 // OBD_BATCH_MAX
	maxRecordSize = hdrSize + maxBatchLen*eventSize
)

// stream holds the events read from the ring but not yet delivered, and
// delivers them in time order.
//
// Each CPU's events arrive in the order it produced them, but a CPU's
// partial batch can reach the ring long after other CPUs' newer events. So
// events wait in one run per CPU, and the oldest head among the runs goes
// first once it is no newer than the watermark: the oldest time any event
// still to come can carry. A CPU's bound for that rises with its own events
// (its next ones are newer) and with each flush of its batch (events staged
// after it are newer than the flush). Events that bypassed their CPU's
// batch wait in a run of their own, sorted, and never raise a bound.
type stream struct {
	runs   []run    // one per CPU, then the unordered events
	active []int    // indexes of the non-empty runs
	bound  []uint64 // per CPU: every event it has yet to deliver is at least this new
	wm     uint64   // min(bound): events up to this time can go
}

// run is a queue of raw events, eventSize bytes each, from head on.
type run struct {
	buf  []byte
	head int
}

func (r *run) headTime() uint64 {
	return binary.LittleEndian.Uint64(r.buf[r.head+offTimestamp:])
}

func newStream(ncpu int) *stream {
	return &stream{runs: make([]run, ncpu+1), bound: make([]uint64, ncpu)}
}

// ingest queues the events of one ring record. It checks the record's
// shape only; events are decoded, and checked, when delivered.
func (s *stream) ingest(rec []byte) error {
	if len(rec) < hdrSize {
		return fmt.Errorf("%w: %d-byte record, shorter than its header", ErrBadRecord, len(rec))
	}
	le := binary.LittleEndian
	cpu, count := le.Uint32(rec), le.Uint32(rec[4:])
	unordered := cpu&hdrUnordered != 0
	cpu &^= hdrUnordered
	switch {
	case count == 0 || count > maxBatchLen:
		return fmt.Errorf("%w: batch of %d events, want 1 to %d", ErrBadRecord, count, maxBatchLen)
	case len(rec) != hdrSize+int(count)*eventSize:
		return fmt.Errorf("%w: %d bytes for %d events, want %d", ErrBadRecord, len(rec), count, hdrSize+int(count)*eventSize)
	case int(cpu) >= len(s.bound):
		return fmt.Errorf("%w: CPU %d, the machine has %d", ErrBadRecord, cpu, len(s.bound))
	}
	evs := rec[hdrSize:]
	if unordered {
		for off := 0; off < len(evs); off += eventSize {
			s.insert(len(s.runs)-1, evs[off:off+eventSize])
		}
		return nil
	}
	s.appendRun(int(cpu), evs)
	if last := le.Uint64(evs[len(evs)-eventSize+offTimestamp:]); last > s.bound[cpu] {
		s.bound[cpu] = last
	}
	return nil
}

func (s *stream) appendRun(i int, evs []byte) {
	r := &s.runs[i]
	if len(r.buf) == r.head {
		r.buf, r.head = r.buf[:0], 0
		s.active = append(s.active, i)
	} else if r.head > len(r.buf)/2 {
		r.buf = r.buf[:copy(r.buf, r.buf[r.head:])] // reclaim what was delivered
		r.head = 0
	}
	r.buf = append(r.buf, evs...)
}

// insert puts one event into run i at its place in time order, searching
// from the end, where it nearly always goes.
func (s *stream) insert(i int, ev []byte) {
	s.appendRun(i, ev)
	r := &s.runs[i]
	ts := binary.LittleEndian.Uint64(ev[offTimestamp:])
	at := len(r.buf) - eventSize
	for at > r.head && binary.LittleEndian.Uint64(r.buf[at-eventSize+offTimestamp:]) > ts {
		at -= eventSize
	}
	if at != len(r.buf)-eventSize {
		var tmp [eventSize]byte
		copy(tmp[:], ev)
		copy(r.buf[at+eventSize:], r.buf[at:len(r.buf)-eventSize])
		copy(r.buf[at:], tmp[:])
	}
}

// raise records that CPU cpu will produce nothing older than t any more.
func (s *stream) raise(cpu int, t uint64) {
	if t > s.bound[cpu] {
		s.bound[cpu] = t
	}
}

// updateWatermark recomputes wm after bounds rose.
func (s *stream) updateWatermark() { s.wm = slices.Min(s.bound) }

// releaseAll lets every queued event go: nothing older can come any more.
func (s *stream) releaseAll() { s.wm = math.MaxUint64 }

// pop decodes the oldest queued event into ev, if it may go. A tie goes to
// the lower CPU, so the order is deterministic.
func (s *stream) pop(ev *Event) (bool, error) {
	best, bestAt := -1, 0
	var bestTs uint64
	for k, i := range s.active {
		if ts := s.runs[i].headTime(); best < 0 || ts < bestTs || ts == bestTs && i < best {
			best, bestAt, bestTs = i, k, ts
		}
	}
	if best < 0 || bestTs > s.wm {
		return false, nil
	}
	r := &s.runs[best]
	err := ev.UnmarshalBinary(r.buf[r.head : r.head+eventSize])
	r.head += eventSize
	if r.head == len(r.buf) {
		r.buf, r.head = r.buf[:0], 0
		s.active[bestAt] = s.active[len(s.active)-1]
		s.active = s.active[:len(s.active)-1]
	}
	return true, err
}

// queued returns how many events wait in the stream.
func (s *stream) queued() int {
	n := 0
	for _, i := range s.active {
		n += (len(s.runs[i].buf) - s.runs[i].head) / eventSize
	}
	return n
}
