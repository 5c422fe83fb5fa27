package bpf

import (
	"encoding/binary"
	"errors"
	"testing"
)

// record builds a ring record of cpu's events with the given timestamps;
// each event's sector is its timestamp, to recognise it.
func record(cpu uint32, ts ...uint64) []byte {
	b := make([]byte, hdrSize+len(ts)*eventSize)
	le := binary.LittleEndian
	le.PutUint32(b, cpu)
	le.PutUint32(b[4:], uint32(len(ts)))
	for i, t := range ts {
		ev := b[hdrSize+i*eventSize:]
		le.PutUint64(ev[offTimestamp:], t)
		le.PutUint64(ev[offSector:], t)
	}
	return b
}

// popAll returns the sectors of the events pop lets go, in order.
func popAll(t *testing.T, s *stream) []uint64 {
	t.Helper()
	var out []uint64
	for {
		var ev Event
		ok, err := s.pop(&ev)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return out
		}
		out = append(out, ev.Sector)
	}
}

func equal(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Batches from two CPUs arrive out of time order; the stream holds back
// what a CPU's partial batch could still precede, and merges the rest.
func TestStreamOrdersAcrossCPUs(t *testing.T) {
	s := newStream(2)
	for _, rec := range [][]byte{record(1, 5, 6, 7), record(0, 1, 2, 8)} {
		if err := s.ingest(rec); err != nil {
			t.Fatal(err)
		}
	}
	s.updateWatermark() // bounds: CPU 0 at 8, CPU 1 at 7
	if got := popAll(t, s); !equal(got, []uint64{1, 2, 5, 6, 7}) {
		t.Fatalf("first pops %v, want 1 2 5 6 7 (8 must wait: CPU 1 may still send older)", got)
	}
	// CPU 1's partial batch arrives, then a flush at 20 raises both bounds.
	if err := s.ingest(record(1, 9)); err != nil {
		t.Fatal(err)
	}
	s.raise(0, 20)
	s.raise(1, 20)
	s.updateWatermark()
	if got := popAll(t, s); !equal(got, []uint64{8, 9}) {
		t.Fatalf("after the flush %v, want 8 9", got)
	}
	if s.queued() != 0 {
		t.Fatalf("%d events left", s.queued())
	}
}

// An event that bypassed its CPU's batch may be older than what came
// before it; it waits in its own sorted run and never raises a bound.
func TestStreamUnordered(t *testing.T) {
	s := newStream(1)
	for _, rec := range [][]byte{record(0|hdrUnordered, 30), record(0|hdrUnordered, 10), record(0, 20)} {
		if err := s.ingest(rec); err != nil {
			t.Fatal(err)
		}
	}
	s.updateWatermark()
	if got := popAll(t, s); !equal(got, []uint64{10, 20}) {
		t.Fatalf("pops %v, want 10 20 (30 is past CPU 0's bound)", got)
	}
	s.releaseAll()
	if got := popAll(t, s); !equal(got, []uint64{30}) {
		t.Fatalf("after releaseAll %v, want 30", got)
	}
}

// A run reused over many batches keeps its order, and reclaims the space
// of what it delivered.
func TestStreamReusesRuns(t *testing.T) {
	s := newStream(1)
	var next uint64 = 1
	for range 1000 { // three in, two out: one more queued each time
		if err := s.ingest(record(0, next, next+1, next+2)); err != nil {
			t.Fatal(err)
		}
		next += 3
		s.updateWatermark()
		for range 2 {
			var ev Event
			if ok, err := s.pop(&ev); !ok || err != nil {
				t.Fatalf("pop: %v, %v", ok, err)
			}
		}
	}
	if q, c := s.queued(), cap(s.runs[0].buf); q != 1000 || c > 4*q*eventSize {
		t.Fatalf("%d events queued in a %d-byte buffer; want 1000 in at most %d", q, c, 4*q*eventSize)
	}
	got := popAll(t, s)
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("out of order at %d: %d after %d", i, got[i], got[i-1])
		}
	}
}

func TestStreamBadRecords(t *testing.T) {
	s := newStream(2)
	long := record(0, 1)
	for name, rec := range map[string][]byte{
		"short":      {1, 2, 3},
		"no events":  record(0),
		"bad length": long[:len(long)-1],
		"bad cpu":    record(2, 1),
		"huge count": append(record(0, 1)[:4], 0xff, 0xff, 0xff, 0x7f),
	} {
		if err := s.ingest(rec); !errors.Is(err, ErrBadRecord) {
			t.Errorf("%s: %v, want ErrBadRecord", name, err)
		}
	}
}

// FuzzStreamIngest: any bytes from the ring are queued or refused with
// ErrBadRecord, and what is queued comes out whole, in time order per run.
func FuzzStreamIngest(f *testing.F) {
	f.Add(record(0, 1, 2, 3))
	f.Add(record(1|hdrUnordered, 9))
	f.Add(record(3, 5))
	f.Add([]byte{0, 0, 0, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		s := newStream(2)
		if err := s.ingest(b); err != nil {
			if !errors.Is(err, ErrBadRecord) {
				t.Fatalf("error %v does not wrap ErrBadRecord", err)
			}
			return
		}
		n := s.queued()
		if n != (len(b)-hdrSize)/eventSize {
			t.Fatalf("queued %d events of a %d-byte record", n, len(b))
		}
		s.releaseAll()
		for range n {
			var ev Event
			if ok, err := s.pop(&ev); !ok || err != nil && !errors.Is(err, ErrBadRecord) {
				t.Fatalf("pop: %v, %v", ok, err)
			}
		}
		if s.queued() != 0 {
			t.Fatalf("%d events left after popping all", s.queued())
		}
	})
}

// BenchmarkStream is the reader's own work per event, ring record in,
// decoded Event out, for batches of 64 events alternating between two CPUs.
//
//	go test ./bpf -run '^$' -bench Stream -benchtime 2000000x
func BenchmarkStream(b *testing.B) {
	s := newStream(2)
	ts := make([]uint64, maxBatchLen)
	for k := range ts {
		ts[k] = uint64(2 * k)
	}
	recs := [][]byte{record(0, ts...), record(1, ts...)}
	var ev Event
	b.ReportAllocs()
	for i := 0; i < b.N; i += 2 * maxBatchLen {
		for _, rec := range recs {
			if err := s.ingest(rec); err != nil {
				b.Fatal(err)
			}
		}
		s.raise(0, ts[len(ts)-1])
		s.raise(1, ts[len(ts)-1])
		s.updateWatermark()
		for {
			ok, err := s.pop(&ev)
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
		}
	}
}
