package replayer

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/obdtrace/obdtrace/trace"
)

// expectRecorder logs the calls a Prefetcher that is also an Expecter
// gets, in order.
type expectRecorder struct {
	mu     sync.Mutex
	events []string
}

func (r *expectRecorder) log(e string) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *expectRecorder) Prefetch(context.Context, int64, int64) error { r.log("prefetch"); return nil }
func (r *expectRecorder) Expect(int64, int64)                          { r.log("expect") }
func (r *expectRecorder) EndExpect()                                   { r.log("end") }

// TestRunEndsExpectBeforeFullFetch: the cache hears the plan before the
// trace phase and its end once, after the trace phase and before any
// full-fetch prefetch, so a full fetch does not pause its readahead; a
// cancelled replay ends it too.
func TestRunEndsExpectBeforeFullFetch(t *testing.T) {
	a := newTestBlob(t, 7, 1<<20)
	rec := &expectRecorder{}
	layers := []Layer{a.layer(rec)}
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: a.dgst}},
		Frames: []trace.Frame{{Offset: 0, Length: 4096}, {Offset: 512 << 10, Length: 4096}},
	}
	p, err := NewPlan(tr, layers, Options{})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{FullFetch: true, FullFetchChunk: 256 << 10}
	if err := p.Run(context.Background(), layers, opts, &Stats{}); err != nil {
		t.Fatal(err)
	}
	nr := len(p.Ranges)
	var want []string
	for range nr {
		want = append(want, "expect")
	}
	for range nr {
		want = append(want, "prefetch")
	}
	want = append(want, "end")
	for range fullFetchRanges(layers, opts.FullFetchChunk) {
		want = append(want, "prefetch")
	}
	if !slices.Equal(rec.events, want) {
		t.Errorf("events %v, want %v", rec.events, want)
	}

	rec.events = nil
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Run(ctx, layers, opts, &Stats{}); err == nil {
		t.Fatal("a cancelled replay reported success")
	}
	if n := slices.Index(rec.events, "end"); n < 0 || slices.Contains(rec.events[n+1:], "end") {
		t.Errorf("cancelled replay: events %v, want one end", rec.events)
	}
}
