package backstore

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/replayer"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// TestBadTracesNeverFailMount mounts the hello-world image with traces
// that are corrupt, name layers the image lacks, point beyond a layer or
// hold more frames than a plan takes: every mount comes up and serves
// /hello, and the stats say what replay skipped or why it did not run.
func TestBadTracesNeverFailMount(t *testing.T) {
	requireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	base := testdata.Baselayer(t)
	image := []trace.Layer{{Digest: BaselayerDigest}, {Digest: testdata.HelloLayerDigest}}
	pb := func(t *testing.T, tr *trace.Trace) []byte {
		tr.Meta = trace.Meta{Source: trace.SourceCLI, Runs: 1}
		b, err := trace.MarshalPB(tr)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	valid := trace.Frame{Layer: 1, Offset: 0, Length: 4096}
	huge := make([]trace.Frame, replayer.DefaultMaxFrames+10)
	for i := range huge {
		huge[i] = trace.Frame{Layer: 1, Offset: int64(i%64) * 4096, Length: 4096}
	}
	cases := []struct {
		name  string
		data  func(t *testing.T) []byte
		check func(t *testing.T, r *ReplayStats)
	}{
		{"corrupt", func(*testing.T) []byte { return []byte("\x0a\xffnot a trace at all") }, wantError},
		{"truncated", func(t *testing.T) []byte {
			b := pb(t, &trace.Trace{Layers: image, Frames: []trace.Frame{valid, valid}})
			return b[:len(b)*2/3]
		}, wantError},
		{"other layers", func(t *testing.T) []byte {
			var ls []trace.Layer
			for i := range 5 {
				ls = append(ls, trace.Layer{Digest: digest.FromString(string(rune('a' + i)))})
			}
			return pb(t, &trace.Trace{Layers: ls, Frames: []trace.Frame{{Layer: 4, Length: 4096}}})
		}, func(t *testing.T, r *ReplayStats) {
			wantError(t, r)
			if r.Plan.Unmatched != 1 {
				t.Errorf("unmatched %d, want 1", r.Plan.Unmatched)
			}
		}},
		{"binary, layer beyond the image", func(t *testing.T) []byte {
			var b bytes.Buffer
			if err := trace.WriteBinary(&b, []trace.Frame{{Layer: 7, Length: 4096}, valid}); err != nil {
				t.Fatal(err)
			}
			return b.Bytes()
		}, func(t *testing.T, r *ReplayStats) {
			if r.Error != "" || r.Plan.Unmatched != 1 || r.Plan.Matched != 1 {
				t.Errorf("replay %+v: want one frame replayed, one unmatched", r)
			}
		}},
		{"offsets beyond the layer", func(t *testing.T) []byte {
			return pb(t, &trace.Trace{Layers: image, Frames: []trace.Frame{{Layer: 1, Offset: 1 << 50, Length: 4096}, valid}})
		}, func(t *testing.T, r *ReplayStats) {
			if r.Error != "" || r.Plan.OutOfRange != 1 || r.Plan.Matched != 1 {
				t.Errorf("replay %+v: want one frame replayed, one out of range", r)
			}
		}},
		{"huge frame count", func(t *testing.T) []byte {
			return pb(t, &trace.Trace{Layers: image, Frames: huge})
		}, func(t *testing.T, r *ReplayStats) {
			if r.Error != "" || r.Plan.Truncated != 10 || r.Plan.Matched != replayer.DefaultMaxFrames {
				t.Errorf("replay %+v: want %d frames replayed, 10 truncated", r, replayer.DefaultMaxFrames)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			work := t.TempDir()
			mnt := filepath.Join(work, "mnt")
			os.Mkdir(mnt, 0o755)
			tracePath := filepath.Join(work, "trace.pb")
			if err := os.WriteFile(tracePath, c.data(t), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := Config{
				Ref: ref, Mountpoint: mnt, StateRoot: filepath.Join(work, "state"), CacheDir: filepath.Join(work, "cache"),
				Baselayer: base, Registry: regclient.Options{PlainHTTP: []string{reg.Host}},
				StatsInterval: 50 * time.Millisecond, StatsFile: filepath.Join(work, "stats.json"), TraceFile: tracePath,
			}
			_, stop := serveOnce(t, cfg)
			if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
				t.Errorf("/hello sha256 %s", got)
			}
			var st Stats
			for range 200 {
				if st = readStats(t, cfg.StatsFile); st.Replay != nil && (st.Replay.TraceSeconds > 0 || st.Replay.Error != "") {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			stop()
			if st.Replay == nil {
				t.Fatal("no replay stats")
			}
			c.check(t, st.Replay)
			checkNothingLeft(t, work)
		})
	}
}

func wantError(t *testing.T, r *ReplayStats) {
	t.Helper()
	if r.Error == "" {
		t.Errorf("replay %+v: want an error recorded", r)
	}
}

// TestReplaysStop stops a replay still waiting for its filesystem (a path
// list waits for the mount): stop cancels it and returns once it has
// ended, and no replay starts after it.
func TestReplaysStop(t *testing.T) {
	list := filepath.Join(t.TempDir(), "list")
	if err := os.WriteFile(list, []byte("/hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := &Image{}
	mon := newMonitor("ref", "/mnt", img, nil)
	cfg := Config{TraceFile: list, mounted: make(chan struct{}), Logger: zerolog.Nop()}
	rp := newReplays(context.Background())
	if err := rp.start(cfg, img, mon, cfg.Logger); err != nil {
		t.Fatal(err)
	}
	if err := rp.stop(); err != nil {
		t.Fatalf("stop: %v (the replay did not end once cancelled)", err)
	}
	if mon.replay == nil || mon.replay.Error != "" {
		t.Errorf("replay stats %+v: a cancelled replay is not an error", mon.replay)
	}
	if err := rp.start(cfg, img, mon, cfg.Logger); !errors.Is(err, ErrStopping) {
		t.Errorf("start after stop: %v, want ErrStopping", err)
	}
	if err := rp.stop(); err != nil {
		t.Errorf("second stop: %v", err)
	}
}
