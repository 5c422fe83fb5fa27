package replayer

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/trace"
)

// testBlob is a real layer blob (LSMT in ZFile in tar) built in memory.
type testBlob struct {
	bytes []byte
	blob  *lsmt.Blob
	dgst  digest.Digest
}

func newTestBlob(t testing.TB, seed uint64, size int64) testBlob {
	t.Helper()
	dir := t.TempDir()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "d"), filepath.Join(dir, "i"), lsmt.WritableOptions{VirtualSize: size})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rng := rand.New(rand.NewPCG(seed, seed))
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(rng.Uint32() & 0x0F) // compressible but not trivially
	}
	if _, err := w.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	var committed, z, blob bytes.Buffer
	if err := w.Commit(&committed, lsmt.CommitArgs{}); err != nil {
		t.Fatal(err)
	}
	zw, err := zfile.NewWriter(&z, zfile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(committed.Bytes())
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tarwrap.Write(&blob, "overlaybd.commit", &z, int64(z.Len())); err != nil {
		t.Fatal(err)
	}
	b, err := lsmt.OpenBlob(bytes.NewReader(blob.Bytes()), int64(blob.Len()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return testBlob{bytes: blob.Bytes(), blob: b, dgst: digest.FromBytes(blob.Bytes())}
}

func (tb testBlob) layer(p Prefetcher) Layer {
	return Layer{Digest: tb.dgst, LayerSize: tb.blob.Size(), BlobSize: int64(len(tb.bytes)), Ranges: tb.blob, Blob: p}
}

// recorder notes every Prefetch call; it stands in for the cache only where
// a test checks what the planner asked for.
type recorder struct {
	mu    sync.Mutex
	calls []Range
	layer int
}

func (r *recorder) Prefetch(_ context.Context, off, n int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, Range{Layer: r.layer, Start: off, End: off + n})
	return nil
}

func TestPlanMatchesByDigest(t *testing.T) {
	a, b := newTestBlob(t, 1, 1<<20), newTestBlob(t, 2, 1<<20)
	layers := []Layer{a.layer(&recorder{}), b.layer(&recorder{})}
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: b.dgst}, {Digest: digest.FromString("gone")}, {Digest: a.dgst}},
		Frames: []trace.Frame{
			{Layer: 0, Offset: 8192, Length: 4096},       // b
			{Layer: 1, Offset: 0, Length: 4096},          // unknown layer
			{Layer: 2, Offset: 4096, Length: 4096},       // a
			{Layer: 2, Offset: 1 << 40, Length: 4096},    // beyond the layer
			{Layer: 0, Offset: 8192 + 1024, Length: 512}, // re-read of b, inside the first range
		},
	}
	p, err := NewPlan(tr, layers, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := p.Stats
	if s.Frames != 5 || s.Matched != 3 || s.Unmatched != 1 || s.OutOfRange != 1 || s.LayersMatched != 2 {
		t.Fatalf("stats %+v", s)
	}
	if len(p.Ranges) != 2 || p.Ranges[0].Layer != 1 || p.Ranges[1].Layer != 0 {
		t.Fatalf("ranges %+v, want layer 1 (b) then layer 0 (a)", p.Ranges)
	}
	want0, want1, _ := b.blob.BlobRange(8192, 4096)
	if p.Ranges[0].Start != want0 || p.Ranges[0].End != want1 {
		t.Fatalf("range %+v, want [%d, %d)", p.Ranges[0], want0, want1)
	}
}

