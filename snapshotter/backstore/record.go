package backstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	"github.com/obdtrace/obdtrace/trace"
)

// TraceMode is what a trace path asks for, by upstream's rules.
type TraceMode int

const (
	TraceOff    TraceMode = iota // no path, or the file does not exist
	TraceRecord                  // the file exists and is empty
	TraceReplay                  // the file holds a trace (or a path list)
)

// TraceModeOf applies upstream's trace-path rules to path.
func TraceModeOf(path string) (TraceMode, error) {
	if path == "" {
		return TraceOff, nil
	}
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return TraceOff, nil
	}
	if err != nil {
		return TraceOff, err
	}
	if st.Size() == 0 {
		return TraceRecord, nil
	}
	return TraceReplay, nil
}

// lockPollInterval is how often a recording checks its .lock file, as
// upstream polls it.
const lockPollInterval = time.Second

// recording is a trace being recorded on a mounted image, with upstream's
// protocol: <path>.lock exists while it records (deleting it stops the
// recording), the trace is written to <path> at the end (protobuf when the
// name ends in .pb, upstream's binary otherwise), then <path>.ok appears.
type recording struct {
	path     string
	session  *recorder.Session
	img      *Image
	stopOnce sync.Once
	stopped  chan struct{}
	done     chan struct{} // closed once err is set
	err      error
}

// startRecording begins recording reads of dev into path. It stops when
// ctx ends, after maxDuration (if > 0), or when the lock file is deleted;
// stop ends it early and returns once the trace is written.
func startRecording(ctx context.Context, path string, img *Image, dev device.Device, maxDuration time.Duration, log zerolog.Logger) (*recording, error) {
	major, minor := dev.Dev()
	bdev, err := bpf.MakeDev(major, minor)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(path+".lock", nil, 0o644); err != nil {
		return nil, fmt.Errorf("backstore: record: %w", err)
	}
	os.Remove(path + ".ok")
	session, err := recorder.Start(img.Stack, bdev, recorder.SessionOptions{})
	if err != nil {
		os.Remove(path + ".lock")
		return nil, err
	}
	r := &recording{path: path, session: session, img: img, stopped: make(chan struct{}), done: make(chan struct{})}
	log.Info().Str("trace", path).Str("device", dev.Path()).Dur("max", maxDuration).Msg("recording")
	go func() {
		r.err = r.run(ctx, maxDuration, log)
		if r.err != nil {
			log.Error().Err(r.err).Str("trace", path).Msg("recording failed")
		}
		close(r.done)
	}()
	return r, nil
}

func (r *recording) run(ctx context.Context, maxDuration time.Duration, log zerolog.Logger) error {
	var deadline <-chan time.Time
	if maxDuration > 0 {
		t := time.NewTimer(maxDuration)
		defer t.Stop()
		deadline = t.C
	}
	tick := time.NewTicker(lockPollInterval)
	defer tick.Stop()
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-r.stopped:
			break wait
		case <-deadline:
			break wait
		case <-tick.C:
			if _, err := os.Stat(r.path + ".lock"); errors.Is(err, os.ErrNotExist) {
				break wait
			}
		}
	}
	res, err := r.session.Stop()
	os.Remove(r.path + ".lock")
	if err != nil {
		return err
	}
	layers := r.img.traceLayers()
	meta := trace.Meta{Source: trace.SourceLabel, Runs: 1, ImageRef: r.img.Remote.Ref,
		ManifestDigest: r.img.Remote.ManifestDescriptor.Digest, KernelRelease: kernelRelease()}
	t, err := res.Trace(layers, meta)
	if err != nil {
		return err
	}
	format := recorder.FormatOBD
	if strings.HasSuffix(r.path, ".pb") {
		format = recorder.FormatPB
	}
	if err := recorder.WriteTraceFile(r.path, t, format); err != nil {
		return err
	}
	// Upstream only checks that <path>.ok exists; its content tells a
	// caller such as obd-recorder record how complete the recording is.
	lost := res.Lost
	ok := RecordingStats{Lost: &lost, Frames: len(t.Frames), Bytes: res.Stats.RecordedBytes}
	if err := writeRecordingStats(r.path+".ok", ok); err != nil {
		return err
	}
	log.Info().Str("trace", r.path).Int("frames", len(t.Frames)).Int64("bytes", res.Stats.RecordedBytes).
		Uint64("lost", res.Lost).Msg("trace recorded")
	return nil
}

// stop ends the recording (if still running) and waits for the trace. It
// may be called more than once, from any goroutine.
func (r *recording) stop() error {
	r.stopOnce.Do(func() { close(r.stopped) })
	<-r.done
	return r.err
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
