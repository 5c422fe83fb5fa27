package replayer

import (
	"context"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/trace"
)

// TestReplayOnNextVersion replays a trace recorded on image v1 (base, mid,
// top) on a v2 that keeps base and mid, replaces top and adds a layer: the
// frames of the shared layers fill the cache, those of the old top are
// skipped and counted, and v2's new layers are not touched.
func TestReplayOnNextVersion(t *testing.T) {
	base, mid := newTestBlob(t, 11, 1<<20), newTestBlob(t, 12, 1<<20)
	topV1, topV2, extra := newTestBlob(t, 13, 1<<20), newTestBlob(t, 14, 1<<20), newTestBlob(t, 15, 1<<20)
	v1 := []testBlob{base, mid, topV1}
	v2 := []testBlob{base, mid, topV2, extra}
	tr := &trace.Trace{Meta: trace.Meta{Source: trace.SourceCLI, Runs: 1}}
	for _, b := range v1 {
		tr.Layers = append(tr.Layers, trace.Layer{Digest: b.dgst, Size: b.blob.Size()})
	}
	for i := range 3 { // each layer: two reads, in an interleaved order
		tr.Frames = append(tr.Frames,
			trace.Frame{Layer: i, Offset: 64 << 10, Length: 16 << 10},
			trace.Frame{Layer: 2 - i, Offset: 512 << 10, Length: 8 << 10})
	}
	f := &memFetcher{blobs: map[digest.Digest][]byte{}}
	for _, b := range append(v1, topV2, extra) {
		f.blobs[b.dgst] = b.bytes
	}
	cache, err := blobcache.Open(t.TempDir(), blobcache.Options{BlockSize: 4096, RefillSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	var layers []Layer
	for _, b := range v2 {
		cb, err := cache.Blob(b.dgst, int64(len(b.bytes)), f)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, b.layer(cb))
	}
	p, err := NewPlan(tr, layers, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s := p.Stats; s.Frames != 6 || s.Matched != 4 || s.Unmatched != 2 || s.LayersMatched != 2 || s.OutOfRange != 0 {
		t.Fatalf("plan stats %+v: want 4 of 6 frames matched (base, mid), 2 skipped (old top)", s)
	}
	var stats Stats
	if err := p.Run(context.Background(), layers, Options{}, &stats); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		got := l.Blob.(*blobcache.Blob).Stats().CachedBytes
		if shared := i < 2; shared != (got > 0) {
			t.Errorf("layer %d (shared with v1: %v) has %d bytes cached", i, shared, got)
		}
	}
	// What was prefetched is what the frames of the shared layers cover.
	for _, fr := range tr.Frames {
		if fr.Layer > 1 {
			continue
		}
		start, end, err := layers[fr.Layer].Ranges.BlobRange(fr.Offset, fr.Length)
		if err != nil {
			t.Fatal(err)
		}
		before := f.fetched.Load()
		buf := make([]byte, end-start)
		if _, err := layers[fr.Layer].Blob.(*blobcache.Blob).ReadAt(buf, start); err != nil {
			t.Fatal(err)
		}
		if f.fetched.Load() != before {
			t.Errorf("frame %+v was not prefetched", fr)
		}
	}
}
