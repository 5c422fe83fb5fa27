package backstore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/trace"
)

// evictAndRead drops path from the page cache and reads it, so that the
// read reaches the device.
func evictAndRead(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got := sha256File(t, path); got != testdata.HelloSHA256 {
		t.Fatalf("%s sha256 %s", path, got)
	}
}

func emptyFile(t *testing.T, path string) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", path)
}

// TestControlChannel records and replays on an image that is already
// mounted, through the server's control socket, and checks the refusals.
func TestControlChannel(t *testing.T) {
	requireRoot(t)
	work := t.TempDir()
	cfg := helloConfig(t, work)
	state, stop := serveOnce(t, cfg)
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	if st, err := os.Stat(state.Control); err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("control socket %q: %v, %v (want a 0600 socket)", state.Control, st, err)
	}
	ctx := context.Background()
	send := func(op, path string, d time.Duration) error {
		return SendControl(ctx, state, ControlRequest{Op: op, Path: path, MaxDuration: d})
	}

	// Record, read /hello through the device, stop: a valid upstream trace.
	f := emptyFile(t, filepath.Join(work, "f.trace"))
	if err := send(OpRecord, f, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f + ".lock"); err != nil {
		t.Errorf("no lock file while recording: %v", err)
	}
	if err := send(OpRecord, f, 0); !errors.Is(err, ErrControlRefused) {
		t.Errorf("a second recording into the same file: %v", err)
	}
	evictAndRead(t, filepath.Join(cfg.Mountpoint, "hello"))
	if err := send(OpStopRecord, f, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f + ".ok"); err != nil {
		t.Fatalf("stop answered before %s.ok: %v", f, err)
	}
	file, _ := os.Open(f)
	frames, err := trace.ReadBinary(file, 1<<20)
	file.Close()
	if err != nil || len(frames) == 0 {
		t.Fatalf("recorded trace: %d frames, %v", len(frames), err)
	}
	if ok, err := ReadRecordingStats(f + ".ok"); err != nil || ok.Frames != len(frames) || ok.Bytes <= 0 || ok.Lost == nil {
		t.Errorf("%s.ok: %+v (%v), want %d frames and their bytes", f, ok, err, len(frames))
	}
	if err := send(OpStopRecord, f, 0); !errors.Is(err, ErrNotRecording) {
		t.Errorf("stopping a finished recording: %v, want ErrNotRecording", err)
	}

	// Refusals: record into a non-empty file, replay garbage or nothing.
	if err := send(OpRecord, f, 0); !errors.Is(err, ErrControlRefused) || !strings.Contains(err.Error(), "not an existing empty file") {
		t.Errorf("record into a trace: %v", err)
	}
	junk := filepath.Join(work, "junk")
	os.WriteFile(junk, []byte("\x01\x02 not a trace"), 0o644)
	if err := send(OpReplay, junk, 0); !errors.Is(err, ErrControlRefused) || !strings.Contains(err.Error(), "bad trace file") {
		t.Errorf("replay of garbage: %v", err)
	}
	if err := send(OpReplay, filepath.Join(work, "missing", "t"), 0); !errors.Is(err, ErrControlRefused) {
		t.Errorf("replay of a missing file: %v", err)
	}

	// Replay the recorded trace on the running server.
	if err := send(OpReplay, f, 0); err != nil {
		t.Fatal(err)
	}
	st := waitReplay(t, cfg.StatsFile)
	if st.Replay.Source != f || st.Replay.Error != "" || st.Replay.Plan.Matched == 0 {
		t.Errorf("replay stats after the control request: %+v", *st.Replay)
	}

	// A recording ends when its lock file goes, or at its max duration.
	g := emptyFile(t, filepath.Join(work, "g.trace"))
	if err := send(OpRecord, g, 0); err != nil {
		t.Fatal(err)
	}
	os.Remove(g + ".lock")
	h := emptyFile(t, filepath.Join(work, "h.trace.pb"))
	if err := send(OpRecord, h, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitFile(t, g+".ok")
	waitFile(t, h+".ok")
	if b, _ := os.ReadFile(h); trace.Detect(b) != trace.KindProtobuf {
		t.Errorf("%s holds %v, want protobuf", h, trace.Detect(b))
	}

	// One still running when the server stops is written at the stop.
	k := emptyFile(t, filepath.Join(work, "k.trace"))
	if err := send(OpRecord, k, 0); err != nil {
		t.Fatal(err)
	}
	stopped = true
	stop()
	if _, err := os.Stat(k + ".ok"); err != nil {
		t.Errorf("recording running at the server's stop: %v", err)
	}
	checkNothingLeft(t, work)
}
