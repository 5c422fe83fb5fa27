package backstore

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
)

// gather returns the monitor's metrics by name.
func gather(t *testing.T, m *monitor) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		metric := mf.GetMetric()[0]
		if c := metric.GetCounter(); c != nil {
			out[mf.GetName()] = c.GetValue()
		} else {
			out[mf.GetName()] = metric.GetGauge().GetValue()
		}
	}
	return out
}

// TestMonitorTotalsAcrossReplays runs two replays through one monitor, the
// first failing: the counters only grow, the errors counter stays at 1
// after the second succeeds, and the stats file shows the latest replay
// under its old key plus the totals.
func TestMonitorTotalsAcrossReplays(t *testing.T) {
	mon := newMonitor("ref", "/mnt", &Image{}, &blobcache.Cache{})
	want := func(stage string, wants map[string]float64) {
		t.Helper()
		got := gather(t, mon)
		for name, v := range wants {
			if got[name] != v {
				t.Errorf("%s: %s = %v, want %v", stage, name, got[name], v)
			}
		}
	}

	first := &ReplayStats{Source: "a", Plan: replayer.PlanStats{Unmatched: 2}}
	var run1 replayer.Stats
	mon.startReplay(first, &run1)
	run1.Bytes.Store(100)
	run1.RangesDone.Store(3)
	run1.RangesFailed.Store(1)
	want("first running", map[string]float64{"obd_replay_prefetched_bytes_total": 100,
		"obd_replay_ranges_done_total": 3, "obd_replay_skipped_frames_total": 2, "obd_replay_errors_total": 0})
	mon.endReplay(first, "layer missing")
	want("first failed", map[string]float64{"obd_replay_prefetched_bytes_total": 100,
		"obd_replay_ranges_failed_total": 1, "obd_replay_errors_total": 1})

	second := &ReplayStats{Source: "b"}
	var run2 replayer.Stats
	mon.startReplay(second, &run2)
	want("second started", map[string]float64{"obd_replay_prefetched_bytes_total": 100,
		"obd_replay_ranges_done_total": 3, "obd_replay_errors_total": 1, "obd_replay_trace_done_seconds": 0})
	run2.Bytes.Store(50)
	run2.RangesDone.Store(2)
	run2.TraceDone.Store(int64(time.Second))
	mon.endReplay(second, "")
	want("second done", map[string]float64{"obd_replay_prefetched_bytes_total": 150,
		"obd_replay_ranges_done_total": 5, "obd_replay_skipped_frames_total": 2,
		"obd_replay_errors_total": 1, "obd_replay_trace_done_seconds": 1})
	// Ending a replay twice must not count it twice.
	mon.endReplay(second, "")
	want("ended twice", map[string]float64{"obd_replay_prefetched_bytes_total": 150})

	// The stats file keeps "replay" as the latest replay (readers of
	// older files see what they saw) and adds "replay_totals".
	path := filepath.Join(t.TempDir(), "stats.json")
	mon.write(path, zerolog.Nop())
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Replay map[string]any `json:"replay"`
		Totals map[string]any `json:"replay_totals"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	if raw.Replay["source"] != "b" || raw.Replay["bytes_prefetched"] != 50.0 || raw.Replay["error"] != nil {
		t.Errorf("stats file replay %v: want the second replay's own figures", raw.Replay)
	}
	wantTotals := map[string]float64{"replays": 2, "errors": 1, "bytes_prefetched": 150, "ranges_done": 5,
		"ranges_failed": 1, "skipped_frames": 2}
	for k, v := range wantTotals {
		if raw.Totals[k] != v {
			t.Errorf("stats file replay_totals.%s = %v, want %v (all: %v)", k, raw.Totals[k], v, raw.Totals)
		}
	}
}

// TestMonitorReplacedWhileRunning starts a replay over one that has not
// ended: the first one's progress so far stays counted.
func TestMonitorReplacedWhileRunning(t *testing.T) {
	mon := newMonitor("ref", "/mnt", &Image{}, &blobcache.Cache{})
	first := &ReplayStats{Source: "a"}
	var run1 replayer.Stats
	mon.startReplay(first, &run1)
	run1.Bytes.Store(70)
	var run2 replayer.Stats
	mon.startReplay(&ReplayStats{Source: "b"}, &run2)
	run1.Bytes.Store(80)
	// No longer the current replay: its error counts, its bytes were
	// counted when it was replaced and must not be added again.
	mon.endReplay(first, "late")
	st := mon.snapshot()
	if st.Replay.Source != "b" || st.ReplayTotals.BytesDone != 70 || st.ReplayTotals.Replays != 2 || st.ReplayTotals.Errors != 1 {
		t.Errorf("stats %+v totals %+v: want replay b shown, a's 70 bytes and error kept once", *st.Replay, *st.ReplayTotals)
	}
}

// TestReplaysOneAtATime asks for a second replay while one waits for its
// filesystem: it is refused with ErrReplayRunning; once the first ends
// (cancelled from the server's context), a replay starts again.
func TestReplaysOneAtATime(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "list")
	if err := os.WriteFile(list, []byte("/hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := &Image{}
	mon := newMonitor("ref", "/mnt", img, &blobcache.Cache{})
	cfg := Config{TraceFile: list, Mountpoint: dir, mounted: make(chan struct{}), Logger: zerolog.Nop()}
	ctx, cancel := context.WithCancel(context.Background())
	rp := newReplays(ctx)
	defer rp.stop()
	if err := rp.start(cfg, img, mon, cfg.Logger); err != nil {
		t.Fatal(err)
	}
	err := rp.start(cfg, img, mon, cfg.Logger)
	if !errors.Is(err, ErrReplayRunning) || !strings.Contains(err.Error(), list) {
		t.Fatalf("second replay while one runs: %v, want ErrReplayRunning naming %s", err, list)
	}
	cancel()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = rp.start(cfg, img, mon, cfg.Logger)
		if !errors.Is(err, ErrReplayRunning) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("replay after the first ended: %v", err)
	}
	if st := mon.snapshot(); st.ReplayTotals.Replays != 2 || st.ReplayTotals.Errors != 0 {
		t.Errorf("totals %+v: want 2 replays started, no error (a cancelled replay is none)", *st.ReplayTotals)
	}
}
