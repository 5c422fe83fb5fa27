package recorder

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/trace"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	// hdr is where a committed layer's data starts in its byte space.
	hdr = lsmt.HeaderSize
)

// layerOp is one write (or discard) applied to a writable layer before commit.
type layerOp struct {
	off, n  int64
	discard bool
}

// committed builds a committed layer from ops through the real writable layer and commit.
func committed(t testing.TB, vsize int64, ops ...layerOp) *lsmt.Layer {
	t.Helper()
	dir := t.TempDir()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "data"), filepath.Join(dir, "index"),
		lsmt.WritableOptions{VirtualSize: vsize})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, o := range ops {
		if o.discard {
			err = w.Discard(o.off, o.n)
		} else {
			_, err = w.WriteAt(bytes.Repeat([]byte{0xA5}, int(o.n)), o.off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := w.Commit(&buf, lsmt.CommitArgs{}); err != nil {
		t.Fatal(err)
	}
	l, err := lsmt.Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// threeLayers is the hand-made image of the tests. Committed data sits in logical order from
// byte 4096, so the merged view is (x = disk offset):
//
//	[0, 16K)        L0 at hdr+x
//	[16K, 24K)      L1 at hdr+x-16K
//	[24K, 40K)      L2 at hdr+x-24K
//	[40K, 48K)      L0 at hdr+x
//	[48K, 64K)      zeroed by L1
//	[64K, 1M)       hole
//	[1M, 2M)        L0 at hdr+64K+x-1M
//	[2M, 2M+8K)     L1 at hdr+16K+x-2M
//	[2M+8K, 10M)    L0 at hdr+64K+x-1M (several segments: one holds at most ~8 MiB)
//	[10M, 10M+16K)  L2 at hdr+16K+x-10M
//	[10M+16K, 64M)  hole
func threeLayers(t testing.TB) *lsmt.Stack {
	const vsize = 64 * mib
	l0 := committed(t, vsize, layerOp{off: 0, n: 64 * kib}, layerOp{off: 1 * mib, n: 9 * mib})
	l1 := committed(t, vsize, layerOp{off: 16 * kib, n: 16 * kib}, layerOp{off: 48 * kib, n: 16 * kib, discard: true},
		layerOp{off: 2 * mib, n: 8 * kib})
	l2 := committed(t, vsize, layerOp{off: 24 * kib, n: 16 * kib}, layerOp{off: 10 * mib, n: 16 * kib})
	s, err := lsmt.NewStack([]lsmt.StackLayer{l0, l1, l2})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func req(t int64, off, n int64) Request {
	return Request{TimeNS: t, Sector: uint64(off / lsmt.SectorSize), Sectors: uint32(n / lsmt.SectorSize)}
}

// segmentEdge returns a disk offset in [from, to) where two segments of the same layer meet
// with contiguous layer offsets, so a read across it maps to two pieces but one frame.
func segmentEdge(t *testing.T, s *lsmt.Stack, from, to int64) int64 {
	t.Helper()
	segs := s.Segments()
	for i := 1; i < len(segs); i++ {
		a, b := segs[i-1], segs[i]
		off := int64(b.Offset) * lsmt.SectorSize
		if off > from && off < to && a.End() == b.Offset && a.MEnd() == b.MOffset && a.Tag == b.Tag {
			return off
		}
	}
	t.Fatalf("no segment edge in [%d, %d): the test image no longer has the shape it needs", from, to)
	return 0
}

func TestMapperFrames(t *testing.T) {
	s := threeLayers(t)
	edge := segmentEdge(t, s, 2*mib+8*kib, 10*mib)
	if n := len(s.Map(edge-32*kib, 64*kib)); n != 2 {
		t.Fatalf("read across the segment edge maps to %d pieces, want 2", n)
	}
	m, err := NewMapper(s, MapperOptions{StartNS: 1000})
	if err != nil {
		t.Fatal(err)
	}
	l0 := func(x int64) int64 { return hdr + 64*kib + x - 1*mib } // L0's big extent
	steps := []struct {
		name string
		r    Request
	}{
		{"split over three layers, one zeroed piece", req(1100, 0, 64*kib)},
		{"re-read of two layers", req(1200, 8*kib, 16*kib)},
		{"hole", req(1300, 64*kib, 64*kib)},
		{"hole then L0", req(1400, 1*mib-4*kib, 68*kib)},
		{"continues L0: merges", req(1500, 1*mib+64*kib, 64*kib)},
		{"overlaps the merged frame: only the tail is new", req(1600, 1*mib+96*kib, 64*kib)},
		{"L0 around an L1 island", req(1700, 2*mib-8*kib, 24*kib)},
		{"across a segment edge", req(1800, edge-32*kib, 64*kib)},
		{"L0 tail, L2 continues its first frame, hole", req(1900, 10*mib-4*kib, 24*kib)},
		{"past the disk's end", req(2000, 64*mib, 8*kib)},
		{"before the start", req(500, 40*kib, 4*kib)},
	}
	for _, st := range steps {
		m.Add(st.r)
	}
	want := []trace.Frame{
		{Layer: 0, Offset: hdr, Length: 16 * kib, TimeNS: 100},
		{Layer: 1, Offset: hdr, Length: 8 * kib, TimeNS: 100},
		{Layer: 2, Offset: hdr, Length: 16*kib + 16*kib, TimeNS: 100}, // grown at 1900
		{Layer: 0, Offset: hdr + 40*kib, Length: 8 * kib, TimeNS: 100},
		{Layer: 0, Offset: l0(1 * mib), Length: 160 * kib, TimeNS: 400},
		{Layer: 0, Offset: l0(2*mib - 8*kib), Length: 8 * kib, TimeNS: 700},
		{Layer: 1, Offset: hdr + 16*kib, Length: 8 * kib, TimeNS: 700},
		{Layer: 0, Offset: l0(2*mib + 8*kib), Length: 8 * kib, TimeNS: 700},
		{Layer: 0, Offset: l0(edge - 32*kib), Length: 64 * kib, TimeNS: 800},
		{Layer: 0, Offset: l0(10*mib - 4*kib), Length: 4 * kib, TimeNS: 900},
	}
	if got := m.Frames(); !reflect.DeepEqual(got, want) {
		t.Errorf("frames:\n%s\nwant:\n%s", fmtFrames(got), fmtFrames(want))
	}
	st := m.Stats()
	wantStats := Stats{
		Requests:       int64(len(steps)),
		RequestedBytes: (64 + 16 + 64 + 68 + 64 + 64 + 24 + 64 + 24 + 8 + 4) * kib,
		UnmappedBytes:  (16 + 64 + 4 + 4 + 8) * kib,
		RereadBytes:    (16 + 32 + 4) * kib,
		RecordedBytes:  (16 + 8 + 32 + 8 + 160 + 8 + 8 + 8 + 64 + 4) * kib,
		LayerBytes:     []int64{(16 + 8 + 160 + 8 + 8 + 64 + 4) * kib, 16 * kib, 32 * kib},
		Frames:         len(want),
		BitmapBytes:    3 * pageWords * 8,
	}
	if !reflect.DeepEqual(st, wantStats) {
		t.Errorf("stats:\n%+v\nwant:\n%+v", st, wantStats)
	}
	if st.RequestedBytes != st.UnmappedBytes+st.RereadBytes+st.RecordedBytes {
		t.Errorf("requested bytes %d != unmapped + re-read + recorded", st.RequestedBytes)
	}
}

func TestMapperMaxFrameLength(t *testing.T) {
	s := threeLayers(t)
	m, err := NewMapper(s, MapperOptions{MaxFrameLength: 64 * kib})
	if err != nil {
		t.Fatal(err)
	}
	for i := range int64(5) {
		m.Add(req(i, 1*mib+i*32*kib, 32*kib))
	}
	base := int64(hdr + 64*kib)
	want := []trace.Frame{
		{Layer: 0, Offset: base, Length: 64 * kib, TimeNS: 0},
		{Layer: 0, Offset: base + 64*kib, Length: 64 * kib, TimeNS: 2},
		{Layer: 0, Offset: base + 128*kib, Length: 32 * kib, TimeNS: 4},
	}
	if got := m.Frames(); !reflect.DeepEqual(got, want) {
		t.Errorf("frames:\n%s\nwant:\n%s", fmtFrames(got), fmtFrames(want))
	}
}

func TestMapperTruncates(t *testing.T) {
	s := threeLayers(t)
	m, err := NewMapper(s, MapperOptions{MaxFrames: 2})
	if err != nil {
		t.Fatal(err)
	}
	m.Add(req(1, 0, 24*kib))           // L0 16K, L1 8K: two frames, the cap
	m.Add(req(2, 1*mib, 8*kib))        // a third frame: dropped
	m.Add(req(3, 16*kib-4*kib, 4*kib)) // a re-read, neither recorded nor dropped
	m.Add(req(4, 1*mib, 16*kib))       // 8K re-read (already counted as dropped), 8K dropped
	m.Add(req(5, 24*kib, 8*kib))       // even a frame continuing L1's is dropped once truncated
	want := []trace.Frame{
		{Layer: 0, Offset: hdr, Length: 16 * kib, TimeNS: 1},
		{Layer: 1, Offset: hdr, Length: 8 * kib, TimeNS: 1},
	}
	if got := m.Frames(); !reflect.DeepEqual(got, want) {
		t.Errorf("frames:\n%s\nwant:\n%s", fmtFrames(got), fmtFrames(want))
	}
	st := m.Stats()
	if !st.Truncated || st.DroppedBytes != 24*kib || st.RereadBytes != 12*kib || st.RecordedBytes != 24*kib {
		t.Errorf("stats %+v: want truncated, 24 KiB dropped, 12 KiB re-read, 24 KiB recorded", st)
	}
	m.Reset()
	if st := m.Stats(); st.Truncated || st.Frames != 0 || st.Requests != 0 {
		t.Errorf("after Reset: %+v", st)
	}
	m.Add(req(9, 1*mib, 8*kib))
	if got := m.Frames(); len(got) != 1 || got[0].Offset != hdr+64*kib {
		t.Errorf("after Reset, frames %s", fmtFrames(got))
	}
}

func TestMapperTrace(t *testing.T) {
	m, err := NewMapper(threeLayers(t), MapperOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.Add(req(5, 0, 64*kib))
	layers := []trace.Layer{
		{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 1)), Size: 10},
		{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 2)), Size: 20},
		{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 3)), Size: 30},
	}
	if _, err := m.Trace(layers[:2], trace.Meta{}); err == nil {
		t.Error("Trace with 2 layers for a 3-layer stack succeeded")
	}
	tr, err := m.Trace(layers, trace.Meta{Runs: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.Frames) != 4 || tr.Meta.Runs != 1 || len(tr.Layers) != 3 {
		t.Fatalf("trace %+v", tr)
	}
	m.Add(req(6, 1*mib, 4*kib))
	if len(tr.Frames) != 4 {
		t.Error("the trace shares frames with the mapper")
	}
}

