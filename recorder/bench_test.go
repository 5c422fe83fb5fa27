package recorder

import (
	"bytes"
	"io"
	"math/rand/v2"
	"runtime"
	"sort"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/lsmt"
)

// benchLayer is an in-memory lsmt.StackLayer.
type benchLayer struct{ segs []lsmt.Segment }

func (b benchLayer) Index() []lsmt.Segment { return b.segs }
func (b benchLayer) Source() io.ReaderAt   { return bytes.NewReader(nil) }
func (b benchLayer) VirtualSize() int64    { return 64 << 30 }

// randomLayers makes n layers of perLayer non-overlapping segments of 8 to 128 sectors spread
// over the first span sectors of the disk (the generator of lsmt's benchmarks). With
// committedLayout the data sits in logical order as lsmt.Commit lays it out, so a sequential
// read of the disk is sequential in each layer; otherwise each segment maps to a random place
// in a layer byte space of srcSectors, the worst case for the dedup bitmaps' caches.
func randomLayers(seed uint64, n, perLayer int, span, srcSectors uint64, committedLayout bool) []lsmt.StackLayer {
	rng := rand.New(rand.NewPCG(seed, 1))
	layers := make([]lsmt.StackLayer, n)
	for i := range layers {
		starts := make([]uint64, perLayer)
		for j := range starts {
			starts[j] = rng.Uint64N(span/uint64(perLayer)) + uint64(j)*(span/uint64(perLayer))
		}
		sort.Slice(starts, func(a, b int) bool { return starts[a] < starts[b] })
		segs := make([]lsmt.Segment, 0, perLayer)
		next := uint64(lsmt.HeaderSize / lsmt.SectorSize)
		for j, s := range starts {
			length := 8 + rng.Uint64N(121)
			if j+1 < len(starts) {
				length = min(length, starts[j+1]-s)
			}
			if length == 0 {
				continue
			}
			seg := lsmt.Segment{Offset: s, Length: uint32(length),
				MOffset: 8 + rng.Uint64N(srcSectors-8-length), Zeroed: rng.IntN(50) == 0}
			if committedLayout {
				seg.MOffset = next
				next += length
			}
			segs = append(segs, seg)
		}
		layers[i] = benchLayer{segs: segs}
	}
	return layers
}

// startupRequests makes n requests of 4 to 128 KiB in sequential runs of 1 to 64 requests,
// each run starting at a random 4 KiB-aligned offset of a 64 GiB disk, as readahead over the
// files a container opens looks.
func startupRequests(seed uint64, n int) []Request {
	rng := rand.New(rand.NewPCG(seed, 3))
	reqs := make([]Request, 0, n)
	t := int64(0)
	for len(reqs) < n {
		sector := rng.Uint64N((64<<30-1<<30)/4096) * 8
		for range 1 + rng.IntN(64) {
			sectors := uint32(1+rng.IntN(32)) * 8
			t += 1 + rng.Int64N(20_000)
			reqs = append(reqs, Request{TimeNS: t, Sector: sector, Sectors: sectors})
			sector += uint64(sectors)
		}
	}
	return reqs[:n]
}

// BenchmarkMapperAdd maps start-up-like requests through a 10-layer stack of about a million
// merged segments over 64 GiB, layers laid out as committed ones are.
func BenchmarkMapperAdd(b *testing.B) {
	benchmarkMapper(b, randomLayers(1, 10, 110_000, 64<<30/lsmt.SectorSize, 1<<26, true))
}

// BenchmarkMapperAddScattered is the worst case: every segment maps to a random place in a
// 32 GiB layer byte space, so each piece of a request touches a cold part of the bitmaps.
func BenchmarkMapperAddScattered(b *testing.B) {
	benchmarkMapper(b, randomLayers(1, 10, 110_000, 64<<30/lsmt.SectorSize, 1<<26, false))
}

// benchmarkMapper feeds a 1M-request stream to a mapper, resetting it each time the stream
// restarts (a cost included in the figures). Besides wall time it reports the thread's CPU
// time per event, which a busy shared machine does not inflate.
func benchmarkMapper(b *testing.B, layers []lsmt.StackLayer) {
	s, err := lsmt.NewStack(layers)
	if err != nil {
		b.Fatal(err)
	}
	m, err := NewMapper(s, MapperOptions{MaxFrames: 1 << 22})
	if err != nil {
		b.Fatal(err)
	}
	reqs := startupRequests(2, 1<<20)
	for _, r := range reqs { // grow every buffer first: the steady state is what matters
		m.Add(r)
	}
	st := m.Stats()
	m.Reset()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu0 := threadCPU(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if i == len(reqs) {
			m.Reset()
			i = 0
		}
		m.Add(reqs[i])
		i++
	}
	cpu := threadCPU(b) - cpu0
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(b.N)/cpu.Seconds(), "events/cpu-s")
	b.ReportMetric(float64(len(s.Segments())), "segments")
	b.ReportMetric(float64(st.Frames)/float64(len(reqs)), "frames/event")
}

// threadCPU is the CPU time the calling OS thread has used.
func threadCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
