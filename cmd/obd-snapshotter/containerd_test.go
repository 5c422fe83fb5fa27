package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/ctrenv"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/snapshotter/rpull"
	"github.com/obdtrace/obdtrace/trace"
)

const hello = "Hello from Docker!"

// TestContainerd runs the snapshotter as containerd's proxy plugin, as a
// user would: a real containerd, shim and runc, images pulled from a real
// registry, containers started with ctr.
func TestContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test (containerd, registry): not with -short")
	}
	ctrenv.RequireRoot(t)
	reg := registry.Start(t, registry.Options{})
	obdRef := reg.PushHelloWorld(t)
	reg.PushIndex(t, registry.HelloWorldOCI(t), "hello-plain", registry.DockerList, "latest")
	plainRef := reg.Host + "/hello-plain:latest"
	e := ctrenv.Start(t, ctrenv.Options{InsecureHost: reg.Host, Baselayer: testdata.Baselayer(t), Env: []string{
		// 4 KiB cache blocks: replay fetches just a trace's ranges, so a
		// prefetch hit is not hidden by the mount's own reads of the
		// hello-world layer's few blocks.
		"OBD_CACHE_BLOCK_SIZE=4096", "OBD_CACHE_REFILL_SIZE=4096",
	}})
	// Built here, not in the subtests, so it outlives each of them.
	reader := ctrenv.BuildProgram(t, "reader", readerSource)

	st, err := os.Stat(filepath.Join(e.Dir, "snapshotter.sock"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("snapshotter socket: %v, mode %v (want 0600)", err, st.Mode().Perm())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	client, err := containerd.New(e.Sock, containerd.WithDefaultNamespace("obdtest"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	t.Run("rpull and run overlaybd", func(t *testing.T) { testRunOverlaybd(ctx, t, e, client, obdRef) })
	t.Run("record and replay by labels", func(t *testing.T) { testTraceLabels(t, e, obdRef) })
	t.Run("record and replay on an attached device", func(t *testing.T) { testTraceLabelsAttached(ctx, t, e, client, reader, obdRef) })
	t.Run("ctr pull and run overlaybd", func(t *testing.T) { testCtrPull(t, e, obdRef) })
	t.Run("run plain OCI", func(t *testing.T) { testRunPlain(ctx, t, e, client, plainRef) })
	t.Run("kill -9 while running", func(t *testing.T) { testKillSnapshotter(ctx, t, e, client, reader, obdRef) })
	t.Run("nothing left", func(t *testing.T) {
		for ns, refs := range map[string][]string{"obdtest": {obdRef, plainRef}, "obdtest-ctr": {obdRef}} {
			e.MustCtr(t, ns, append([]string{"images", "rm", "--sync"}, refs...)...)
		}
		dir := filepath.Join(e.Dir, "snapshotter", "snapshots")
		if !ctrenv.WaitFor(10*time.Second, func() bool { entries, _ := os.ReadDir(dir); return len(entries) == 0 }) {
			entries, _ := os.ReadDir(dir)
			t.Fatalf("%d snapshot directories left after removing every image", len(entries))
		}
		if l := testutil.Leftovers(e.Dir); len(l) > 0 {
			t.Fatalf("left behind:\n%s", strings.Join(l, "\n"))
		}
	})
}

// testRunOverlaybd pulls the overlaybd image without downloading its layer,
// runs /hello, and checks that the device fetched only part of the layer
// and went away with the container.
func testRunOverlaybd(ctx context.Context, t *testing.T, e *ctrenv.Env, client *containerd.Client, ref string) {
	res, err := rpull.Pull(ctx, client, ref, rpull.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Layers != 1 || res.Downloaded != 0 {
		t.Fatalf("rpull: %d layers, %d downloaded; want 1 remote layer", res.Layers, res.Downloaded)
	}
	out := e.MustCtr(t, "obdtest", "run", "--snapshotter", "overlaybd", ref, "hello1", "/hello")
	if !strings.Contains(out, hello) {
		t.Fatalf("ctr run printed:\n%s", out)
	}
	// The device stays until the container goes: its stats say what was
	// fetched.
	var fetched float64
	ctrenv.WaitFor(5*time.Second, func() bool {
		fetched = e.Metric(t, "obd_snapshotter_image_fetched_bytes_total")
		return fetched > 0
	})
	const layerSize = 642560
	if fetched <= 0 || fetched >= layerSize {
		t.Fatalf("fetched %v bytes of the %d-byte layer; want some, not all", fetched, layerSize)
	}
	if up := e.Metric(t, "obd_snapshotter_image_server_up"); up != 1 {
		t.Fatalf("image servers up: %v, want 1", up)
	}
	e.MustCtr(t, "obdtest", "containers", "rm", "hello1")
	e.WaitNoDevice(t)
}

// testTraceLabels records a trace with upstream's snapshot labels, then
// replays it on a cold cache; a trace path in a missing directory is
// reported and does not stop the container.
func testTraceLabels(t *testing.T, e *ctrenv.Env, ref string) {
	run := func(name, path string) {
		t.Helper()
		out := e.MustCtr(t, "obdtest", "run", "--snapshotter", "overlaybd",
			"--snapshotter-label", "containerd.io/snapshot/overlaybd/record-trace=yes",
			"--snapshotter-label", "containerd.io/snapshot/overlaybd/record-trace-path="+path,
			ref, name, "/hello")
		if !strings.Contains(out, hello) {
			t.Fatalf("ctr run printed:\n%s", out)
		}
	}
	run("badtrace", filepath.Join(e.Dir, "missing-dir", "trace"))
	if got := e.Metric(t, "obd_snapshotter_trace_label_problems_total"); got != 1 {
		t.Fatalf("trace label problems %v, want 1", got)
	}
	e.MustCtr(t, "obdtest", "containers", "rm", "badtrace")
	// The next labels bring the device up (the attached case is below).
	e.WaitNoDevice(t)

	traceFile := filepath.Join(e.Dir, "hello.trace")
	if err := os.WriteFile(traceFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	run("record", traceFile)
	e.MustCtr(t, "obdtest", "containers", "rm", "record") // the recording ends with the device
	frames := waitTrace(t, traceFile)

	// Cold cache: the image's cache lives beside its device, which is gone.
	caches, _ := filepath.Glob(filepath.Join(e.Dir, "snapshotter", "snapshots", "*", "block", "cache"))
	if len(caches) != 1 {
		t.Fatalf("image caches: %v", caches)
	}
	if err := os.RemoveAll(caches[0]); err != nil {
		t.Fatal(err)
	}
	run("replay", traceFile)
	// hello-world is too small for prefetch to beat demand: the ext4
	// mount's own first reads fetch the windows /hello lies in. What can be
	// checked is that the recorded trace was replayed, in full.
	var replayed float64
	ctrenv.WaitFor(10*time.Second, func() bool {
		replayed = e.Metric(t, "obd_snapshotter_image_replayed_bytes_total")
		return replayed > 0
	})
	if replayed <= 0 || e.Metric(t, "obd_snapshotter_image_replay_errors") != 0 {
		t.Fatalf("replaying %d frames: %v bytes replayed, errors %v", len(frames), replayed,
			e.Metric(t, "obd_snapshotter_image_replay_errors"))
	}
	e.MustCtr(t, "obdtest", "containers", "rm", "replay")
	e.WaitNoDevice(t)
}

// waitTrace waits for path.ok, the end of a recording into path, and
// returns the frames of the upstream binary trace recorded there.
func waitTrace(t *testing.T, path string) []trace.Frame {
	t.Helper()
	if !ctrenv.WaitFor(20*time.Second, func() bool { _, err := os.Stat(path + ".ok"); return err == nil }) {
		t.Fatalf("no %s.ok after the recording container's removal", path)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	frames, err := trace.ReadBinary(f, 1<<20)
	if err != nil || len(frames) == 0 {
		t.Fatalf("trace recorded in %s: %d frames, %v", path, len(frames), err)
	}
	return frames
}

// testTraceLabelsAttached records with the labels while another container
// of the image keeps its device attached, then, on a cold cache and again
// beside a running container, replays the trace and a path list: the
// replayed blocks are there before the container reads them.
func testTraceLabelsAttached(ctx context.Context, t *testing.T, e *ctrenv.Env, client *containerd.Client, reader, ref string) {
	img, err := client.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	labels := func(path string) map[string]string {
		return map[string]string{
			"containerd.io/snapshot/overlaybd/record-trace":      "yes",
			"containerd.io/snapshot/overlaybd/record-trace-path": path,
		}
	}
	problems := e.Metric(t, "obd_snapshotter_trace_label_problems_total")
	keeper := startReader(ctx, t, reader, client, img, "keeper-rec", nil)
	keeper.read(1)

	traceFile := filepath.Join(e.Dir, "attached.trace")
	if err := os.WriteFile(traceFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rec := startReader(ctx, t, reader, client, img, "recorder", labels(traceFile))
	if _, err := os.Stat(traceFile + ".lock"); err != nil {
		t.Fatalf("no recording on the attached device: %v", err)
	}
	rec.dropCache()
	rec.read(1)
	// Its snapshot's removal (by containerd's garbage collection, soon
	// after the container's) ends the recording.
	rec.stop(ctx)
	waitTrace(t, traceFile)
	keeper.stop(ctx)
	e.WaitNoDevice(t)

	list := filepath.Join(e.Dir, "paths")
	if err := os.WriteFile(list, []byte("/hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, source := range []string{traceFile, list} {
		// Cold: the image's cache goes with its device's last container.
		caches, _ := filepath.Glob(filepath.Join(e.Dir, "snapshotter", "snapshots", "*", "block", "cache"))
		for _, c := range caches {
			os.RemoveAll(c)
		}
		keeper := startReader(ctx, t, reader, client, img, "keeper-replay", nil)
		rep := startReader(ctx, t, reader, client, img, "replayer", labels(source))
		if !ctrenv.WaitFor(20*time.Second, func() bool { return e.Metric(t, "obd_snapshotter_image_replayed_bytes_total") > 0 }) {
			t.Fatalf("%s: nothing replayed beside a running container", source)
		}
		rep.read(1)
		var hits float64
		ctrenv.WaitFor(5*time.Second, func() bool {
			hits = e.Metric(t, "obd_snapshotter_image_prefetch_hits_total")
			return hits > 0
		})
		if hits == 0 || e.Metric(t, "obd_snapshotter_image_replay_errors") != 0 {
			t.Fatalf("%s: %v prefetch hits, replay errors %v; want hits and no errors", source, hits,
				e.Metric(t, "obd_snapshotter_image_replay_errors"))
		}
		rep.stop(ctx)
		keeper.stop(ctx)
		e.WaitNoDevice(t)
	}
	if got := e.Metric(t, "obd_snapshotter_trace_label_problems_total"); got != problems {
		t.Fatalf("trace label problems went from %v to %v", problems, got)
	}
}

// testCtrPull pulls with plain `ctr image pull` (the transfer service,
// which passes the reference as cri.image-ref when the plugin exports
// enable_remote_snapshot_annotations) in another namespace, where the
// layer's snapshot already exists in the snapshotter.
func testCtrPull(t *testing.T, e *ctrenv.Env, ref string) {
	e.MustCtr(t, "obdtest-ctr", "images", "pull", "--plain-http", "--snapshotter", "overlaybd", ref)
	out := e.MustCtr(t, "obdtest-ctr", "run", "--rm", "--snapshotter", "overlaybd", ref, "hello2", "/hello")
	if !strings.Contains(out, hello) {
		t.Fatalf("ctr run printed:\n%s", out)
	}
}

// testRunPlain runs an ordinary OCI image (docker's multi-platform
// hello-world) through the snapshotter: plain overlay behaviour.
func testRunPlain(ctx context.Context, t *testing.T, e *ctrenv.Env, client *containerd.Client, ref string) {
	res, err := rpull.Pull(ctx, client, ref, rpull.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Layers != 1 || res.Downloaded != 1 {
		t.Fatalf("pull: %d layers, %d downloaded; want the one ordinary layer downloaded", res.Layers, res.Downloaded)
	}
	out := e.MustCtr(t, "obdtest", "run", "--rm", "--snapshotter", "overlaybd", ref, "plain1", "/hello")
	if !strings.Contains(out, hello) {
		t.Fatalf("ctr run printed:\n%s", out)
	}
}

// testKillSnapshotter kills the snapshotter hard while a container reads
// its image, checks the container still reads (page cache dropped, so
// through the device), restarts the snapshotter, and checks that the
// image's server is re-adopted, kept while a container uses it and torn
// down once the last one is gone.
func testKillSnapshotter(ctx context.Context, t *testing.T, e *ctrenv.Env, client *containerd.Client, reader, ref string) {
	img, err := client.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	// A second, stopped container of the image keeps the device in use
	// after the reader goes.
	if out := e.MustCtr(t, "obdtest", "run", "--snapshotter", "overlaybd", ref, "keeper", "/hello"); !strings.Contains(out, hello) {
		t.Fatalf("ctr run printed:\n%s", out)
	}
	r := startReader(ctx, t, reader, client, img, "reader", nil)
	r.read(1)

	if err := syscall.Kill(e.SnapshotterPID(t), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.dropCache()
	r.read(2) // through the device, served by the image server that outlived the snapshotter

	e.Script(t, "restart-snapshotter", e.Dir)
	if !strings.Contains(e.SnapshotterLog(), "image server adopted") {
		t.Fatalf("the restarted snapshotter did not adopt the image server; log:\n%s", ctrenv.TailLines(e.SnapshotterLog(), 20))
	}
	r.dropCache()
	r.read(3)
	r.stop(ctx)

	time.Sleep(2 * time.Second) // time for containerd to remove the reader's snapshot
	if up := e.Metric(t, "obd_snapshotter_image_server_up"); up != 1 {
		t.Fatalf("image servers up with one container left: %v, want 1", up)
	}
	e.MustCtr(t, "obdtest", "containers", "rm", "keeper")
	e.WaitNoDevice(t)
}
