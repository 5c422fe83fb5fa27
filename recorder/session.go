package recorder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/trace"
)

// Session records one image device: an eBPF capture on the device, each
// read request mapped through the image's stack as it arrives. It never
// sits in the device's data path; stopping it detaches the capture.
type Session struct {
	capture *bpf.Capture
	mapper  *Mapper
	started time.Time
	startNS int64
	done    chan error
	cancel  context.CancelFunc
}

// SessionOptions tune a recording session.
type SessionOptions struct {
	Mapper MapperOptions
	// Capture options; Devices is set by Start.
	Capture bpf.Options
}

// Start begins recording reads of dev, the device presenting stack.
func Start(stack *lsmt.Stack, dev bpf.Dev, opts SessionOptions) (*Session, error) {
	startNS, err := monotonicNow()
	if err != nil {
		return nil, err
	}
	opts.Mapper.StartNS = startNS
	m, err := NewMapper(stack, opts.Mapper)
	if err != nil {
		return nil, err
	}
	opts.Capture.Devices = []bpf.Dev{dev}
	c, err := bpf.Open(opts.Capture)
	if err != nil {
		return nil, fmt.Errorf("recorder: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Session{capture: c, mapper: m, started: time.Now(), startNS: startNS, done: make(chan error, 1), cancel: cancel}
	go func() { s.done <- s.drain(ctx) }()
	return s, nil
}

// drain feeds every event to the mapper until the capture is detached and
// its ring is empty.
func (s *Session) drain(ctx context.Context) error {
	var ev bpf.Event
	for {
		err := s.capture.Read(ctx, &ev)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if ev.Kind != bpf.KindIssue {
			continue
		}
		s.mapper.Add(Request{TimeNS: int64(ev.Timestamp), Sector: ev.Sector, Sectors: ev.Sectors})
	}
}

// Result is what a stopped session recorded.
type Result struct {
	Frames   []trace.Frame
	Stats    Stats
	Lost     uint64 // events the ring buffer had no room for
	Duration time.Duration
	Started  time.Time
}

// Stop detaches the capture, maps what is still in the ring and returns
// the recording.
func (s *Session) Stop() (*Result, error) {
	detachErr := s.capture.Detach()
	drainErr := <-s.done
	s.cancel()
	lost, lostErr := s.capture.Lost()
	closeErr := s.capture.Close()
	if err := errors.Join(detachErr, drainErr, lostErr, closeErr); err != nil {
		return nil, fmt.Errorf("recorder: stop capture: %w", err)
	}
	return &Result{Frames: s.mapper.Frames(), Stats: s.mapper.Stats(), Lost: lost,
		Duration: time.Since(s.started), Started: s.started}, nil
}

// Trace builds a trace from a result, the stack's layers (bottom first)
// and metadata; Meta.Start and Duration are filled in from the result.
func (r *Result) Trace(layers []trace.Layer, meta trace.Meta) (*trace.Trace, error) {
	meta.Start, meta.Duration = r.Started, r.Duration
	t := &trace.Trace{Layers: layers, Meta: meta, Frames: r.Frames}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("recorder: %w", err)
	}
	return t, nil
}

func monotonicNow() (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("recorder: clock: %w", err)
	}
	return ts.Nano(), nil
}
