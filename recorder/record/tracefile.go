package record

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/trace"
)

// traceName is the trace file's name: the .pb suffix asks the snapshotter
// for this project's protobuf form, which names every layer by digest.
const traceName = "trace.pb"

// pollInterval is how often the trace files are checked.
const pollInterval = 100 * time.Millisecond

// traceFile is one recording's files in the snapshotter's protocol
// (upstream's): the trace path, empty until written; <path>.lock, present
// while recording (deleting it stops the recording); <path>.ok, created once
// the trace is complete.
type traceFile string

// newTraceFile makes a private directory under dir ("" = the system's
// temporary directory) holding an empty trace file.
func newTraceFile(dir string) (traceFile, error) {
	d, err := os.MkdirTemp(dir, "obd-record-")
	if err != nil {
		return "", fmt.Errorf("record: trace directory: %w", err)
	}
	p, err := filepath.Abs(filepath.Join(d, traceName))
	if err == nil {
		err = os.WriteFile(p, nil, 0o644)
	}
	if err != nil {
		os.RemoveAll(d)
		return "", fmt.Errorf("record: trace file: %w", err)
	}
	return traceFile(p), nil
}

func (f traceFile) lock() string { return string(f) + ".lock" }
func (f traceFile) ok() string   { return string(f) + ".ok" }

// remove deletes the directory the trace file was made in.
func (f traceFile) remove() error { return os.RemoveAll(filepath.Dir(string(f))) }

// recording tells whether the snapshotter has started recording.
func (f traceFile) recording() bool {
	_, err := os.Stat(f.lock())
	return err == nil
}

// stopRecording asks the snapshotter to stop recording.
func (f traceFile) stopRecording() error {
	if err := os.Remove(f.lock()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("record: stop the recording: %w", err)
	}
	return nil
}

// wait waits until the trace is complete, for at most timeout. Only the
// timeout running out means there is no trace; ctx ending (the caller's
// own deadline included) is returned as ctx's error.
func (f traceFile) wait(ctx context.Context, timeout time.Duration) error {
	expired := time.NewTimer(timeout)
	defer expired.Stop()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		if _, err := os.Stat(f.ok()); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("record: wait for the trace: %w", context.Cause(ctx))
		case <-expired.C:
			return fmt.Errorf("%w: no %s %v after the container stopped; the snapshotter's log says why",
				ErrNoTrace, f.ok(), timeout)
		case <-tick.C:
		}
	}
}

// read reads the complete trace and the recording's statistics. A .ok
// file that holds no statistics (upstream writes it empty) or unreadable
// ones leaves them unknown: the trace is complete either way.
func (f traceFile) read() (*trace.Trace, backstore.RecordingStats, error) {
	t, err := recorder.ReadTraceFile(string(f), nil)
	if err != nil {
		return nil, backstore.RecordingStats{}, fmt.Errorf("%w: %w", ErrNoTrace, err)
	}
	st, err := backstore.ReadRecordingStats(f.ok())
	if err != nil {
		return t, backstore.RecordingStats{}, nil
	}
	return t, st, nil
}
