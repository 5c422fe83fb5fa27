package lsmt

import (
	"bytes"
	"io"
	"math/rand/v2"
	"sort"
	"testing"
)

// benchLayer is an in-memory StackLayer for benchmarks.
type benchLayer struct {
	segs []Segment
	src  io.ReaderAt
}

func (b benchLayer) Index() []Segment    { return b.segs }
func (b benchLayer) Source() io.ReaderAt { return b.src }
func (b benchLayer) VirtualSize() int64  { return 64 << 30 }

// randomLayers makes n layers of perLayer non-overlapping segments of 8 to
// 128 sectors spread over the first span sectors of the disk, mapped into a
// source of srcSectors sectors.
func randomLayers(seed uint64, n, perLayer int, span, srcSectors uint64, src io.ReaderAt) []StackLayer {
	rng := rand.New(rand.NewPCG(seed, 1))
	layers := make([]StackLayer, n)
	for i := range layers {
		starts := make([]uint64, perLayer)
		for j := range starts {
			starts[j] = rng.Uint64N(span/uint64(perLayer)) + uint64(j)*(span/uint64(perLayer))
		}
		sort.Slice(starts, func(a, b int) bool { return starts[a] < starts[b] })
		segs := make([]Segment, 0, perLayer)
		for j, s := range starts {
			length := 8 + rng.Uint64N(121)
			if j+1 < len(starts) {
				length = min(length, starts[j+1]-s)
			}
			if length == 0 {
				continue
			}
			segs = append(segs, Segment{Offset: s, Length: uint32(length),
				MOffset: 8 + rng.Uint64N(srcSectors-8-length), Zeroed: rng.IntN(50) == 0})
		}
		layers[i] = benchLayer{segs: segs, src: src}
	}
	return layers
}

// The reference workload: a 10-layer stack whose merged index holds
// about a million segments over a 64 GiB disk.
func millionSegmentLayers() []StackLayer {
	return randomLayers(1, 10, 110_000, 64<<30/SectorSize, 1<<20, bytes.NewReader(nil))
}

func BenchmarkNewStack(b *testing.B) {
	layers := millionSegmentLayers()
	b.ReportAllocs()
	var s *Stack
	for b.Loop() {
		s, _ = NewStack(layers)
	}
	b.ReportMetric(float64(len(s.Segments())), "segments")
}

func BenchmarkMap(b *testing.B) {
	s, _ := NewStack(millionSegmentLayers())
	rng := rand.New(rand.NewPCG(2, 2))
	offs := make([]int64, 1<<16)
	for i := range offs {
		offs[i] = rng.Int64N(64<<30-1<<20) &^ 4095
	}
	buf := make([]Piece, 0, 64)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		buf = s.AppendMap(buf[:0], offs[i&(len(offs)-1)], 128<<10)
		i++
	}
	b.ReportMetric(float64(len(s.Segments())), "segments")
}

func BenchmarkStackReadAt64K(b *testing.B) {
	const srcSize = 256 << 20
	src := make([]byte, srcSize)
	for i := range src {
		src[i] = byte(i * 7)
	}
	// 10 layers densely covering a 1 GiB range, data in memory (a warm cache).
	layers := randomLayers(3, 10, 20_000, 1<<30/SectorSize, srcSize/SectorSize, bytes.NewReader(src))
	s, _ := NewStack(layers)
	rng := rand.New(rand.NewPCG(4, 4))
	p := make([]byte, 64<<10)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		s.ReadAt(p, rng.Int64N(1<<30-int64(len(p)))&^4095)
	}
}