// TestMapperMatchesModel feeds random requests over a random stack to the mapper and to a
// naive model (a map of recorded sectors, pieces from Stack.Map) and compares the frames.
func TestMapperMatchesModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	const vsize = 8 * mib
	var layers []lsmt.StackLayer
	for range 3 {
		var ops []layerOp
		for range 40 {
			n := (1 + rng.Int64N(64)) * 4 * kib
			ops = append(ops, layerOp{off: rng.Int64N((vsize-n)/4096) * 4096, n: n, discard: rng.IntN(6) == 0})
		}
		layers = append(layers, committed(t, vsize, ops...))
	}
	s, err := lsmt.NewStack(layers)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewMapper(s, MapperOptions{MaxFrameLength: 48 * kib})
	if err != nil {
		t.Fatal(err)
	}
	model := newModelMapper(len(layers), 48*kib)
	for i := range 3000 {
		n := (1 + rng.Int64N(64)) * lsmt.SectorSize
		off := rng.Int64N((vsize+64*kib-n)/lsmt.SectorSize) * lsmt.SectorSize
		r := req(int64(i), off, n)
		m.Add(r)
		model.add(s, r)
	}
	if got := m.Frames(); !reflect.DeepEqual(got, model.frames) {
		t.Fatalf("mapper and model differ: %d vs %d frames", len(got), len(model.frames))
	}
	if st := m.Stats(); st.RereadBytes == 0 || st.RecordedBytes == 0 || st.UnmappedBytes == 0 {
		t.Fatalf("the workload misses a case: %+v", st)
	}
}

