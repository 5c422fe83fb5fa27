package lsmt

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// lowerStack is a committed layer holding ops, stacked alone.
func lowerStack(t *testing.T, size int64, ops []op) (*Layer, *Stack) {
	t.Helper()
	l, _ := committedLayer(t, size, ops)
	s, err := NewStack([]StackLayer{l})
	if err != nil {
		t.Fatal(err)
	}
	return l, s
}

func TestWritableStackReadsThrough(t *testing.T) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	lowerOps := randomOps(rng, size, 60)
	ref := make([]byte, size)
	applyRef(ref, lowerOps)
	w, _, _ := newWritable(t, size)
	_, lower := lowerStack(t, size, lowerOps)
	s := NewWritableStack(lower, w)
	if s.Size() != size {
		t.Fatalf("Size = %d, want %d", s.Size(), size)
	}
	for i, o := range randomOps(rng, size, 80) {
		if i%5 == 0 { // unaligned, exercising the read-modify-write
			o.off += 3
			o.n = min(o.n-7, size-o.off)
		}
		var err error
		if o.discard {
			err = s.Discard(o.off, o.n)
		} else {
			_, err = s.WriteAt(opData(o), o.off)
		}
		if err != nil {
			t.Fatalf("op %d %+v: %v", i, o, err)
		}
		applyRef(ref, []op{o})
	}
	if !bytes.Equal(readAll(t, s, size), ref) {
		t.Fatal("merged disk differs from the reference")
	}
	checkRandomReads(t, rng, s, ref)
	// The lower layer is untouched: only the upper holds the writes.
	if len(w.Index()) == 0 {
		t.Fatal("upper layer holds no writes")
	}
}

func TestWritableStackBounds(t *testing.T) {
	const size = 1 << 20
	w, _, _ := newWritable(t, size)
	s := NewWritableStack(nil, w)
	if _, err := s.WriteAt(make([]byte, 4096), size-512); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write past the end: %v, want ErrOutOfRange", err)
	}
	if err := s.Discard(-512, 512); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("discard at a negative offset: %v, want ErrOutOfRange", err)
	}
	if _, err := s.ReadAt(make([]byte, 1), -1); !errors.Is(err, ErrNegativeOffset) {
		t.Errorf("read at -1: %v, want ErrNegativeOffset", err)
	}
	p := make([]byte, 1024)
	if n, err := s.ReadAt(p, size-512); n != 512 || !errors.Is(err, io.EOF) {
		t.Errorf("read across the end: %d, %v; want 512, EOF", n, err)
	}
	if n, err := s.ReadAt(p, size); n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("read at the end: %d, %v; want 0, EOF", n, err)
	}
}

// commitChanges commits s's changes over base and opens the result.
func commitChanges(t *testing.T, s *WritableStack, base io.ReaderAt) (*Layer, []byte, ChangeStats) {
	t.Helper()
	var buf bytes.Buffer
	st, err := CommitChanges(&buf, s, base, s.Upper().Index(), CommitArgs{VirtualSize: s.Size(), UUID: "AAAAAAAA-2222-3333-4444-555555555555"})
	if err != nil {
		t.Fatalf("CommitChanges: %v", err)
	}
	l, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatalf("open committed changes: %v", err)
	}
	return l, buf.Bytes(), st
}

func TestCommitChangesRoundTrip(t *testing.T) {
	const size = 16 << 20
	rng := rand.New(rand.NewPCG(5, 6))
	lowerOps := randomOps(rng, size, 80)
	ref := make([]byte, size)
	applyRef(ref, lowerOps)
	lowerLayer, lower := lowerStack(t, size, lowerOps)
	w, _, _ := newWritable(t, size)
	s := NewWritableStack(lower, w)
	ops := randomOps(rng, size, 120)
	applyOps(t, w, ops)
	applyRef(ref, ops)
	l, _, st := commitChanges(t, s, lower)
	if st.Examined != st.Data+st.Zeroed+st.Unchanged || st.Data == 0 || st.Zeroed == 0 {
		t.Errorf("stats %+v: want data and zeroed blocks adding up", st)
	}
	top, err := NewStack([]StackLayer{lowerLayer, l})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, top, size), ref) {
		t.Fatal("base + committed changes differ from the written disk")
	}
}

