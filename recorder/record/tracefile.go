package record

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/trace"
)

// traceName is the trace file's name: the .pb suffix asks the snapshotter
// for this project's protobuf form, which names every layer by digest.
const traceName = "trace.pb"

// pollInterval is how often the trace files are checked.
const pollInterval = 100 * time.Millisecond

// maxOKSize bounds what is read of <trace>.ok.
const maxOKSize = 64 << 10

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

// wait waits until the trace is complete, for at most timeout.
func (f traceFile) wait(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		if _, err := os.Stat(f.ok()); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			if context.Cause(ctx) == context.DeadlineExceeded {
				return fmt.Errorf("%w: no %s %v after the container stopped; the snapshotter's log says why",
					ErrNoTrace, f.ok(), timeout)
			}
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// okStats is what a snapshotter may write into <trace>.ok about the
// recording (upstream writes nothing; a field left out is unknown).
type okStats struct {
	// Lost is the number of block requests the capture dropped.
	Lost *uint64 `json:"lost"`
}

// read reads the complete trace and the recording's statistics.
func (f traceFile) read() (*trace.Trace, okStats, error) {
	t, err := recorder.ReadTraceFile(string(f), nil)
	if err != nil {
		return nil, okStats{}, fmt.Errorf("%w: %w", ErrNoTrace, err)
	}
	return t, readOKStats(f.ok()), nil
}

// readOKStats reads <trace>.ok as JSON statistics; anything else (an empty
// file, as upstream writes) leaves them unknown.
func readOKStats(path string) okStats {
	var st okStats
	fh, err := os.Open(path)
	if err != nil {
		return st
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxOKSize))
	if err != nil || json.Unmarshal(data, &st) != nil {
		return okStats{}
	}
	return st
}
