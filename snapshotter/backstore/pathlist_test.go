package backstore

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// helloConfig is a mount of the converted hello-world under work, with 4
// KiB cache blocks and refill windows, so that the mount's own reads do
// not fetch /hello's blocks with the metadata beside them.
func helloConfig(t *testing.T, work string) Config {
	t.Helper()
	reg := registry.Start(t, registry.Options{})
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	return Config{
		Ref: reg.PushHelloWorld(t), Mountpoint: mnt, StateRoot: filepath.Join(work, "state"),
		CacheDir: filepath.Join(work, "cache"), CacheRefillSize: 4 << 10, CacheBlockSize: 4 << 10,
		Baselayer: testdata.Baselayer(t), Registry: regclient.Options{PlainHTTP: []string{reg.Host}},
		StatsInterval: 50 * time.Millisecond, StatsFile: filepath.Join(work, "stats.json"),
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	}
}

// waitReplay waits until the stats file says the replay's trace phase
// ended (or failed).
func waitReplay(t *testing.T, statsFile string) Stats {
	t.Helper()
	var st Stats
	for i := 0; i < 400; i++ {
		st = readStats(t, statsFile)
		if st.Replay != nil && (st.Replay.TraceSeconds > 0 || st.Replay.Error != "") {
			return st
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("replay did not finish: %+v", st.Replay)
	return st
}

// TestPathListReplay mounts the real hello-world cold with upstream's path
// list "/hello" as the trace: /hello's extents are prefetched before it is
// read, so the read fetches nothing and finds prefetched blocks.
func TestPathListReplay(t *testing.T) {
	requireRoot(t)
	work := t.TempDir()
	cfg := helloConfig(t, work)
	cfg.TraceFile = filepath.Join(work, "list")
	if err := os.WriteFile(cfg.TraceFile, []byte("/hello\n/missing\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if mode, err := CheckTraceFile(cfg.TraceFile); mode != TraceReplay || err != nil {
		t.Fatalf("CheckTraceFile: %v, %v", mode, err)
	}
	_, stop := serveOnce(t, cfg)
	st := waitReplay(t, cfg.StatsFile)
	if st.Replay.Error != "" || st.Replay.Plan.Matched == 0 || st.Replay.BytesDone == 0 {
		t.Fatalf("path list replay: %+v", *st.Replay)
	}
	before := st.Cache.BytesFetched
	if got := sha256File(t, filepath.Join(cfg.Mountpoint, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello sha256 %s", got)
	}
	after := stop()
	t.Logf("path list replay: %+v; fetched %d before reading /hello, %d after; prefetched %d, prefetch hits %d",
		*after.Replay, before, after.Cache.BytesFetched, after.Cache.PrefetchedBytes, after.Cache.PrefetchHits)
	if after.Cache.PrefetchHits == 0 {
		t.Error("no prefetch hits: /hello's blocks were not fetched ahead of its read")
	}
	if after.Cache.BytesFetched != before {
		t.Errorf("reading /hello after the replay fetched %d more bytes", after.Cache.BytesFetched-before)
	}
	checkNothingLeft(t, work)
}

// TestPathListTrace resolves path lists on a mounted image: files and
// directories (recursively), entries that do not resolve, and symlinks
// that would leave the image's filesystem.
func TestPathListTrace(t *testing.T) {
	requireRoot(t)
	work := t.TempDir()
	cfg := helloConfig(t, work)
	cfg.NoReplay = true
	_, stop := serveOnce(t, cfg)
	defer func() {
		stop()
		checkNothingLeft(t, work)
	}()
	// The same image opened beside the mount (own cache): PathListTrace
	// needs only its merged index, the extents come from the mount.
	ctx := context.Background()
	client, err := regclient.New(cfg.Registry)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := blobcache.Open(filepath.Join(work, "cache2"), blobcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	img, err := OpenImage(ctx, client, cache, cfg.Ref, OpenOptions{Baselayer: cfg.Baselayer})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()

	hello, st, err := PathListTrace(ctx, cfg.Mountpoint, []string{"/hello"}, img)
	if err != nil || st.Files != 1 || st.Skipped != 0 || len(hello.Frames) == 0 {
		t.Fatalf("/hello: %+v, %+v, %v", hello, st, err)
	}
	var bytes int64
	for _, f := range hello.Frames {
		bytes += f.Length
		if img.Layers[f.Layer].Cache == nil {
			t.Errorf("frame %+v is in the local baselayer: /hello is in the image's layer", f)
		}
	}
	if info, err := os.Stat(filepath.Join(cfg.Mountpoint, "hello")); err != nil || bytes < info.Size() || bytes > info.Size()+4096 {
		t.Errorf("/hello's frames cover %d bytes for a %d-byte file (%v)", bytes, info.Size(), err)
	}
	// "/" walks the whole filesystem: /hello is its only regular file.
	all, st, err := PathListTrace(ctx, cfg.Mountpoint, []string{"/", "/nothing", "/hello/"}, img)
	if err != nil || st.Files != 1 || st.Skipped != 2 || len(all.Frames) != len(hello.Frames) {
		t.Errorf("/ and bad entries: %d frames, %+v, %v", len(all.Frames), st, err)
	}
	if _, _, err := PathListTrace(ctx, cfg.Mountpoint, []string{"/missing", "/etc/passwd"}, img); !errors.Is(err, ErrBadTrace) {
		t.Errorf("a list naming nothing in the image: %v, want ErrBadTrace", err)
	}
	if err := trace.ToBinary(io.Discard, hello); err != nil {
		t.Errorf("the path list's trace in upstream's binary form: %v", err)
	}
}