// TestCommitChangesDependsOnlyOnContent writes the same final content
// through two different histories and expects byte-identical layers.
func TestCommitChangesDependsOnlyOnContent(t *testing.T) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(7, 8))
	lowerOps := randomOps(rng, size, 40)
	_, lower := lowerStack(t, size, lowerOps)
	base := readAll(t, lower, size)
	want := bytes.Clone(base)
	applyRef(want, []op{{off: 4096, n: 3 * 4096, seed: 1}, {off: 1 << 20, n: 512, seed: 2},
		{off: 3 << 20, n: 200 << 10, discard: true}, {off: 5<<20 + 1024, n: 70 << 10, seed: 3}})

	// History 1: the final content in one pass of 1 MiB writes.
	w1, _, _ := newWritable(t, size)
	s1 := NewWritableStack(lower, w1)
	for off := int64(0); off < size; off += 1 << 20 {
		if _, err := s1.WriteAt(want[off:off+1<<20], off); err != nil {
			t.Fatal(err)
		}
	}
	// History 2: noise first, then the final content block by block in
	// reverse, rewriting unchanged blocks and discarding zero ones.
	w2, _, _ := newWritable(t, size)
	s2 := NewWritableStack(lower, w2)
	applyOps(t, w2, randomOps(rng, size, 30))
	for off := int64(size - ChangeBlockSize); off >= 0; off -= ChangeBlockSize {
		blk := want[off : off+ChangeBlockSize]
		var err error
		if bytes.Equal(blk, make([]byte, ChangeBlockSize)) {
			err = s2.Discard(off, ChangeBlockSize)
		} else {
			_, err = s2.WriteAt(blk, off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	_, b1, st1 := commitChanges(t, s1, lower)
	_, b2, st2 := commitChanges(t, s2, lower)
	if !bytes.Equal(b1, b2) {
		t.Fatalf("same content, different layers: %d and %d bytes (stats %+v / %+v)", len(b1), len(b2), st1, st2)
	}
	if st1.Unchanged == 0 {
		t.Errorf("rewriting the whole disk left no block unchanged: %+v", st1)
	}
}

func TestCommitChangesNothingChanged(t *testing.T) {
	const size = 1 << 20
	w, _, _ := newWritable(t, size)
	s := NewWritableStack(nil, w)
	if _, err := s.WriteAt(make([]byte, 64<<10), 128<<10); err != nil { // zeros over zeros
		t.Fatal(err)
	}
	l, _, st := commitChanges(t, s, nil)
	if len(l.Index()) != 0 || st.Unchanged != 16 {
		t.Errorf("zeros written over an empty disk: %d segments, stats %+v; want none, 16 unchanged", len(l.Index()), st)
	}
}

func TestCommitChangesSplitsLongRuns(t *testing.T) {
	const size = 24 << 20
	w, _, _ := newWritable(t, size)
	s := NewWritableStack(nil, w)
	data := bytes.Repeat([]byte{0xA5}, 20<<20)
	if _, err := s.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	l, _, _ := commitChanges(t, s, nil)
	for _, seg := range l.Index() {
		if seg.Length > MaxSegmentLength {
			t.Fatalf("segment %v longer than %d sectors", seg, MaxSegmentLength)
		}
	}
	if got := l.DataSize(); got != int64(len(data)) {
		t.Errorf("data size %d, want %d", got, len(data))
	}
}

func TestCommitChangesRejectsBadSize(t *testing.T) {
	_, err := CommitChanges(io.Discard, nil, nil, nil, CommitArgs{VirtualSize: 4096 + 512})
	if !errors.Is(err, ErrAlignment) {
		t.Errorf("virtual size not a block multiple: %v, want ErrAlignment", err)
	}
}

func TestCandidateBlocks(t *testing.T) {
	got := candidateBlocks([]Segment{
		{Offset: 16, Length: 1}, // block 2
		{Offset: 0, Length: 9},  // blocks 0-1
		{Offset: 17, Length: 8}, // blocks 2-3
		{Offset: 80, Length: 0}, // empty
		{Offset: 800, Length: 8},
	}, 50)
	want := [][2]int64{{0, 4}}
	if len(got) != len(want) || got[0] != want[0] {
		t.Errorf("candidateBlocks = %v, want %v", got, want)
	}
}
