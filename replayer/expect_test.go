package replayer

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

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

// TestTracePhaseLastsAsLongAsTheStartup: the trace phase outlasts its
// fetching until the recorded start-up's last first access (here 1 s
// after Run began), at most Options.StartupHold; TraceDone still says when
// the fetching ended; a cancelled replay does not wait. Upper bounds are
// the 1 s span itself, which a held phase cannot end before.
func TestTracePhaseLastsAsLongAsTheStartup(t *testing.T) {
	const span = time.Second
	a := newTestBlob(t, 8, 1<<20)
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: a.dgst}},
		Frames: []trace.Frame{{Offset: 0, Length: 4096}, {Offset: 512 << 10, Length: 4096, TimeNS: int64(span)}},
	}
	for _, c := range []struct {
		hold     time.Duration
		min, max time.Duration
	}{
		{0, span, time.Hour}, // the default allows the whole span
		{200 * time.Millisecond, 200 * time.Millisecond, span},
		{-1, 0, span},
	} {
		rec := &expectRecorder{}
		layers := []Layer{a.layer(rec)}
		p, err := NewPlan(tr, layers, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Stats.StartupSpan != span {
			t.Fatalf("StartupSpan %v, want %v", p.Stats.StartupSpan, span)
		}
		var st Stats
		begin := time.Now()
		if err := p.Run(context.Background(), layers, Options{StartupHold: c.hold}, &st); err != nil {
			t.Fatal(err)
		}
		took := time.Since(begin)
		if took < c.min || took >= c.max {
			t.Errorf("hold %v: the trace phase took %v, want %v to %v", c.hold, took, c.min, c.max)
		}
		if done := time.Duration(st.TraceDone.Load()); done <= 0 || done > took || (c.hold == 0 && done >= span) {
			t.Errorf("hold %v: TraceDone %v, want the end of the fetching (the phase took %v)", c.hold, done, took)
		}
		if n := len(rec.events); n == 0 || rec.events[n-1] != "end" {
			t.Errorf("hold %v: events %v, want the end last", c.hold, rec.events)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	layers := []Layer{a.layer(&expectRecorder{})}
	p, err := NewPlan(tr, layers, Options{})
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	if err := p.Run(ctx, layers, Options{}, &Stats{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a replay cancelled at 50 ms returned %v, want context.DeadlineExceeded", err)
	}
	if took := time.Since(begin); took >= span {
		t.Errorf("a replay cancelled at 50 ms took %v, as long as the hold", took)
	}
}
