package lsmt

import (
	"bytes"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// op is one write (or discard) applied to a layer and to the reference disk.
type op struct {
	off, n  int64
	discard bool
	seed    uint64
}

func opData(o op) []byte {
	r := rand.New(rand.NewPCG(o.seed, 7))
	b := make([]byte, o.n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// applyRef applies ops to a reference disk.
func applyRef(ref []byte, ops []op) {
	for _, o := range ops {
		if o.discard {
			clear(ref[o.off : o.off+o.n])
		} else {
			copy(ref[o.off:], opData(o))
		}
	}
}

// randomOps makes count sector-aligned writes and discards inside a disk of
// size bytes, some of them overlapping.
func randomOps(r *rand.Rand, size int64, count int) []op {
	ops := make([]op, count)
	for i := range ops {
		n := (1 + r.Int64N(64)) * SectorSize
		if r.IntN(10) == 0 {
			n = (1 + r.Int64N(20000)) * SectorSize // past one segment's limit
		}
		n = min(n, size)
		off := r.Int64N((size-n)/SectorSize+1) * SectorSize
		ops[i] = op{off: off, n: n, discard: r.IntN(8) == 0, seed: r.Uint64()}
	}
	return ops
}

// newWritable creates a writable layer in a temp dir.
func newWritable(t testing.TB, vsize int64) (*Writable, string, string) {
	t.Helper()
	dir := t.TempDir()
	data, index := filepath.Join(dir, "data"), filepath.Join(dir, "index")
	w, err := CreateWritable(data, index, WritableOptions{VirtualSize: vsize, UUID: "11111111-2222-3333-4444-555555555555"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w, data, index
}

func applyOps(t testing.TB, w *Writable, ops []op) {
	t.Helper()
	for _, o := range ops {
		var err error
		if o.discard {
			err = w.Discard(o.off, o.n)
		} else {
			_, err = w.WriteAt(opData(o), o.off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// committedLayer builds a committed layer holding ops and opens it.
func committedLayer(t testing.TB, vsize int64, ops []op) (*Layer, []byte) {
	t.Helper()
	w, _, _ := newWritable(t, vsize)
	applyOps(t, w, ops)
	var buf bytes.Buffer
	if err := w.Commit(&buf, CommitArgs{UUID: "11111111-2222-3333-4444-555555555555"}); err != nil {
		t.Fatal(err)
	}
	l, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	return l, buf.Bytes()
}

func readAll(t testing.TB, r io.ReaderAt, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	if n, err := r.ReadAt(b, 0); n != len(b) {
		t.Fatalf("ReadAt returned %d of %d bytes: %v", n, len(b), err)
	}
	return b
}

// checkRandomReads compares unaligned reads of r with ref.
func checkRandomReads(t *testing.T, rng *rand.Rand, r io.ReaderAt, ref []byte) {
	t.Helper()
	for range 200 {
		off := rng.Int64N(int64(len(ref)))
		n := min(rng.Int64N(300000)+1, int64(len(ref))-off)
		got := make([]byte, n)
		if _, err := r.ReadAt(got, off); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		if !bytes.Equal(got, ref[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d) differs from the reference", off, n)
		}
	}
}

func TestWritableReopenAndCommit(t *testing.T) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	ops := randomOps(rng, size, 400)
	ref := make([]byte, size)
	applyRef(ref, ops)

	w, dataPath, indexPath := newWritable(t, size)
	applyOps(t, w, ops[:200])
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, err := OpenWritable(dataPath, indexPath)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	applyOps(t, w, ops[200:])
	if !bytes.Equal(readAll(t, w, size), ref) {
		t.Fatal("reopened writable layer differs from the reference")
	}
	checkRandomReads(t, rng, w, ref)

	var buf bytes.Buffer
	if err := w.Commit(&buf, CommitArgs{UUID: "AAAAAAAA-2222-3333-4444-555555555555", ParentUUID: "BBBBBBBB-2222-3333-4444-555555555555", UserTag: "test"}); err != nil {
		t.Fatal(err)
	}
	l, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, l, size), ref) {
		t.Fatal("committed layer differs from the reference")
	}
	checkRandomReads(t, rng, l, ref)
	h, tr := l.Header(), l.Trailer()
	if h.Flags != 7 || tr.Flags != 6 {
		t.Errorf("flags header %#x trailer %#x, want 7 and 6", h.Flags, tr.Flags)
	}
	if tr.IndexSize%indexPadMultiple != 0 || tr.UUID != "AAAAAAAA-2222-3333-4444-555555555555" ||
		tr.ParentUUID != "BBBBBBBB-2222-3333-4444-555555555555" || tr.UserTag != "test" || tr.VirtualSize != size {
		t.Errorf("trailer %+v", tr)
	}
}

func TestWritableGrowsVirtualSize(t *testing.T) {
	w, dataPath, indexPath := newWritable(t, 4096)
	if _, err := w.WriteAt(make([]byte, 512), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, err := OpenWritable(dataPath, indexPath)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if got := w.VirtualSize(); got != 1<<20+512 {
		t.Fatalf("virtual size after reopen = %d, want %d", got, 1<<20+512)
	}
}

func TestWritableRejectsUnaligned(t *testing.T) {
	w, _, _ := newWritable(t, 1<<20)
	if _, err := w.WriteAt(make([]byte, 100), 0); err == nil {
		t.Error("unaligned length accepted")
	}
	if _, err := w.WriteAt(make([]byte, 512), 3); err == nil {
		t.Error("unaligned offset accepted")
	}
	if err := w.Discard(1, 512); err == nil {
		t.Error("unaligned discard accepted")
	}
}

// TestStackRandom stacks 4 layers of overlapping writes and discards and
// compares the merged disk with the writes applied in order.
func TestStackRandom(t *testing.T) {
	const size = 4 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	ref := make([]byte, size)
	var layers []StackLayer
	for i := range 4 {
		ops := randomOps(rng, size, 60+40*i)
		applyRef(ref, ops)
		l, _ := committedLayer(t, size, ops)
		layers = append(layers, l)
	}
	s, err := NewStack(layers)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, s, size), ref) {
		t.Fatal("merged disk differs from the reference")
	}
	checkRandomReads(t, rng, s, ref)

	// Every piece Map reports must read, from its layer, the reference bytes.
	for range 200 {
		off := rng.Int64N(size)
		n := min(rng.Int64N(200000)+1, size-off)
		for _, p := range s.Map(off, n) {
			if p.Offset < off || p.Offset+p.Length > off+n {
				t.Fatalf("piece %+v outside [%d, %d)", p, off, off+n)
			}
			want := ref[p.Offset : p.Offset+p.Length]
			got := make([]byte, p.Length)
			if !p.Zeroed {
				if err := readFull(layers[p.Layer].Source(), got, p.LayerOffset); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("piece %+v does not hold the reference bytes", p)
			}
		}
	}
}

// rawLayer is a StackLayer given by its index alone, for exact merge tables.
type rawLayer []Segment

func (r rawLayer) Index() []Segment    { return r }
func (r rawLayer) Source() io.ReaderAt { return bytes.NewReader(nil) }
func (r rawLayer) VirtualSize() int64  { return 1 << 30 }

func TestMergeTable(t *testing.T) {
	bottom := rawLayer{{Offset: 0, Length: 100, MOffset: 1000}, {Offset: 200, Length: 10, MOffset: 1100}}
	middle := rawLayer{
		{Offset: 10, Length: 10, MOffset: 2000},
		{Offset: 50, Length: 10, MOffset: 77, Zeroed: true},
		{Offset: 90, Length: 30, MOffset: 3000},
		{Offset: 130, Length: 10, MOffset: 5000},
	}
	top := rawLayer{{Offset: 15, Length: 40, MOffset: 4000}, {Offset: 205, Length: 2, MOffset: 9, Zeroed: true}}
	s, err := NewStack([]StackLayer{bottom, middle, top})
	if err != nil {
		t.Fatal(err)
	}
	want := []Segment{
		{Offset: 0, Length: 10, MOffset: 1000, Tag: 0},
		{Offset: 10, Length: 5, MOffset: 2000, Tag: 1},             // tail trimmed by the top
		{Offset: 15, Length: 40, MOffset: 4000, Tag: 2},            // top wins
		{Offset: 55, Length: 5, MOffset: 77, Zeroed: true, Tag: 1}, // head trimmed, zeroed keeps moffset
		{Offset: 60, Length: 30, MOffset: 1060, Tag: 0},            // bottom trimmed at both edges
		{Offset: 90, Length: 30, MOffset: 3000, Tag: 1},            // beyond the bottom's end
		{Offset: 130, Length: 10, MOffset: 5000, Tag: 1},           // after a hole
		{Offset: 200, Length: 5, MOffset: 1100, Tag: 0},            // after a hole
		{Offset: 205, Length: 2, MOffset: 9, Zeroed: true, Tag: 2}, // zeroed masks lower data
		{Offset: 207, Length: 3, MOffset: 1107, Tag: 0},
	}
	got := s.Segments()
	if len(got) != len(want) {
		t.Fatalf("merged index has %d segments, want %d:\n%v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("segment %d = %v, want %v", i, got[i], want[i])
		}
	}

	// Map in bytes, unaligned at both ends, across a hole.
	pieces := s.Map(118*SectorSize+100, 15*SectorSize)
	wantPieces := []Piece{
		{Offset: 118*SectorSize + 100, Length: 2*SectorSize - 100, Layer: 1, LayerOffset: 3028*SectorSize + 100},
		{Offset: 130 * SectorSize, Length: 3*SectorSize + 100, Layer: 1, LayerOffset: 5000 * SectorSize},
	}
	if len(pieces) != len(wantPieces) {
		t.Fatalf("Map = %+v, want %+v", pieces, wantPieces)
	}
	for i := range wantPieces {
		if pieces[i] != wantPieces[i] {
			t.Errorf("piece %d = %+v, want %+v", i, pieces[i], wantPieces[i])
		}
	}
	if p := s.Map(140*SectorSize, 60*SectorSize); len(p) != 0 {
		t.Errorf("Map of a hole = %+v, want nothing", p)
	}
	if p := s.Map(205*SectorSize, 1); len(p) != 1 || !p[0].Zeroed || p[0].Layer != 2 || p[0].LayerOffset != 0 {
		t.Errorf("Map of a zeroed sector = %+v", p)
	}
}

func TestCompactSegmentsMatchesUpstream(t *testing.T) {
	// 64-sector pieces merge up to 255 of them (16320 sectors): one more
	// would reach MaxSegmentLength, which the rule excludes.
	var in []Segment
	for i := range uint64(300) {
		in = append(in, Segment{Offset: i * 64, Length: 64, MOffset: 8 + i*64})
	}
	out := compactSegments(in)
	if len(out) != 2 || out[0].Length != 16320 || out[1].Length != 45*64 || out[1].MOffset != 8+16320 {
		t.Fatalf("compacted to %v", out)
	}
	// Zeroed neighbours with the same moffset are contiguous (their MEnd is
	// their MOffset); a data/zeroed pair never merges.
	z := compactSegments([]Segment{
		{Offset: 0, Length: 8, MOffset: 40, Zeroed: true},
		{Offset: 8, Length: 8, MOffset: 40, Zeroed: true},
		{Offset: 16, Length: 8, MOffset: 40},
	})
	if len(z) != 2 || z[0].Length != 16 || z[1].Zeroed {
		t.Fatalf("compacted zeroed run to %v", z)
	}
}

func TestSegmentEncoding(t *testing.T) {
	s := Segment{Offset: MaxOffset - 5, Length: MaxSegmentLength, MOffset: MaxMOffset, Zeroed: true}
	if got := decodeSegment(appendSegment(nil, s)); got != s {
		t.Fatalf("round trip %v -> %v", s, got)
	}
	pad := appendSegment(nil, paddingSegment)
	if !bytes.Equal(pad, []byte{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("padding entry % x", pad)
	}
}
