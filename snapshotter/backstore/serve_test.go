package backstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// requireRoot fails under CI and skips elsewhere when not root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root (loop devices, FUSE, mount)")
	}
	t.Skip("needs root (loop devices, FUSE, mount)")
}

// serveOnce mounts ref in the background and returns the mountpoint, the
// state and a stop function that waits for the server to finish.
func serveOnce(t *testing.T, cfg Config) (State, func() Stats) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan State, 1)
	cfg.Ready = func(s State) { ready <- s }
	if cfg.Logger.GetLevel() == zerolog.DebugLevel {
		cfg.Logger = zerolog.New(zerolog.NewTestWriter(t))
	}
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, cfg) }()
	select {
	case s := <-ready:
		var once sync.Once
		var err error
		stop := func() error {
			once.Do(func() {
				cancel()
				err = <-done
			})
			return err
		}
		// A test that fails before it stops the server still tears it
		// down, so its mounts do not outlive it.
		t.Cleanup(func() { stop() })
		return s, func() Stats {
			if err := stop(); err != nil {
				t.Errorf("Serve: %v", err)
			}
			return readStats(t, s.StatsFile)
		}
	case err := <-done:
		cancel()
		t.Fatalf("Serve failed before ready: %v", err)
	case <-time.After(2 * time.Minute):
		cancel()
		t.Fatal("Serve not ready after 2 minutes")
	}
	return State{}, nil
}

func readStats(t *testing.T, path string) Stats {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("stats file: %v", err)
	}
	var s Stats
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("stats file: %v", err)
	}
	return s
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// checkNothingLeft fails if a loop device, FUSE mount or mount under dir is
// left behind.
func checkNothingLeft(t *testing.T, dirs ...string) {
	t.Helper()
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, d := range dirs {
		if strings.Contains(string(mounts), d) {
			t.Errorf("a mount under %s is left:\n%s", d, mounts)
		}
	}
	out, _ := exec.Command("losetup", "-a").Output()
	for _, d := range dirs {
		if strings.Contains(string(out), d) {
			t.Errorf("a loop device on %s is left: %s", d, out)
		}
	}
}

func TestServeHelloWorld(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	cfg := Config{
		Ref: ref, Mountpoint: mnt, StateRoot: filepath.Join(work, "state"), CacheDir: filepath.Join(work, "cache"),
		Baselayer: testdata.Baselayer(t), Registry: regclient.Options{PlainHTTP: []string{reg.Host}},
		StatsInterval: 100 * time.Millisecond, StatsFile: filepath.Join(work, "stats.json"),
		MetricsAddr: "127.0.0.1:0",
	}

	state, stop := serveOnce(t, cfg)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello sha256 %s, want %s", got, testdata.HelloSHA256)
	}
	checkMetrics(t, state.Metrics)
	if !strings.HasPrefix(state.Device, "/dev/loop") {
		t.Errorf("device %q", state.Device)
	}
	stats := stop()
	checkNothingLeft(t, work)
	var blobBytes int64
	for _, l := range stats.Layers {
		if !l.Local {
			blobBytes += l.Size
		}
	}
	t.Logf("cold mount: fetched %d of %d blob bytes; served %d disk bytes", stats.Cache.BytesFetched, blobBytes, stats.BytesServed)
	// The default 256 KiB refill window is most of this small blob; the
	// figure for a 64 KiB window is checked below.
	if stats.Cache.BytesFetched == 0 || stats.Cache.BytesFetched > blobBytes*6/10 {
		t.Errorf("fetched %d bytes of %d: want far fewer than the blobs hold", stats.Cache.BytesFetched, blobBytes)
	}
	if len(stats.Layers) != 2 || !stats.Layers[0].Local || stats.Layers[0].Digest != BaselayerDigest {
		t.Errorf("layers %+v: want the baselayer beneath the image's layer", stats.Layers)
	}

	// A second mount with the cache warm fetches nothing.
	_, stop = serveOnce(t, cfg)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("warm /hello sha256 %s", got)
	}
	if stats := stop(); stats.Cache.BytesFetched != 0 {
		t.Errorf("warm mount fetched %d bytes", stats.Cache.BytesFetched)
	}
	checkNothingLeft(t, work)

	// A cold mount with 64 KiB refill windows fetches under a third.
	cfg.CacheDir, cfg.CacheRefillSize = filepath.Join(work, "cache64k"), 64<<10
	_, stop = serveOnce(t, cfg)
	sha256File(t, filepath.Join(mnt, "hello"))
	stats = stop()
	t.Logf("cold mount, 64 KiB refill: fetched %d of %d blob bytes", stats.Cache.BytesFetched, blobBytes)
	if stats.Cache.BytesFetched > blobBytes/3 {
		t.Errorf("fetched %d bytes of %d with 64 KiB refill windows", stats.Cache.BytesFetched, blobBytes)
	}
	checkNothingLeft(t, work)
}

