package record

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/obdtrace/obdtrace/internal/testutil/ctrenv"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/recorder/image"
	obdregistry "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

const hello = "Hello from Docker!"

// sleeperMount mounts ctrenv's sleeper program at /sleeper.
func sleeperMount(t *testing.T) specs.Mount {
	return specs.Mount{Destination: "/sleeper", Type: "bind", Source: ctrenv.BuildSleeper(t), Options: []string{"rbind", "ro"}}
}

// logWriter sends progress lines to the test log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestContainerd records the upstream-converted hello-world through a real
// containerd, shim, runc and the snapshotter, with images in a real
// registry.
func TestContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test (containerd, registry): not with -short")
	}
	ctrenv.RequireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	e := ctrenv.Start(t, ctrenv.Options{InsecureHost: reg.Host, Baselayer: testdata.Baselayer(t),
		// 4 KiB cache blocks: replay fetches just the trace's ranges, so
		// prefetch hits are not hidden by the mount's own first reads.
		Env: []string{"OBD_CACHE_BLOCK_SIZE=4096", "OBD_CACHE_REFILL_SIZE=4096"}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	client, err := containerd.New(e.Sock, containerd.WithDefaultNamespace("obdrecord"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	w := &world{t: t, e: e, reg: reg, client: client, sleeper: sleeperMount(t)}

	v1, v2 := reg.Host+"/hello-traced:v1", reg.Host+"/hello-traced:v2"
	var first *Summary
	t.Run("record and push", func(t *testing.T) { first = w.testRecordPush(ctx, t, ref, v1) })
	if first == nil {
		t.FailNow()
	}
	t.Run("re-record replaces the trace layer", func(t *testing.T) { w.testReRecord(ctx, t, v1, v2, first) })
	t.Run("stop early", func(t *testing.T) { w.testStopEarly(ctx, t, v1) })
	t.Run("abort", func(t *testing.T) { w.testAbort(ctx, t, v1) })
	t.Run("stopped before the start", func(t *testing.T) { w.testStoppedBeforeStart(ctx, t, v1) })
	t.Run("cold run replays", func(t *testing.T) { w.testColdReplay(ctx, t, v2, ref, v1) })
}

type world struct {
	t       *testing.T
	e       *ctrenv.Env
	reg     *registry.Server
	client  *containerd.Client
	sleeper specs.Mount
}

// options are the options every run of the test shares.
func (w *world) options(t *testing.T, img, newImg string, out *ctrenv.Buffer) Options {
	return Options{
		Image: img, NewImage: newImg, PlainHTTP: true, TraceDir: t.TempDir(),
		Stdout: out, Stderr: out, Progress: logWriter{t}, StopGrace: time.Second,
	}
}

func (w *world) testRecordPush(ctx context.Context, t *testing.T, ref, v1 string) *Summary {
	var out ctrenv.Buffer
	opts := w.options(t, ref, v1, &out)
	opts.Duration, opts.Push = 5*time.Second, true
	sum, err := Run(ctx, w.client, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), hello) {
		t.Errorf("container printed %q", out.String())
	}
	var text strings.Builder
	if err := sum.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	t.Logf("summary:\n%s", text.String())
	if sum.Stopped != StopExited || sum.ExitCode != 0 || sum.Recorded >= opts.Duration || !sum.Pushed || sum.Replaced != nil {
		t.Errorf("summary %+v", sum)
	}
	if sum.Trace == nil || sum.Trace.Frames == 0 {
		t.Fatalf("no frames recorded: %+v", sum.Trace)
	}
	var helloBytes int64
	for _, l := range sum.Trace.Layers {
		if l.Digest == testdata.HelloLayerDigest {
			helloBytes = l.UniqueBytes
		}
	}
	if helloBytes <= 0 {
		t.Errorf("no bytes recorded from the hello-world layer: %+v", sum.Trace.Layers)
	}
	m := w.pushed(ctx, t, v1, sum)
	if len(m.Layers) != 2 || m.Layers[0].Digest != testdata.HelloLayerDigest {
		t.Errorf("pushed layers %+v, want the hello-world layer and the trace layer", m.Layers)
	}
	w.noLeftovers(ctx, t, sum.ID, opts.TraceDir)
	return sum
}

// pushed checks that the registry has NewImage with sum's trace layer last,
// holding the recorded trace, and returns its manifest.
func (w *world) pushed(ctx context.Context, t *testing.T, ref string, sum *Summary) *image.Manifest {
	t.Helper()
	rc, err := obdregistry.New(obdregistry.Options{PlainHTTP: []string{w.reg.Host}})
	if err != nil {
		t.Fatal(err)
	}
	store, err := rc.Store(ref)
	if err != nil {
		t.Fatal(err)
	}
	tr, desc, err := image.ReadTraceLayer(ctx, store, ref)
	if err != nil {
		t.Fatalf("trace layer of the pushed %s: %v", ref, err)
	}
	if desc.Digest != sum.Layer.Digest || len(tr.Frames) != sum.Trace.Frames {
		t.Errorf("pushed trace layer %s with %d frames, want %s with %d", desc.Digest, len(tr.Frames), sum.Layer.Digest, sum.Trace.Frames)
	}
	mdesc, err := store.ResolveManifest(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	data, err := image.ReadVerified(ctx, store, mdesc, image.MaxManifestSize)
	if err != nil {
		t.Fatal(err)
	}
	m, err := image.ParseManifest(data)
	if err != nil {
		t.Fatal(err)
	}
	if mdesc.Digest != sum.Manifest.Digest || m.TraceLayer() != len(m.Layers)-1 ||
		m.Layers[len(m.Layers)-1].Annotations[image.AnnotationAcceleration] != "yes" {
		t.Errorf("pushed manifest %s (want %s), trace layer at %d of %d", mdesc.Digest, sum.Manifest.Digest, m.TraceLayer(), len(m.Layers))
	}
	img, err := w.client.GetImage(ctx, ref)
	if err != nil || img.Target().Digest != sum.Manifest.Digest {
		t.Errorf("containerd's image %s: %v, %v", ref, img, err)
	}
	return m
}

func (w *world) testReRecord(ctx context.Context, t *testing.T, v1, v2 string, first *Summary) {
	var out ctrenv.Buffer
	opts := w.options(t, v1, v2, &out)
	opts.Duration, opts.Push = 2*time.Second, true
	opts.Args, opts.Mounts = []string{"/sleeper", "ignore-term"}, []specs.Mount{w.sleeper}
	sum, err := Run(ctx, w.client, opts)
	if err != nil {
		t.Fatal(err)
	}
	// Ignoring SIGTERM, it is killed after the grace period.
	if sum.Stopped != StopDuration || sum.ExitCode != 137 || sum.Recorded < opts.Duration || !strings.Contains(out.String(), "ready") {
		t.Errorf("summary %+v; output %q", sum, out.String())
	}
	if sum.Replaced == nil || sum.Replaced.Digest != first.Layer.Digest {
		t.Errorf("replaced %v, want the first trace layer %s", sum.Replaced, first.Layer.Digest)
	}
	if m := w.pushed(ctx, t, v2, sum); len(m.Layers) != 2 {
		t.Errorf("re-recorded image has %d layers, want 2 (the trace layer replaced, not stacked)", len(m.Layers))
	}
	w.noLeftovers(ctx, t, sum.ID, opts.TraceDir)
}

func (w *world) testStopEarly(ctx context.Context, t *testing.T, img string) {
	var out ctrenv.Buffer
	opts := w.options(t, img, w.reg.Host+"/hello-traced:early", &out)
	opts.Duration = time.Minute
	opts.Args, opts.Mounts = []string{"/sleeper"}, []specs.Mount{w.sleeper}
	opts.Stop = out.Closed("ready", time.Minute)
	sum, err := Run(ctx, w.client, opts)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Stopped != StopRequested || sum.ExitCode != 0 || sum.Recorded > 30*time.Second || sum.Pushed {
		t.Errorf("summary %+v", sum)
	}
	w.noLeftovers(ctx, t, sum.ID, opts.TraceDir)
}

func (w *world) testAbort(ctx context.Context, t *testing.T, img string) {
	var out ctrenv.Buffer
	newImg := w.reg.Host + "/hello-traced:aborted"
	opts := w.options(t, img, newImg, &out)
	opts.Duration = time.Minute
	opts.Args, opts.Mounts = []string{"/sleeper"}, []specs.Mount{w.sleeper}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		if out.WaitFor("ready", time.Minute) {
			cancel()
		}
	}()
	if _, err := Run(actx, w.client, opts); !errors.Is(err, context.Canceled) {
		t.Fatalf("aborted run: err %v, want context.Canceled", err)
	}
	if _, err := w.client.GetImage(ctx, newImg); err == nil {
		t.Error("an aborted run created its image")
	}
	w.noLeftovers(ctx, t, "", opts.TraceDir)
}

func (w *world) testStoppedBeforeStart(ctx context.Context, t *testing.T, img string) {
	var out ctrenv.Buffer
	newImg := w.reg.Host + "/hello-traced:stopped"
	opts := w.options(t, img, newImg, &out)
	opts.Duration = time.Minute
	stop := make(chan struct{})
	close(stop)
	opts.Stop = stop
	if _, err := Run(ctx, w.client, opts); !errors.Is(err, ErrStopped) {
		t.Fatalf("run stopped before its start: err %v, want ErrStopped", err)
	}
	if _, err := w.client.GetImage(ctx, newImg); err == nil || out.String() != "" {
		t.Errorf("a run stopped before its start created its image, or ran: %q", out.String())
	}
	w.noLeftovers(ctx, t, "", opts.TraceDir)
}

// testColdReplay removes every image (and so the image caches), pulls the
// traced image afresh and runs it: its trace layer is replayed.
func (w *world) testColdReplay(ctx context.Context, t *testing.T, traced string, others ...string) {
	w.e.MustCtr(t, "obdrecord", append([]string{"images", "rm", "--sync", traced, w.reg.Host + "/hello-traced:early"}, others...)...)
	dir := filepath.Join(w.e.Dir, "snapshotter", "snapshots")
	if !ctrenv.WaitFor(15*time.Second, func() bool { entries, _ := os.ReadDir(dir); return len(entries) == 0 }) {
		entries, _ := os.ReadDir(dir)
		t.Fatalf("%d snapshot directories left after removing every image", len(entries))
	}
	w.e.WaitNoDevice(t)
	before := w.e.Metric(t, "obd_snapshotter_image_replayed_bytes_total")
	hitsBefore := w.e.Metric(t, "obd_snapshotter_image_prefetch_hits_total")
	// Created first and started once the replay has fetched: ctr run
	// would race the read of /hello against the replay (the device and its
	// replay come up at Prepare), and a read that wins is a demand fetch,
	// not a prefetch hit.
	w.e.MustCtr(t, "obdrecord", "containers", "create", "--snapshotter", "overlaybd", w.pull(ctx, t, traced), "cold", "/hello")
	var after, hits float64
	ctrenv.WaitFor(10*time.Second, func() bool {
		after = w.e.Metric(t, "obd_snapshotter_image_replayed_bytes_total")
		return after > before
	})
	out := w.e.MustCtr(t, "obdrecord", "tasks", "start", "cold")
	if !strings.Contains(out, hello) {
		t.Fatalf("ctr tasks start printed:\n%s", out)
	}
	ctrenv.WaitFor(10*time.Second, func() bool {
		hits = w.e.Metric(t, "obd_snapshotter_image_prefetch_hits_total")
		return hits > hitsBefore
	})
	if after <= before || hits <= hitsBefore || w.e.Metric(t, "obd_snapshotter_image_replay_errors") != 0 {
		t.Errorf("replayed bytes %v -> %v, prefetch hits %v -> %v, replay errors %v", before, after, hitsBefore, hits,
			w.e.Metric(t, "obd_snapshotter_image_replay_errors"))
	}
	w.e.MustCtr(t, "obdrecord", "containers", "rm", "cold")
	w.e.MustCtr(t, "obdrecord", "images", "rm", "--sync", traced)
	w.e.WaitNoDevice(t)
}

func (w *world) pull(ctx context.Context, t *testing.T, ref string) string {
	t.Helper()
	if _, err := ensureImage(ctx, w.client, &Options{Image: ref, Snapshotter: DefaultSnapshotter, PlainHTTP: true}, progress{logWriter{t}}); err != nil {
		t.Fatal(err)
	}
	return ref
}

// noLeftovers checks that no container, task, snapshot or lease of a run
// (of any run, when id is "") is left, nor its trace directory.
func (w *world) noLeftovers(ctx context.Context, t *testing.T, id, traceDir string) {
	t.Helper()
	left, err := ctrenv.Objects(ctx, w.client, DefaultSnapshotter, func(name string, labels map[string]string) bool {
		_, labelled := labels[LabelRecord]
		return labelled || id != "" && name == id || strings.HasPrefix(name, "obd-record-")
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("left behind: %s", strings.Join(left, ", "))
	}
	if entries, _ := os.ReadDir(traceDir); len(entries) > 0 {
		t.Errorf("trace directory %s holds %s", traceDir, entries[0].Name())
	}
}
