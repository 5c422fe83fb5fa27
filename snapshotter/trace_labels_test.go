package snapshotter

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/snapshotter/backstore"
	"github.com/obdtrace/obdtrace/trace"
)

func traceLabels(path string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{LabelRecordTrace: "yes", LabelRecordTracePath: path})
}

// prepareWithTrace prepares a container snapshot with the trace labels; it
// must succeed whatever the labels say.
func prepareWithTrace(t *testing.T, sn *Snapshotter, key, parent, path string) []mount.Mount {
	t.Helper()
	m, err := sn.Prepare(testContext(), key, parent, traceLabels(path))
	if err != nil {
		t.Fatalf("Prepare %s with trace %s: %v", key, path, err)
	}
	return m
}

func writeFile(t *testing.T, path string, data []byte) string {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestTraceLabelProblems gives bad record/replay labels: each container
// still starts, and each problem is counted under its reason.
func TestTraceLabelProblems(t *testing.T) {
	w := newImageWorld(t)
	sn := newTestSnapshotter(t, w.cfg)
	defer sn.Close()
	ctx := testContext()
	prepareRemoteLayer(t, sn, target, "", w.labels)
	dir := t.TempDir()
	empty := writeFile(t, filepath.Join(dir, "empty"), nil)
	cases := []struct{ key, path, reason string }{
		{"missing-dir", filepath.Join(dir, "missing", "trace"), reasonBadPath},
		{"relative", "trace", reasonBadPath},
		{"directory", dir, reasonBadPath},
		{"garbage", writeFile(t, filepath.Join(dir, "garbage"), []byte("\x01\x02garbage")), reasonBadTrace},
		{"bad-pb", writeFile(t, filepath.Join(dir, "bad.pb"), []byte("\x0a\x0bobdtrace/v1\xff\xff")), reasonBadTrace},
		{"bad-list", writeFile(t, filepath.Join(dir, "list"), []byte("/hello\nrelative/path\n")), reasonBadTrace},
	}
	for _, c := range cases {
		readHello(t, prepareWithTrace(t, sn, c.key, target, c.path))
	}
	// Two recordings into one file: the running server refuses the second.
	prepareWithTrace(t, sn, "record-1", target, empty)
	prepareWithTrace(t, sn, "record-2", target, empty)
	// An ordinary image has no device to record.
	if _, err := sn.Prepare(ctx, "plain-extract", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "plain", "plain-extract"); err != nil {
		t.Fatal(err)
	}
	prepareWithTrace(t, sn, "plain-1", "plain", empty)

	want := map[string]float64{reasonBadPath: 3, reasonBadTrace: 3, reasonServer: 1, reasonNotOverlaybd: 1}
	for reason, n := range want {
		if got := counterValue(t, sn.metrics.traceLabelProblems.WithLabelValues(reason)); got != n {
			t.Errorf("problems with reason %s: %v, want %v", reason, got, n)
		}
	}
	// The refused request's snapshot goes first: the recording is the
	// first snapshot's, and must go on (recordings are known by path).
	if err := sn.Remove(ctx, "record-2"); err != nil {
		t.Fatalf("Remove record-2: %v", err)
	}
	if _, err := os.Stat(empty + ".lock"); err != nil {
		t.Errorf("removing the snapshot whose recording was refused ended the other's: %v", err)
	}
	if _, err := os.Stat(empty + ".ok"); err == nil {
		t.Errorf("removing the snapshot whose recording was refused wrote the other's trace")
	}
	for _, key := range []string{"missing-dir", "relative", "directory", "garbage", "bad-pb", "bad-list",
		"record-1", "plain-1", "plain", target} {
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatalf("Remove %s: %v", key, err)
		}
	}
	if _, err := os.Stat(empty + ".ok"); err != nil {
		t.Errorf("the first recording did not end with its snapshot: %v", err)
	}
}

// TestTraceLabelsOnAttachedDevice records and replays by labels while
// another container keeps the image's device attached.
func TestTraceLabelsOnAttachedDevice(t *testing.T) {
	w := newImageWorld(t)
	sn := newTestSnapshotter(t, w.cfg)
	defer sn.Close()
	ctx := testContext()
	prepareRemoteLayer(t, sn, target, "", w.labels)
	id, _, _, _ := getInfo(sn, target)
	readHello(t, mustPrepare(t, sn, "keeper", target))
	st, ok := serverState(t, sn, id)
	if !ok || st.Control == "" {
		t.Fatalf("server state %+v: want a control socket", st)
	}
	dir := t.TempDir()

	// Record: the device's reads from now until the snapshot goes.
	f := writeFile(t, filepath.Join(dir, "app.trace"), nil)
	m := prepareWithTrace(t, sn, "record", target, f)
	if _, err := os.Stat(f + ".lock"); err != nil {
		t.Fatalf("no recording on the attached device: %v", err)
	}
	evict(t, filepath.Join(sn.imageMountpoint(id), "hello"))
	readHello(t, m)
	if err := sn.Remove(ctx, "record"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f + ".ok"); err != nil {
		t.Fatalf("Remove returned before the trace was written: %v", err)
	}
	file, _ := os.Open(f)
	frames, err := trace.ReadBinary(file, 1<<20)
	file.Close()
	if err != nil || len(frames) == 0 {
		t.Fatalf("recorded trace: %d frames, %v", len(frames), err)
	}

	// Replay the trace, then a path list, on the same device.
	list := writeFile(t, filepath.Join(dir, "list"), []byte("/hello\n"))
	for i, path := range []string{f, list} {
		key := "replay-" + string(rune('a'+i))
		readHello(t, prepareWithTrace(t, sn, key, target, path))
		rs := waitServerReplay(t, st.StatsFile, path)
		if rs.Error != "" || rs.Plan.Matched == 0 {
			t.Errorf("replay of %s: %+v", path, rs)
		}
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	for reason := range map[string]bool{reasonBadPath: true, reasonBadTrace: true, reasonServer: true} {
		if got := counterValue(t, sn.metrics.traceLabelProblems.WithLabelValues(reason)); got != 0 {
			t.Errorf("problems with reason %s: %v, want none", reason, got)
		}
	}
	for _, key := range []string{"keeper", target} {
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
}

// evict drops a file of the image's filesystem from the page cache, so
// the next read reaches the device.
func evict(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// waitServerReplay waits until an image server's stats say it finished
// replaying source.
func waitServerReplay(t *testing.T, statsFile, source string) backstore.ReplayStats {
	t.Helper()
	var rs backstore.ReplayStats
	for i := 0; i < 400; i++ {
		if st, ok := readStats(statsFile); ok && st.Replay != nil && st.Replay.Source == source {
			rs = *st.Replay
			if rs.TraceSeconds > 0 || rs.Error != "" {
				return rs
			}
		}
		time.Sleep(25 * time.Millisecond)
	}
	b, _ := json.Marshal(rs)
	t.Fatalf("no finished replay of %s in %s: %s", source, statsFile, b)
	return rs
}