// checkMetrics scrapes /metrics and checks the series a user watches.
func checkMetrics(t *testing.T, addr string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		"obd_blobcache_fetched_bytes_total", "obd_blobcache_hits_total", "obd_blobcache_misses_total",
		"obd_blobcache_demand_fetch_seconds_bucket", "obd_device_served_bytes_total",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(string(body), "obd_blobcache_fetched_bytes_total 0\n") {
		t.Error("metrics say nothing was fetched")
	}
}

func TestServeRejectsNonOverlaybd(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	// The docker hello-world (an index of plain OCI images, one per platform).
	reg.PushIndex(t, registry.HelloWorldOCI(t), "plain",
		"sha256:726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d", "latest")
	work := t.TempDir()
	err := Serve(context.Background(), Config{
		Ref: reg.Host + "/plain:latest", Mountpoint: work, StateRoot: filepath.Join(work, "state"),
		CacheDir: filepath.Join(work, "cache"), Registry: regclient.Options{PlainHTTP: []string{reg.Host}},
	})
	if err == nil || !strings.Contains(err.Error(), "not an overlaybd image") {
		t.Fatalf("Serve of a plain OCI image: %v", err)
	}
	checkNothingLeft(t, work)
}

// TestRecordThenReplay records a trace at mount by upstream's rules (an
// empty trace file), then mounts the image cold with that trace and checks
// that the replay made /hello local before it was read.
func TestRecordThenReplay(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	base := testdata.Baselayer(t)
	for _, name := range []string{"trace", "trace.pb"} {
		t.Run(name, func(t *testing.T) {
			work := t.TempDir()
			mnt := filepath.Join(work, "mnt")
			os.Mkdir(mnt, 0o755)
			tracePath := filepath.Join(work, name)
			if err := os.WriteFile(tracePath, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := Config{
				Ref: ref, Mountpoint: mnt, StateRoot: filepath.Join(work, "state"), CacheDir: filepath.Join(work, "cache1"),
				Baselayer: base, Registry: regclient.Options{PlainHTTP: []string{reg.Host}},
				StatsInterval: 50 * time.Millisecond, StatsFile: filepath.Join(work, "stats.json"), TraceFile: tracePath,
			}
			_, stop := serveOnce(t, cfg)
			if _, err := os.Stat(tracePath + ".lock"); err != nil {
				t.Errorf("no lock file while recording: %v", err)
			}
			if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
				t.Fatalf("/hello sha256 %s", got)
			}
			stop()
			if _, err := os.Stat(tracePath + ".ok"); err != nil {
				t.Fatalf("no .ok after recording: %v", err)
			}
			if _, err := os.Stat(tracePath + ".lock"); err == nil {
				t.Error("lock file left after recording")
			}
			data, _ := os.ReadFile(tracePath)
			wantKind := trace.KindBinary
			if name == "trace.pb" {
				wantKind = trace.KindProtobuf
			}
			if k := trace.Detect(data); k != wantKind {
				t.Fatalf("recorded %v, want %v", k, wantKind)
			}

			// Cold cache, the trace replayed at mount.
			cfg.CacheDir = filepath.Join(work, "cache2")
			_, stop = serveOnce(t, cfg)
			var st Stats
			for i := 0; i < 200; i++ {
				st = readStats(t, cfg.StatsFile)
				if st.Replay != nil && (st.Replay.TraceSeconds > 0 || st.Replay.Error != "") {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if st.Replay == nil || st.Replay.Error != "" || st.Replay.BytesDone == 0 || st.Replay.Plan.Matched == 0 {
				t.Fatalf("replay stats %+v", st.Replay)
			}
			before := st.Cache.BytesFetched
			if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
				t.Fatalf("/hello sha256 %s", got)
			}
			after := stop()
			t.Logf("replay: %+v; fetched %d before reading /hello, %d after", *after.Replay, before, after.Cache.BytesFetched)
			if after.Cache.BytesFetched != before {
				t.Errorf("reading /hello after replay fetched %d more bytes", after.Cache.BytesFetched-before)
			}
			checkNothingLeft(t, work)
		})
	}
}
