package snapshotter

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// serverEnv makes the test binary act as an image server (the snapshotter
// spawns os.Args[0] --spec FILE in tests), so the tests need no other
// binary.
const serverEnv = "OBD_SNAPSHOTTER_TEST_SERVER"

func TestMain(m *testing.M) {
	if os.Getenv(serverEnv) == "1" {
		os.Exit(serveForTest())
	}
	os.Exit(m.Run())
}

func serveForTest() int {
	fs := flag.NewFlagSet("serve-image", flag.ContinueOnError)
	specPath := fs.String("spec", "", "")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	spec, err := ReadServerSpec(*specPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := RunServer(ctx, spec, zerolog.New(os.Stdout).With().Timestamp().Logger()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func testContext() context.Context {
	return namespaces.WithNamespace(context.Background(), "test")
}

// newTestSnapshotter opens a snapshotter on root whose image servers are
// this test binary.
func newTestSnapshotter(t *testing.T, cfg Config) *Snapshotter {
	t.Helper()
	t.Setenv(serverEnv, "1")
	if cfg.Server.Command == nil {
		cfg.Server.Command = []string{os.Args[0]}
	}
	sn, err := New(testContext(), cfg, zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	return sn
}

func testConfig(t *testing.T) Config {
	cfg := DefaultConfig()
	cfg.Root = t.TempDir()
	return cfg
}

// TestOverlayConformance runs containerd's snapshotter test suite: with
// ordinary layers the snapshotter must behave as containerd's overlay
// (the suite's name "overlayfs" tells it overlayfs's known limits).
func TestOverlayConformance(t *testing.T) {
	testutil.RequireRoot(t, "overlayfs, loop devices, FUSE, mount")
	for _, async := range []bool{false, true} {
		t.Run(fmt.Sprintf("async_remove=%v", async), func(t *testing.T) {
			testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				cfg := DefaultConfig()
				cfg.Root = root
				cfg.AsyncRemove = async
				sn, err := New(ctx, cfg, zerolog.Nop())
				if err != nil {
					return nil, nil, err
				}
				return sn, sn.Close, nil
			})
		})
	}
}

const (
	blobA = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
	blobB = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	blobT = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

func remoteLabels(target, blob, ref string) map[string]string {
	return map[string]string{LabelSnapshotRef: target, LabelBlobDigest: blob, LabelImageRef: ref}
}

// prepareRemote runs the unpacker's side of the remote-snapshot protocol
// for one layer and checks the answer.
func prepareRemoteLayer(t *testing.T, sn *Snapshotter, target, parent string, labels map[string]string) {
	t.Helper()
	ctx := testContext()
	key := "extract-1 " + target
	mounts, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(labels))
	if !errdefs.IsAlreadyExists(err) || mounts != nil {
		t.Fatalf("Prepare of overlaybd layer %s: mounts %v, err %v; want already exists", target, mounts, err)
	}
	if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
		t.Fatalf("the extraction key %q is still there: %v", key, err)
	}
}

func TestRemoteLayerProtocol(t *testing.T) {
	sn := newTestSnapshotter(t, testConfig(t))
	defer sn.Close()
	ctx := testContext()
	const ref = "registry.example/app:v1"
	prepareRemoteLayer(t, sn, "chain-a", "", remoteLabels("chain-a", blobA, ref))
	lb := remoteLabels("chain-b", blobB, "")
	lb[LabelCRIImageRef] = ref // CRI's spelling
	lb[LabelCRIManifestDigest] = blobT
	prepareRemoteLayer(t, sn, "chain-b", "chain-a", lb)
	lt := remoteLabels("chain-t", blobT, ref)
	lt[LabelAccelerationLayer] = "yes"
	prepareRemoteLayer(t, sn, "chain-t", "chain-b", lt)

	info, err := sn.Stat(ctx, "chain-t")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindCommitted || info.Parent != "chain-b" || info.Labels[LabelSnapshotRef] != "chain-t" ||
		info.Labels[LabelRemote] != labelRemoteVal {
		t.Fatalf("committed remote snapshot: %+v", info)
	}
	// containerd finds the snapshot it was told exists with this filter.
	var found []string
	filter := fmt.Sprintf(`labels.%q==%s,parent==%q`, LabelSnapshotRef, "chain-b", "chain-a")
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		found = append(found, i.Name)
		return nil
	}, filter); err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0] != "chain-b" {
		t.Fatalf("Walk(%s) = %v", filter, found)
	}
	// Records: the chain of blobs bottom first, the manifest pin, the
	// trace layer flag.
	id, _, _, err := getInfo(sn, "chain-t")
	if err != nil {
		t.Fatal(err)
	}
	rec, err := readRecord(sn.snapshotDir(id))
	if err != nil || rec.Layer == nil {
		t.Fatalf("record of chain-t: %+v, %v", rec, err)
	}
	if got := fmt.Sprint(rec.Layer.Chain); got != fmt.Sprint([]string{blobA, blobB, blobT}) || !rec.Layer.Trace {
		t.Fatalf("chain-t record %+v", rec.Layer)
	}
	idB, _, _, _ := getInfo(sn, "chain-b")
	if recB, _ := readRecord(sn.snapshotDir(idB)); recB.Layer == nil || recB.Layer.Manifest != blobT || recB.Layer.Ref != ref {
		t.Fatalf("chain-b record %+v", recB.Layer)
	}
	// The same layer pulled again (another namespace, another image):
	// already exists, and no extraction snapshot is left behind.
	prepareRemoteLayer(t, sn, "chain-a", "", remoteLabels("chain-a", blobA, ref))
	if u, err := sn.Usage(ctx, "chain-a"); err != nil || u.Size != 0 {
		t.Fatalf("usage of a remote layer: %+v, %v", u, err)
	}
}