type modelMapper struct {
	seen   []map[int64]bool // per layer, by sector
	last   []int
	frames []trace.Frame
	maxLen int64
}

func newModelMapper(layers int, maxLen int64) *modelMapper {
	m := &modelMapper{maxLen: maxLen}
	for range layers {
		m.seen = append(m.seen, map[int64]bool{})
		m.last = append(m.last, -1)
	}
	return m
}

func (m *modelMapper) add(s *lsmt.Stack, r Request) {
	for _, p := range s.Map(int64(r.Sector)*lsmt.SectorSize, int64(r.Sectors)*lsmt.SectorSize) {
		if p.Zeroed {
			continue
		}
		// Sectors first read in one unbroken run of a piece stay together (the mapper never
		// splits a piece); only a run's first sector asks whether the latest frame may grow.
		inRun := false
		for x := p.LayerOffset; x < p.LayerOffset+p.Length; x += lsmt.SectorSize {
			if m.seen[p.Layer][x] {
				inRun = false
				continue
			}
			m.seen[p.Layer][x] = true
			i := m.last[p.Layer]
			if inRun || i >= 0 && m.frames[i].End() == x && m.frames[i].Length < m.maxLen {
				m.frames[i].Length += lsmt.SectorSize
			} else {
				m.last[p.Layer] = len(m.frames)
				m.frames = append(m.frames, trace.Frame{Layer: p.Layer, Offset: x, Length: lsmt.SectorSize, TimeNS: r.TimeNS})
			}
			inRun = true
		}
	}
}

