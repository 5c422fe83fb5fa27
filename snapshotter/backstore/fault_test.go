package backstore

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/internal/wanproxy"
	"github.com/obdtrace/obdtrace/lsmt"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// TestServeThroughFaults mounts the image through a proxy that drops a
// third of the responses mid-body: /hello still reads right. Then the
// registry goes away: a read of data not yet cached fails with a clean EIO
// once the retry budget is spent, instead of hanging or returning zeros.
func TestServeThroughFaults(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	reg.PushHelloWorld(t)
	up, _ := url.Parse("http://" + reg.Host)
	proxy, err := wanproxy.New(up, wanproxy.Options{DropRate: 0.3, Seed: 7, DisableSlowStart: true})
	if err != nil {
		t.Fatal(err)
	}
	addr, stopProxy, err := proxy.Start(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer stopProxy()

	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	cfg := Config{
		Ref: addr + "/hello-world:obd", Mountpoint: mnt, StateRoot: filepath.Join(work, "state"),
		CacheDir: filepath.Join(work, "cache"), CacheRefillSize: 64 << 10, Baselayer: testdata.Baselayer(t),
		Registry: regclient.Options{PlainHTTP: []string{addr}, MaxRetries: 8, RetryBaseDelay: 10 * time.Millisecond,
			RetryMaxDelay: 50 * time.Millisecond, RequestTimeout: 5 * time.Second},
		StatsFile: filepath.Join(work, "stats.json"),
	}
	state, stop := serveOnce(t, cfg)
	defer stop()
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello through a lossy link: sha256 %s", got)
	}
	if d := proxy.Stats().Dropped; d == 0 {
		t.Fatalf("the proxy dropped nothing (%+v): the test proves nothing", proxy.Stats())
	}

	// The registry is gone: reading uncached device blocks must fail, not hang.
	stopProxy()
	f, err := os.OpenFile(state.Device, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, _ := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	defer unix.Munmap(buf)
	done := make(chan error, 1)
	off := uncachedOffset(t)
	go func() {
		_, err := f.ReadAt(buf, off)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, unix.EIO) {
			t.Fatalf("read of uncached data with the registry gone: %v, want EIO", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("read of uncached data hangs with the registry gone")
	}
	// What was cached still reads.
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello after the registry went away: sha256 %s", got)
	}
}

// midBlobSegment returns a data segment of the hello-world layer whose
// compressed bytes lie in the middle of the blob, away from the headers
// and index read at open and from what mounting and reading /hello touch.
func midBlobSegment(t *testing.T) lsmt.Segment {
	t.Helper()
	path := testdata.Blob(t, testdata.HelloLayerDigest)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	b := testdata.OpenBlob(t, path)
	for _, seg := range b.Index() {
		if seg.Zeroed {
			continue
		}
		start, _, err := b.BlobRange(int64(seg.MOffset)*lsmt.SectorSize, 4096)
		if err == nil && start > st.Size()*4/10 && start < st.Size()*6/10 {
			return seg
		}
	}
	t.Fatal("no segment in the middle of the blob")
	return lsmt.Segment{}
}

// uncachedOffset is the disk offset of midBlobSegment's data.
func uncachedOffset(t *testing.T) int64 {
	return int64(midBlobSegment(t).Offset) * lsmt.SectorSize
}