func getInfo(sn *Snapshotter, key string) (id string, info snapshots.Info, usage snapshots.Usage, err error) {
	err = sn.ms.WithTransaction(testContext(), false, func(ctx context.Context) error {
		id, info, usage, err = storageGetInfo(ctx, key)
		return err
	})
	return
}

func TestRemoteLayerBadLabels(t *testing.T) {
	sn := newTestSnapshotter(t, testConfig(t))
	defer sn.Close()
	ctx := testContext()
	for name, labels := range map[string]map[string]string{
		"no image ref":  remoteLabels("c", blobA, ""),
		"bad digest":    remoteLabels("c", "sha256:nothex", "r.example/a:b"),
		"bad reference": remoteLabels("c", blobA, "UPPER/Case:tag!"),
		"bad manifest": func() map[string]string {
			l := remoteLabels("c", blobA, "r.example/a:b")
			l[LabelCRIManifestDigest] = "x"
			return l
		}(),
	} {
		_, err := sn.Prepare(ctx, "extract "+name, "", snapshots.WithLabels(labels))
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: err %v, want invalid argument", name, err)
		}
		if name == "no image ref" && !errors.Is(err, ErrNoImageRef) {
			t.Errorf("%s: err %v, want ErrNoImageRef", name, err)
		}
		if _, err := sn.Stat(ctx, "extract "+name); !errdefs.IsNotFound(err) {
			t.Errorf("%s: snapshot left behind (%v)", name, err)
		}
	}
}

// An overlaybd layer above an ordinary one cannot be served remotely: it
// is unpacked like any layer, and no device is involved.
func TestOverlaybdAboveOrdinaryLayer(t *testing.T) {
	sn := newTestSnapshotter(t, testConfig(t))
	defer sn.Close()
	ctx := testContext()
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.Prepare(ctx, "extract", "base", snapshots.WithLabels(remoteLabels("chain", blobA, "r.example/a:b")))
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 1 || mounts[0].Type != "overlay" || strings.Contains(strings.Join(mounts[0].Options, ","), "block") {
		t.Fatalf("mounts %+v", mounts)
	}
}