func fmtFrames(fs []trace.Frame) string {
	var b bytes.Buffer
	for _, f := range fs {
		fmt.Fprintf(&b, "  L%d [%d, +%d) t=%d\n", f.Layer, f.Offset, f.Length, f.TimeNS)
	}
	return b.String()
}

// FuzzMapperAdd feeds arbitrary requests, as a misbehaving capture might: nothing may panic,
// and every requested byte is accounted for exactly once.
func FuzzMapperAdd(f *testing.F) {
	s := threeLayers(f)
	f.Add(uint64(0), uint32(128), uint64(2048), uint32(64))
	f.Add(uint64(1<<63), uint32(1<<32-1), uint64(1<<54), uint32(8))
	f.Add(uint64(20470), uint32(40000), uint64(16), uint32(1))
	f.Fuzz(func(t *testing.T, s1 uint64, n1 uint32, s2 uint64, n2 uint32) {
		m, err := NewMapper(s, MapperOptions{MaxFrames: 3, MaxFrameLength: 8 * kib})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []Request{{1, s1, n1}, {2, s2, n2}, {3, s1, n1}} {
			m.Add(r)
		}
		st := m.Stats()
		if st.RequestedBytes != st.UnmappedBytes+st.RereadBytes+st.RecordedBytes+st.DroppedBytes {
			t.Fatalf("bytes unaccounted for: %+v", st)
		}
		if len(m.Frames()) > 3 {
			t.Fatalf("%d frames over the cap", len(m.Frames()))
		}
	})
}
