package backstore

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// gate is a registry proxy that, once closed, holds every ranged blob
// read until its client gives up or the gate opens again.
type gate struct {
	proxy                             http.Handler
	closed                            atomic.Bool
	open                              chan struct{} // closed by release
	held                              chan struct{} // closed at the first read held
	cancelled                         chan struct{} // closed when a held read's client gives up
	heldOnce, cancelOnce, releaseOnce sync.Once
}

func newGate(upstream string) *gate {
	u := &url.URL{Scheme: "http", Host: upstream}
	return &gate{proxy: httputil.NewSingleHostReverseProxy(u), open: make(chan struct{}),
		held: make(chan struct{}), cancelled: make(chan struct{})}
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if g.closed.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") != "" {
		g.heldOnce.Do(func() { close(g.held) })
		select {
		case <-r.Context().Done():
			g.cancelOnce.Do(func() { close(g.cancelled) })
			return
		case <-g.open:
		}
	}
	g.proxy.ServeHTTP(w, r)
}

func (g *gate) release() { g.releaseOnce.Do(func() { close(g.open) }) }

// logLines returns the messages of a server's JSON log (with the teardown
// step named, if any) in order.
func logLines(log *testutil.Buffer) []string {
	var out []string
	for _, l := range strings.Split(log.String(), "\n") {
		var e struct{ Message, Step string }
		if json.Unmarshal([]byte(l), &e) == nil {
			out = append(out, strings.TrimSpace(e.Message+" "+e.Step))
		}
	}
	return out
}

// midLayerOffset is the offset, in the hello-world layer's byte space (as
// trace frames name it), of data stored in the middle of its blob: nothing
// that mounting reads.
func midLayerOffset(t *testing.T) int64 {
	return int64(midBlobSegment(t).MOffset) * lsmt.SectorSize
}

func indexOf(lines []string, want string) int {
	for i, l := range lines {
		if l == want {
			return i
		}
	}
	return -1
}

// TestServeStopsDuringReplay stops a server while a replay asked for on
// the control socket waits for the registry (which never answers it) and a
// recording runs: Serve must cancel the replay, wait for it to end before
// the filesystem is unmounted, write the recording's trace and return
// cleanly, all without the registry answering. A teardown that waited for
// the replay's plan would hang here until the fetch's 5-minute timeout.
func TestServeStopsDuringReplay(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	g := newGate(reg.Host)
	proxy := httptest.NewServer(g)
	defer proxy.Close()
	defer g.release() // before Close, which waits for held requests
	proxyHost := strings.TrimPrefix(proxy.URL, "http://")

	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	var logs testutil.Buffer
	cfg := Config{
		Ref: proxyHost + strings.TrimPrefix(ref, reg.Host), Mountpoint: mnt, StateRoot: filepath.Join(work, "state"),
		CacheDir: filepath.Join(work, "cache"), CacheRefillSize: 4 << 10, CacheBlockSize: 4 << 10,
		Baselayer: testdata.Baselayer(t),
		Registry:  regclient.Options{PlainHTTP: []string{proxyHost}, RequestTimeout: 5 * time.Minute},
		StatsFile: filepath.Join(work, "stats.json"), StatsInterval: 50 * time.Millisecond,
		Logger: zerolog.New(zerolog.MultiLevelWriter(&logs, zerolog.NewTestWriter(t))).Level(zerolog.DebugLevel),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan State, 1)
	cfg.Ready = func(s State) { ready <- s }
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, cfg) }()
	var state State
	select {
	case state = <-ready:
	case err := <-done:
		t.Fatalf("Serve failed before ready: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("Serve not ready after 2 minutes")
	}

	// A recording, and a replay of one 4 KiB frame from the middle of the
	// layer, which mounting never reads: its fetch reaches the gate.
	rec := emptyFile(t, filepath.Join(work, "rec.trace"))
	if err := SendControl(ctx, state, ControlRequest{Op: OpRecord, Path: rec}); err != nil {
		t.Fatal(err)
	}
	g.closed.Store(true)
	pb, err := trace.MarshalPB(&trace.Trace{
		Meta:   trace.Meta{Source: trace.SourceCLI, Runs: 1},
		Layers: []trace.Layer{{Digest: BaselayerDigest}, {Digest: testdata.HelloLayerDigest}},
		Frames: []trace.Frame{{Layer: 1, Offset: midLayerOffset(t), Length: 4096}},
	})
	if err != nil {
		t.Fatal(err)
	}
	tracePath := filepath.Join(work, "replay.trace.pb")
	if err := os.WriteFile(tracePath, pb, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := SendControl(ctx, state, ControlRequest{Op: OpReplay, Path: tracePath}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.held:
	case <-time.After(time.Minute):
		t.Fatal("the replay's fetch never reached the registry")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Serve did not return while a replay's fetch was held: its teardown waits for the replay's plan")
	}
	select {
	case <-g.cancelled:
	case <-time.After(10 * time.Second):
		t.Error("the held fetch was never cancelled: the replay outlived Serve")
	}
	lines := logLines(&logs)
	stopped, unmount := indexOf(lines, "replay stopped"), indexOf(lines, "teardown step ext4 mount")
	if stopped < 0 || unmount < 0 || stopped > unmount {
		t.Errorf("log order: replay stopped at line %d, ext4 unmounted at line %d; want the replay ended first", stopped, unmount)
	}
	st := readStats(t, cfg.StatsFile)
	if st.Replay == nil || st.Replay.Source != tracePath || st.Replay.TraceSeconds != 0 || st.Replay.Error != "" {
		t.Errorf("replay stats %+v: want the replay of %s cut short, without an error", st.Replay, tracePath)
	}
	if _, err := os.Stat(rec + ".ok"); err != nil {
		t.Errorf("the recording running at the stop left no trace: %v", err)
	}
	checkNothingLeft(t, work)
}