func TestMountsAboveImage(t *testing.T) {
	sn := newTestSnapshotter(t, testConfig(t))
	defer sn.Close()
	prepareRemoteLayer(t, sn, "chain-a", "", remoteLabels("chain-a", blobA, "r.example/a:b"))
	idA, _, _, _ := getInfo(sn, "chain-a")
	snap := storageSnapshot(snapshots.KindActive, "9", idA)
	m, err := sn.mounts(snap, snapshots.Info{})
	if err != nil {
		t.Fatal(err)
	}
	want := "lowerdir=" + sn.imageMountpoint(idA)
	if len(m) != 1 || m[0].Type != "overlay" || !contains(m[0].Options, want) || !contains(m[0].Options, "upperdir="+sn.upperPath("9")) {
		t.Fatalf("active above the image: %+v, want option %s", m, want)
	}
	m, err = sn.mounts(storageSnapshot(snapshots.KindView, "9", idA), snapshots.Info{})
	if err != nil || len(m) != 1 || m[0].Type != "bind" || m[0].Source != sn.imageMountpoint(idA) || !contains(m[0].Options, "ro") {
		t.Fatalf("view of the image: %+v, %v", m, err)
	}
	// Above a committed ordinary layer (a committed container) above the
	// image: its upper directory, then the image.
	m, err = sn.mounts(storageSnapshot(snapshots.KindActive, "9", "8", idA), snapshots.Info{})
	want = "lowerdir=" + sn.upperPath("8") + ":" + sn.imageMountpoint(idA)
	if err != nil || len(m) != 1 || !contains(m[0].Options, want) {
		t.Fatalf("active above a committed layer above the image: %+v, %v; want %s", m, err, want)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestConfigValidate(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Root = "rel/root"
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if !filepath.IsAbs(cfg.Root) || cfg.StateRoot != filepath.Join(cfg.Root, "mounts") {
		t.Fatalf("derived paths: root %s, state root %s", cfg.Root, cfg.StateRoot)
	}
	for name, mutate := range map[string]func(*Config){
		"empty root":      func(c *Config) { c.Root = "" },
		"negative cache":  func(c *Config) { c.Cache.MaxBytes = -1 },
		"no wait":         func(c *Config) { c.Server.ReadyTimeout = 0 },
		"empty cred host": func(c *Config) { c.Registry.Credentials = map[string]Credential{"": {}} },
	} {
		c := DefaultConfig()
		mutate(&c)
		if err := c.Validate(); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: %v, want ErrConfig", name, err)
		}
	}
}

func TestRegistryCredentials(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"),
		[]byte(`{"auths":{"other.example":{"username":"u2","password":"p2"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	rc := RegistryConfig{DockerConfigDir: dir, Credentials: map[string]Credential{"r.example": {Username: "u", Password: "p"}}}
	opts, err := rc.Options()
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]string{"r.example": "u:p", "other.example": "u2:p2", "none.example": ":"} {
		u, p, err := opts.Credentials(host)
		if err != nil || u+":"+p != want {
			t.Errorf("%s: %s:%s %v, want %s", host, u, p, err, want)
		}
	}
}

func TestPinRef(t *testing.T) {
	for _, c := range []struct{ ref, manifest, want string }{
		{"r.example:5000/app:v1", "", "r.example:5000/app:v1"},
		{"r.example:5000/app:v1", blobT, "r.example:5000/app@" + blobT},
		{"app", "", "docker.io/library/app:latest"},
	} {
		got, err := pinRef(c.ref, digestOf(c.manifest))
		if err != nil || got != c.want {
			t.Errorf("pinRef(%s, %s) = %s, %v; want %s", c.ref, c.manifest, got, err, c.want)
		}
	}
}
