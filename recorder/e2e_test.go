package recorder_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

func openBlob(t *testing.T, path string) (*lsmt.Blob, trace.Layer) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, _ := f.Stat()
	b, err := lsmt.OpenBlob(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	d, err := digest.FromReader(f)
	if err != nil {
		t.Fatal(err)
	}
	return b, trace.Layer{Digest: d, Size: st.Size()}
}

// fileExtents returns the disk byte ranges holding path's data, from
// debugfs's block list of the (read-only) device.
func fileExtents(t *testing.T, dev, path string) [][2]int64 {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "blocks "+path, dev).Output()
	if err != nil {
		t.Fatalf("debugfs blocks: %v", err)
	}
	var ranges [][2]int64
	for _, f := range strings.Fields(string(out)) {
		b, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			t.Fatalf("debugfs printed %q", out)
		}
		ranges = append(ranges, [2]int64{b * 4096, 4096})
	}
	if len(ranges) == 0 {
		t.Fatalf("no blocks for %s", path)
	}
	return ranges
}

// TestRecordHelloWorldEndToEnd records the real hello-world image on a
// real device with eBPF while /hello is read cold, checks that the trace's
// frames cover /hello's data, then adds the trace layer to the image in a
// real registry and reads it back.
func TestRecordHelloWorldEndToEnd(t *testing.T) {
	bpftest.Require(t)
	testutil.RequireTool(t, "debugfs")
	base, baseLayer := openBlob(t, testdata.Baselayer(t))
	hello, helloLayer := openBlob(t, testdata.Blob(t, testdata.HelloLayerDigest))
	stack, err := lsmt.NewStack([]lsmt.StackLayer{base, hello})
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	dev, err := device.FUSELoop{}.Attach(context.Background(), device.NewImage(stack, stack.VirtualSize()),
		device.Options{MountDir: filepath.Join(work, "fuse")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	major, minor := dev.Dev()
	bdev, err := bpf.MakeDev(major, minor)
	if err != nil {
		t.Fatal(err)
	}
	extents := fileExtents(t, dev.Path(), "/hello")

	session, err := recorder.Start(stack, bdev, recorder.SessionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	if err := unix.Mount(dev.Path(), mnt, "ext4", unix.MS_RDONLY, "noload"); err != nil {
		session.Stop()
		t.Fatal(err)
	}
	// Drop the device's buffers (what debugfs read), so the mount reads
	// from the device; /hello's pages were never cached on this new mount.
	// Targeted: a global drop_caches would upset page-cache assertions of
	// tests running in parallel.
	if fd, err := unix.Open(dev.Path(), unix.O_RDONLY, 0); err == nil {
		unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0)
		unix.Close(fd)
	}
	b, readErr := os.ReadFile(filepath.Join(mnt, "hello"))
	unix.Unmount(mnt, 0)
	res, err := session.Stop()
	if err != nil || readErr != nil {
		t.Fatalf("stop %v, read %v", err, readErr)
	}
	if len(b) != testdata.HelloSize {
		t.Fatalf("/hello is %d bytes", len(b))
	}
	if res.Lost != 0 || len(res.Frames) == 0 {
		t.Fatalf("lost %d events, %d frames", res.Lost, len(res.Frames))
	}
	tr, err := res.Trace([]trace.Layer{baseLayer, helloLayer}, trace.Meta{Source: trace.SourceCLI, Runs: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d frames, %d bytes recorded (%v per layer), %d requests", len(tr.Frames), res.Stats.RecordedBytes, res.Stats.LayerBytes, res.Stats.Requests)

	// Every layer byte holding /hello's data is in some frame of its layer.
	for _, e := range extents {
		for _, p := range stack.Map(e[0], e[1]) {
			if p.Zeroed {
				continue
			}
			if !covered(tr.Frames, p.Layer, p.LayerOffset, p.Length) {
				t.Errorf("/hello's data at layer %d [%d, +%d) is in no frame", p.Layer, p.LayerOffset, p.Length)
			}
		}
	}

	// Add the trace layer, push to a real registry, and read it back.
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	client, err := regclient.New(regclient.Options{PlainHTTP: []string{reg.Host}})
	if err != nil {
		t.Fatal(err)
	}
	store, err := client.Store(ref)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	result, err := image.AddTraceLayer(ctx, store, "obd", "obd-traced", tr, image.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	back, desc, err := image.ReadTraceLayer(ctx, store, "obd-traced")
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != result.Layer.Digest || len(back.Frames) != len(tr.Frames) || back.Layers[1].Digest != helloLayer.Digest {
		t.Fatalf("pulled trace layer %s with %d frames, pushed %s with %d", desc.Digest, len(back.Frames), result.Layer.Digest, len(tr.Frames))
	}
	for i := range tr.Frames {
		f, g := tr.Frames[i], back.Frames[i]
		if f.Layer != g.Layer || f.Offset != g.Offset || f.Length != g.Length || g.TimeNS != f.TimeNS/1000*1000 {
			t.Fatalf("frame %d: pushed %+v, pulled %+v", i, f, g)
		}
	}
	pulled, err := client.Resolve(ctx, reg.Host+"/hello-world:obd-traced")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(pulled.Layers); n != 2 || pulled.Layers[1].Annotations["containerd.io/snapshot/overlaybd/acceleration-layer"] != "yes" {
		t.Fatalf("pulled image layers %+v", pulled.Layers)
	}
	// Adding a trace again replaces the trace layer instead of stacking one.
	if _, err := image.AddTraceLayer(ctx, store, "obd-traced", "obd-traced", tr, image.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if again, err := client.Resolve(ctx, reg.Host+"/hello-world:obd-traced"); err != nil || len(again.Layers) != 2 {
		t.Fatalf("after a second trace: %v layers, %v", len(again.Layers), err)
	}
}

func covered(frames []trace.Frame, layer int, off, n int64) bool {
	for x := off; x < off+n; {
		next := x
		for _, f := range frames {
			if f.Layer == layer && f.Offset <= x && f.End() > x {
				next = max(next, f.End())
			}
		}
		if next == x {
			return false
		}
		x = next
	}
	return true
}
