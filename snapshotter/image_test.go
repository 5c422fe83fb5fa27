package snapshotter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

const target = "sha256:chain-hello"

// imageWorld is a registry with the converted hello-world and a snapshotter
// configured to serve it.
type imageWorld struct {
	cfg    Config
	labels map[string]string
}

func newImageWorld(t *testing.T) *imageWorld {
	t.Helper()
	testutil.RequireRoot(t, "overlayfs, loop devices, FUSE, mount")
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	cfg := testConfig(t)
	cfg.Baselayer = testdata.Baselayer(t)
	cfg.Registry.Insecure = []string{reg.Host}
	cfg.Server.StatsInterval = 100 * time.Millisecond
	cfg.Server.StopGrace = 5 * time.Second
	w := &imageWorld{cfg: cfg, labels: remoteLabels(target, testdata.HelloLayerDigest, ref)}
	w.labels[LabelCRIManifestDigest] = registry.ConvertedManifest
	t.Cleanup(func() {
		// Whatever a failed test left running.
		if err := StopServers(context.Background(), cfg, zerolog.Nop()); err != nil {
			t.Errorf("stop servers: %v", err)
		}
		if l := testutil.Leftovers(cfg.Root); len(l) > 0 {
			t.Errorf("left behind:\n%s", strings.Join(l, "\n"))
		}
	})
	return w
}

// readHello mounts a snapshot's mounts, checks /hello and unmounts.
func readHello(t *testing.T, mounts []mount.Mount) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount: %v", err)
		}
	}()
	b, err := os.ReadFile(filepath.Join(dir, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != testdata.HelloSHA256 {
		t.Fatalf("/hello sha256 %s, want %s", got, testdata.HelloSHA256)
	}
}

func serverState(t *testing.T, sn *Snapshotter, id string) (backstore.State, bool) {
	t.Helper()
	st, _, err := backstore.ReadState(sn.cfg.StateRoot, sn.imageMountpoint(id))
	if errors.Is(err, backstore.ErrNotMounted) {
		return backstore.State{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return st, true
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func mustPrepare(t *testing.T, sn *Snapshotter, key, parent string) []mount.Mount {
	t.Helper()
	m, err := sn.Prepare(testContext(), key, parent)
	if err != nil {
		t.Fatalf("Prepare %s: %v", key, err)
	}
	return m
}

// TestImageLifecycle follows an image's device through containers coming
// and going, a snapshotter restart and a server crash.
func TestImageLifecycle(t *testing.T) {
	w := newImageWorld(t)
	sn := newTestSnapshotter(t, w.cfg)
	defer func() { sn.Close() }()
	ctx := testContext()
	prepareRemoteLayer(t, sn, target, "", w.labels)
	id, _, _, _ := getInfo(sn, target)

	// Two containers prepared at once share one server.
	var wg sync.WaitGroup
	mounts := make([][]mount.Mount, 2)
	errs := make([]error, 2)
	for i, key := range []string{"c1", "c2"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mounts[i], errs[i] = sn.Prepare(ctx, key, target)
		}()
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("Prepare: %v, %v", errs[0], errs[1])
	}
	readHello(t, mounts[0])
	readHello(t, mounts[1])
	st, ok := serverState(t, sn, id)
	if !ok || !serverAlive(st) {
		t.Fatalf("no live server for image %s: %+v", id, st)
	}
	if err := sn.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if st2, ok := serverState(t, sn, id); !ok || st2.PID != st.PID || !serverAlive(st2) {
		t.Fatalf("the server went with the first of two containers: %+v", st2)
	}

	// A restart re-adopts the running server.
	sn.Close()
	sn = newTestSnapshotter(t, w.cfg)
	if got := counterValue(t, sn.metrics.adopted); got != 1 {
		t.Fatalf("adopted %v servers, want 1", got)
	}
	m, err := sn.Mounts(ctx, "c2")
	if err != nil {
		t.Fatal(err)
	}
	if st2, _ := serverState(t, sn, id); st2.PID != st.PID {
		t.Fatalf("Mounts after a restart started a new server (pid %d, was %d)", st2.PID, st.PID)
	}
	readHello(t, m)

	// A dead server is replaced at the next Mounts.
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200 && serverAlive(st); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	m, err = sn.Mounts(ctx, "c2")
	if err != nil {
		t.Fatal(err)
	}
	st3, ok := serverState(t, sn, id)
	if !ok || st3.PID == st.PID || !serverAlive(st3) {
		t.Fatalf("dead server not replaced: %+v", st3)
	}
	readHello(t, m)

	// The last user goes: so does the device.
	if err := sn.Remove(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if _, ok := serverState(t, sn, id); ok || serverAlive(st3) {
		t.Fatal("the server outlived its last container")
	}
	if l := testutil.Leftovers(w.cfg.Root); len(l) > 0 {
		t.Fatalf("after the last container:\n%s", strings.Join(l, "\n"))
	}
	if err := sn.Remove(ctx, target); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(filepath.Join(w.cfg.Root, "snapshots")); len(entries) != 0 {
		t.Fatalf("%d snapshot directories left", len(entries))
	}
}

// TestOrphanServerTornDown: a server whose snapshot was removed while the
// snapshotter could not tear it down is torn down at the next start.
func TestOrphanServerTornDown(t *testing.T) {
	w := newImageWorld(t)
	sn := newTestSnapshotter(t, w.cfg)
	ctx := testContext()
	prepareRemoteLayer(t, sn, target, "", w.labels)
	id, _, _, _ := getInfo(sn, target)
	mustPrepare(t, sn, "c1", target)
	cid, _, _, _ := getInfo(sn, "c1")
	st, ok := serverState(t, sn, id)
	if !ok {
		t.Fatal("no server")
	}
	sn.Close()
	// As if the snapshotter had died right after committing the removal.
	ms, err := storage.NewMetaStore(filepath.Join(w.cfg.Root, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "c1")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ms.Close()

	sn = newTestSnapshotter(t, w.cfg)
	defer sn.Close()
	if _, ok := serverState(t, sn, id); ok || serverAlive(st) {
		t.Fatal("orphaned server still running after a restart")
	}
	if _, err := os.Stat(sn.snapshotDir(cid)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("directory of the removed snapshot: %v", err)
	}
}

// TestImageMismatch: layers that are not the image's (here a wrong blob
// digest) must not be served; the container's snapshot is undone.
func TestImageMismatch(t *testing.T) {
	w := newImageWorld(t)
	sn := newTestSnapshotter(t, w.cfg)
	defer sn.Close()
	ctx := testContext()
	labels := remoteLabels(target, blobB, w.labels[LabelImageRef])
	prepareRemoteLayer(t, sn, target, "", labels)
	_, err := sn.Prepare(ctx, "c1", target)
	if !errors.Is(err, ErrImageServer) || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("Prepare above mismatched layers: %v", err)
	}
	if _, err := sn.Stat(ctx, "c1"); !errdefs.IsNotFound(err) {
		t.Fatalf("the failed container's snapshot is still there: %v", err)
	}
	if got := counterValue(t, sn.metrics.serverFailures); got != 1 {
		t.Fatalf("server failures %v, want 1", got)
	}
	// A view of the chain is refused the same way.
	if _, err := sn.View(ctx, "v1", target, snapshots.WithLabels(nil)); !errors.Is(err, ErrImageServer) {
		t.Fatalf("View above mismatched layers: %v", err)
	}
}