func TestPlanCoalescesAndKeepsOrder(t *testing.T) {
	a := newTestBlob(t, 3, 4<<20)
	layers := []Layer{a.layer(&recorder{})}
	var frames []trace.Frame
	for i := range 64 { // 64 sequential 16 KiB reads: one run
		frames = append(frames, trace.Frame{Offset: int64(i) * 16 << 10, Length: 16 << 10})
	}
	frames = append(frames, trace.Frame{Offset: 3 << 20, Length: 4096}) // a jump far away
	p, err := NewPlan(&trace.Trace{Frames: frames}, layers, Options{MergeSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if p.Stats.LayersMatched != 1 {
		t.Fatalf("positional match failed: %+v", p.Stats)
	}
	for i, r := range p.Ranges {
		if r.End-r.Start > 256<<10+64<<10 {
			t.Fatalf("range %d is %d bytes, beyond the merge size", i, r.End-r.Start)
		}
		if i > 0 && i < len(p.Ranges)-1 && r.Start < p.Ranges[i-1].Start {
			t.Fatalf("ranges out of first-access order: %+v", p.Ranges)
		}
	}
	if len(p.Ranges) < 2 || len(p.Ranges) > 20 {
		t.Fatalf("%d ranges for one sequential run and a jump: %+v", len(p.Ranges), p.Ranges)
	}
	last := p.Ranges[len(p.Ranges)-1]
	if s, _, _ := a.blob.BlobRange(3<<20, 4096); last.Start != s {
		t.Fatalf("the jump is not last: %+v", last)
	}
}

func TestPlanNoMatch(t *testing.T) {
	a := newTestBlob(t, 4, 1<<20)
	tr := &trace.Trace{Layers: []trace.Layer{{Digest: digest.FromString("other")}}, Frames: []trace.Frame{{Length: 4096}}}
	if _, err := NewPlan(tr, []Layer{a.layer(&recorder{})}, Options{}); !errors.Is(err, ErrNoMatch) {
		t.Fatalf("err %v, want ErrNoMatch", err)
	}
}

// memFetcher serves blobs from memory: the registry's stand-in for tests of
// the replayer's use of the (real) cache.
type memFetcher struct {
	blobs   map[digest.Digest][]byte
	fetched atomic.Int64
}

func (m *memFetcher) FetchRange(_ context.Context, d digest.Digest, off int64, p []byte) error {
	copy(p, m.blobs[d][off:])
	m.fetched.Add(int64(len(p)))
	return nil
}

func TestRunFillsCache(t *testing.T) {
	a, b := newTestBlob(t, 5, 2<<20), newTestBlob(t, 6, 2<<20)
	f := &memFetcher{blobs: map[digest.Digest][]byte{a.dgst: a.bytes, b.dgst: b.bytes}}
	cache, err := blobcache.Open(t.TempDir(), blobcache.Options{BlockSize: 4096, RefillSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	var layers []Layer
	for _, tb := range []testBlob{a, b} {
		cb, err := cache.Blob(tb.dgst, int64(len(tb.bytes)), f)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, tb.layer(cb))
	}
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: a.dgst}, {Digest: b.dgst}},
		Frames: []trace.Frame{{Layer: 1, Offset: 100 << 10, Length: 64 << 10}, {Layer: 0, Offset: 1 << 20, Length: 8 << 10}},
	}
	p, err := NewPlan(tr, layers, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var stats Stats
	if err := p.Run(context.Background(), layers, Options{}, &stats); err != nil {
		t.Fatal(err)
	}
	if stats.RangesDone.Load() != int64(len(p.Ranges)) || stats.RangesFailed.Load() != 0 || stats.TraceDone.Load() == 0 {
		t.Fatalf("stats done %d failed %d of %d", stats.RangesDone.Load(), stats.RangesFailed.Load(), len(p.Ranges))
	}
	// The cache was told the whole plan (Expecter): every range's blocks.
	var planned int64
	for _, r := range p.Ranges {
		planned += (r.End+4095)/4096*4096 - r.Start/4096*4096
	}
	if got := cache.Stats().PlannedBytes; got != planned {
		t.Errorf("cache was told of %d planned bytes, want %d", got, planned)
	}
	// Reading the traced layer bytes now fetches nothing more.
	before := f.fetched.Load()
	for _, fr := range tr.Frames {
		img := layers[fr.Layer]
		src := img.Ranges.(*lsmt.Blob)
		start, end, _ := src.BlobRange(fr.Offset, fr.Length)
		buf := make([]byte, end-start)
		if _, err := img.Blob.(*blobcache.Blob).ReadAt(buf, start); err != nil {
			t.Fatal(err)
		}
	}
	if got := f.fetched.Load(); got != before {
		t.Fatalf("reading prefetched ranges fetched %d more bytes", got-before)
	}

	// The full-fetch phase makes every blob complete.
	full := Options{FullFetch: true, FullFetchChunk: 256 << 10}
	if err := p.Run(context.Background(), layers, full, &stats); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if cb := l.Blob.(*blobcache.Blob); cb.Stats().CachedBytes != cb.Size() {
			t.Fatalf("layer %d: %d of %d bytes cached after the full fetch", i, cb.Stats().CachedBytes, cb.Size())
		}
	}
}

func TestRunBandwidthCap(t *testing.T) {
	a := newTestBlob(t, 7, 4<<20)
	rec := &recorder{}
	layers := []Layer{a.layer(rec)}
	p := &Plan{Ranges: []Range{{Start: 0, End: 1 << 20}, {Start: 1 << 20, End: 2 << 20}}}
	var stats Stats
	begin := time.Now()
	// 2 MiB at 4 MiB/s with a 1 MiB burst takes at least a quarter second.
	if err := p.Run(context.Background(), layers, Options{BytesPerSecond: 4 << 20}, &stats); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(begin); d < 200*time.Millisecond {
		t.Fatalf("2 MiB under a 4 MiB/s cap took only %v", d)
	}
	if stats.Bytes.Load() != 2<<20 {
		t.Fatalf("bytes %d", stats.Bytes.Load())
	}
}

func TestRunStopsWithContext(t *testing.T) {
	a := newTestBlob(t, 8, 1<<20)
	p := &Plan{Ranges: []Range{{Start: 0, End: 4 << 20}}}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var stats Stats
	err := p.Run(ctx, []Layer{a.layer(&recorder{})}, Options{BytesPerSecond: 1}, &stats)
	if !errors.Is(err, context.Canceled) || stats.RangesDone.Load() != 0 {
		t.Fatalf("err %v done %d", err, stats.RangesDone.Load())
	}
}
