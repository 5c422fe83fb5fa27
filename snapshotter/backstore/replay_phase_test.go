package backstore

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/replayer"
)

// recordingLimiter stands in for the device (the real one is covered by
// device.TestLimitReadAhead): it records the limit's changes.
type recordingLimiter struct {
	calls []bool
	err   error
}

func (l *recordingLimiter) LimitReadAhead(on bool) error {
	l.calls = append(l.calls, on)
	return l.err
}

// expectingBlob records what the replayer tells a layer's cache.
type expectingBlob struct{ expects, ends int }

func (*expectingBlob) Prefetch(context.Context, int64, int64) error { return nil }
func (b *expectingBlob) Expect(int64, int64)                        { b.expects++ }
func (b *expectingBlob) EndExpect()                                 { b.ends++ }

// TestReadAheadLimitedInTracePhase: the limit goes on at the trace phase's
// first Expect and off after the last layer's EndExpect, once each; the
// caches still get every call; layers without a plan are left as they are;
// a device that refuses is no reason to stop the replay.
func TestReadAheadLimitedInTracePhase(t *testing.T) {
	a, b := &expectingBlob{}, &expectingBlob{}
	lim := &recordingLimiter{}
	layers := limitReadAheadInTracePhase([]replayer.Layer{{Blob: a}, {Blob: localLayer{}}, {Blob: b}}, lim, zerolog.Nop())
	if _, ok := layers[1].Blob.(localLayer); !ok {
		t.Errorf("a layer without Expect was wrapped: %T", layers[1].Blob)
	}
	ea, eb := layers[0].Blob.(replayer.Expecter), layers[2].Blob.(replayer.Expecter)
	ea.Expect(0, 10)
	ea.Expect(20, 10)
	eb.Expect(0, 10)
	if !slices.Equal(lim.calls, []bool{true}) {
		t.Fatalf("limit changes %v in the trace phase, want [true]", lim.calls)
	}
	ea.EndExpect()
	if !slices.Equal(lim.calls, []bool{true}) {
		t.Fatalf("limit changes %v with one layer still in its trace phase, want [true]", lim.calls)
	}
	eb.EndExpect()
	if !slices.Equal(lim.calls, []bool{true, false}) {
		t.Fatalf("limit changes %v after the trace phase, want [true false]", lim.calls)
	}
	if a.expects != 2 || a.ends != 1 || b.expects != 1 || b.ends != 1 {
		t.Errorf("caches got %+v and %+v, want every Expect and EndExpect passed on", *a, *b)
	}

	// A second replay over a device that refuses: the calls still pass.
	lim = &recordingLimiter{err: errors.New("refused")}
	layers = limitReadAheadInTracePhase([]replayer.Layer{{Blob: a}}, lim, zerolog.Nop())
	layers[0].Blob.(replayer.Expecter).Expect(0, 1)
	layers[0].Blob.(replayer.Expecter).EndExpect()
	if !slices.Equal(lim.calls, []bool{true, false}) || a.expects != 3 || a.ends != 2 {
		t.Errorf("refusing device: limit changes %v, cache %+v", lim.calls, *a)
	}
}
