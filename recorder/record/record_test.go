package record

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/trace"
)

// memStore is an image.Store in memory; it counts the blobs read.
type memStore struct {
	blobs     map[string][]byte
	manifests map[string]ocispec.Descriptor
	reads     int
	// annotations holds the annotations each blob was written with.
	annotations map[string]map[string]string
}

func newMemStore() *memStore {
	return &memStore{blobs: map[string][]byte{}, manifests: map[string]ocispec.Descriptor{}, annotations: map[string]map[string]string{}}
}

func (s *memStore) ResolveManifest(_ context.Context, ref string) (ocispec.Descriptor, error) {
	d, ok := s.manifests[ref]
	if !ok {
		return d, fmt.Errorf("%w: %s", image.ErrNotFound, ref)
	}
	return d, nil
}

func (s *memStore) ReadBlob(_ context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	b, ok := s.blobs[desc.Digest.String()]
	if !ok {
		return nil, fmt.Errorf("%w: blob %s", image.ErrNotFound, desc.Digest)
	}
	s.reads++
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (s *memStore) WriteBlob(_ context.Context, desc ocispec.Descriptor, r io.Reader) error {
	if _, ok := s.blobs[desc.Digest.String()]; ok {
		return nil
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if desc.Digest.Algorithm().FromBytes(b) != desc.Digest {
		return fmt.Errorf("%w: blob %s", image.ErrDigest, desc.Digest)
	}
	s.blobs[desc.Digest.String()] = b
	s.annotations[desc.Digest.String()] = desc.Annotations
	return nil
}

func (s *memStore) PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error {
	if err := s.WriteBlob(ctx, desc, bytes.NewReader(manifest)); err != nil {
		return err
	}
	s.manifests[ref] = desc
	return nil
}

// put stores data as a blob and returns its descriptor.
func (s *memStore) put(mediaType string, data []byte, annotations map[string]string) ocispec.Descriptor {
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data)), Annotations: annotations}
	s.blobs[d.Digest.String()] = data
	return d
}

// putImage stores an image of layers (and their config) tagged ref.
func (s *memStore) putImage(t *testing.T, ref string, layers ...ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	var diffIDs []string
	for _, l := range layers {
		diffIDs = append(diffIDs, fmt.Sprintf("%q", l.Digest))
	}
	cfg := s.put(ocispec.MediaTypeImageConfig, []byte(`{"rootfs":{"type":"layers","diff_ids":[`+strings.Join(diffIDs, ",")+`]}}`), nil)
	var ls []string
	for _, l := range layers {
		ann := ""
		if image.IsTraceLayer(l) {
			ann = `,"annotations":{"containerd.io/snapshot/overlaybd/acceleration-layer":"yes"}`
		}
		ls = append(ls, fmt.Sprintf(`{"mediaType":%q,"digest":%q,"size":%d%s}`, l.MediaType, l.Digest, l.Size, ann))
	}
	manifest := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":%q,"digest":%q,"size":%d},"layers":[%s]}`,
		ocispec.MediaTypeImageManifest, cfg.MediaType, cfg.Digest, cfg.Size, strings.Join(ls, ","))
	desc := s.put(ocispec.MediaTypeImageManifest, []byte(manifest), nil)
	s.manifests[ref] = desc
	return desc
}

func layer(s string) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString(s), Size: int64(len(s))}
}

func TestNormalize(t *testing.T) {
	o := Options{Image: "hello-world", NewImage: "127.0.0.1:5000/x/y:v2", Duration: time.Second}
	if err := o.normalize(); err != nil {
		t.Fatal(err)
	}
	if o.Image != "docker.io/library/hello-world:latest" || o.NewImage != "127.0.0.1:5000/x/y:v2" ||
		o.Snapshotter != DefaultSnapshotter || o.StopGrace != DefaultStopGrace || o.TraceTimeout != DefaultTraceTimeout {
		t.Errorf("normalized %+v", o)
	}
	for _, bad := range []Options{
		{Image: "a", NewImage: "b"},
		{Image: "a", NewImage: "b", Duration: -time.Second},
		{Image: "bad ref", NewImage: "b", Duration: time.Second},
		{Image: "a", NewImage: "", Duration: time.Second},
	} {
		if err := bad.normalize(); !errors.Is(err, ErrOptions) {
			t.Errorf("%+v: err %v, want ErrOptions", bad, err)
		}
	}
}

func TestParseMount(t *testing.T) {
	m, err := ParseMount("type=bind,src=/a,dst=/b")
	if err != nil || m.Type != "bind" || m.Source != "/a" || m.Destination != "/b" || !reflect.DeepEqual(m.Options, []string{"rbind", "ro"}) {
		t.Errorf("got %+v, %v", m, err)
	}
	m, err = ParseMount("source=/a,target=/b,options=rbind:rw")
	if err != nil || !reflect.DeepEqual(m.Options, []string{"rbind", "rw"}) {
		t.Errorf("got %+v, %v", m, err)
	}
	for _, bad := range []string{"", "src=/a", "src=/a,dst=rel", "src=/a,dst=/b,x=1", "src=/a,dst=/b,novalue", "type=,src=/a,dst=/b"} {
		if _, err := ParseMount(bad); !errors.Is(err, ErrOptions) {
			t.Errorf("%q: err %v, want ErrOptions", bad, err)
		}
	}
}

func FuzzParseMount(f *testing.F) {
	f.Add("type=bind,src=/a,dst=/b,options=rbind:ro")
	f.Add("src=/a,dst=/b")
	f.Add(",,=")
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseMount(s)
		if err != nil {
			if !errors.Is(err, ErrOptions) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		if m.Source == "" || !filepath.IsAbs(m.Destination) || m.Type == "" {
			t.Fatalf("accepted %q as %+v", s, m)
		}
	})
}

func TestPushImage(t *testing.T) {
	ctx := context.Background()
	base1, base2 := layer("base one"), layer("base two")
	trace := layer("trace")
	trace.Annotations = map[string]string{image.AnnotationAcceleration: "yes"}
	local, remote, dst := newMemStore(), newMemStore(), newMemStore()
	desc := local.putImage(t, "new", base1, base2, trace)
	local.put(trace.MediaType, []byte("trace"), nil)
	remote.put(base1.MediaType, []byte("base one"), nil)
	remote.put(base2.MediaType, []byte("base two"), nil)
	dst.put(base1.MediaType, []byte("base one"), nil) // the registry has it already

	from, _ := reference.ParseDockerRef("127.0.0.1:5000/src/img:v1")
	if err := pushImage(ctx, dst, "127.0.0.1:5000/dst:v2", desc, from, local, remote); err != nil {
		t.Fatal(err)
	}
	if got := dst.manifests["127.0.0.1:5000/dst:v2"]; got.Digest != desc.Digest {
		t.Fatalf("pushed manifest %v, want %v", got.Digest, desc.Digest)
	}
	for d, b := range local.blobs {
		if !bytes.Equal(dst.blobs[d], b) {
			t.Errorf("blob %s not pushed", d)
		}
	}
	if remote.reads != 1 {
		t.Errorf("%d blobs read from the source repository, want 1 (the one the registry lacked)", remote.reads)
	}
	if got := dst.annotations[base2.Digest.String()][distributionSource+"127.0.0.1:5000"]; got != "src/img" {
		t.Errorf("mount source annotation %q, want src/img", got)
	}

	missing := newMemStore()
	desc = local.putImage(t, "broken", layer("nowhere"))
	if err := pushImage(ctx, missing, "x", desc, from, local, remote); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("blob in no source: err %v, want image.ErrNotFound", err)
	}
}

func traceOf(layers ...ocispec.Descriptor) *trace.Trace {
	t := &trace.Trace{}
	for _, l := range layers {
		t.Layers = append(t.Layers, trace.Layer{Digest: l.Digest, Size: l.Size})
	}
	return t
}

func TestCheckLayers(t *testing.T) {
	ctx := context.Background()
	l1, l2, base := layer("one"), layer("two"), layer("baselayer")
	old := layer("old trace")
	old.Annotations = map[string]string{image.AnnotationAcceleration: "yes"}
	s := newMemStore()
	s.putImage(t, "img", l1, l2, old)
	for _, tc := range []struct {
		name string
		tr   *trace.Trace
		ok   bool
	}{
		{"same layers", traceOf(l1, l2), true},
		{"baselayer beneath", traceOf(base, l1, l2), true},
		{"swapped", traceOf(l2, l1), false},
		{"one missing", traceOf(l1), false},
		{"two extra", traceOf(base, base, l1, l2), false},
		{"trace layer listed", traceOf(l1, l2, old), false},
	} {
		err := checkLayers(ctx, s, "img", tc.tr)
		if tc.ok != (err == nil) || err != nil && !errors.Is(err, ErrTraceMismatch) {
			t.Errorf("%s: err %v", tc.name, err)
		}
	}
	if err := checkLayers(ctx, s, "absent", traceOf(l1)); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("absent image: err %v", err)
	}
}

func TestTraceFile(t *testing.T) {
	ctx := context.Background()
	tf, err := newTraceFile(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(string(tf)); err != nil || st.Size() != 0 || !strings.HasSuffix(string(tf), ".pb") {
		t.Fatalf("trace file %s: %v, %v", tf, st, err)
	}
	if tf.recording() {
		t.Error("recording before the lock exists")
	}
	os.WriteFile(tf.lock(), nil, 0o644)
	if !tf.recording() {
		t.Error("not recording with the lock present")
	}
	if err := tf.stopRecording(); err != nil || tf.recording() {
		t.Errorf("stopRecording: %v, recording %v", err, tf.recording())
	}
	if err := tf.stopRecording(); err != nil {
		t.Errorf("second stopRecording: %v", err)
	}
	start := time.Now()
	if err := tf.wait(ctx, 300*time.Millisecond); !errors.Is(err, ErrNoTrace) || time.Since(start) < 300*time.Millisecond {
		t.Errorf("wait without .ok: %v after %v", err, time.Since(start))
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := tf.wait(cctx, time.Minute); !errors.Is(err, context.Canceled) {
		t.Errorf("wait, cancelled: %v", err)
	}
	// The caller's own deadline is not the trace's timeout.
	dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer dcancel()
	if err := tf.wait(dctx, time.Minute); !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrNoTrace) {
		t.Errorf("wait past the caller's deadline: %v, want the deadline's error and not ErrNoTrace", err)
	}
	if _, _, err := tf.read(); !errors.Is(err, ErrNoTrace) {
		t.Errorf("read of an empty file: %v", err)
	}

	want := traceOf(layer("one"))
	want.Frames = []trace.Frame{{Layer: 0, Offset: 4096, Length: 8192, TimeNS: 5000}}
	want.Meta.Runs = 1
	pb, err := trace.MarshalPB(want)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(string(tf), pb, 0o644)
	os.WriteFile(tf.ok(), []byte(`{"lost":3,"frames":1}`), 0o644)
	if err := tf.wait(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	got, st, err := tf.read()
	if err != nil || !reflect.DeepEqual(got.Frames, want.Frames) || st.Lost == nil || *st.Lost != 3 {
		t.Errorf("read %+v, %+v, %v", got, st, err)
	}
	for _, ok := range []string{"", "not json", `{"lost":-1}`} {
		os.WriteFile(tf.ok(), []byte(ok), 0o644)
		if _, st, _ := tf.read(); st.Lost != nil {
			t.Errorf(".ok %q: lost %v, want unknown", ok, *st.Lost)
		}
	}
	if err := tf.remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(string(tf))); !os.IsNotExist(err) {
		t.Errorf("trace directory left: %v", err)
	}
}

func TestSummaryWriteText(t *testing.T) {
	lost := uint64(7)
	old := layer("old")
	s := &Summary{Image: "a", NewImage: "b", Recorded: 1500 * time.Millisecond, Stopped: StopExited, Lost: &lost,
		Layer: layer("new"), Replaced: &old, Pushed: true}
	var buf bytes.Buffer
	if err := s.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"recorded a for 1.5s (exited, exit code 0); lost events: 7", "new image:        b",
		"old trace layer:  " + old.Digest.String(), "pushed:           yes"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, buf.String())
		}
	}
	s.Lost, s.Replaced = nil, nil
	buf.Reset()
	s.WriteText(&buf)
	if !strings.Contains(buf.String(), "lost events: unknown") || !strings.Contains(buf.String(), "old trace layer:  none") {
		t.Errorf("summary:\n%s", buf.String())
	}
}

func TestNetworkOpts(t *testing.T) {
	ctx := context.Background()
	netns := func(s *oci.Spec) *specs.LinuxNamespace {
		for i, ns := range s.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				return &s.Linux.Namespaces[i]
			}
		}
		return nil
	}
	base := func() *oci.Spec {
		return &oci.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace, Path: "/proc/1/ns/net"}}}}
	}
	s := base()
	if err := oci.ApplyOpts(ctx, nil, &containers.Container{}, s, networkOpts(false)...); err != nil {
		t.Fatal(err)
	}
	if ns := netns(s); ns == nil || ns.Path != "" || len(s.Mounts) != 0 {
		t.Errorf("own network: namespace %+v, mounts %+v; want a new namespace", ns, s.Mounts)
	}
	s = base()
	if err := oci.ApplyOpts(ctx, nil, &containers.Container{}, s, networkOpts(true)...); err != nil {
		t.Fatal(err)
	}
	var hosts bool
	for _, m := range s.Mounts {
		hosts = hosts || m.Destination == "/etc/hosts" && m.Source == "/etc/hosts"
	}
	if ns := netns(s); ns != nil || !hosts || len(s.Linux.Namespaces) != 1 {
		t.Errorf("host network: namespace %+v, mounts %+v; want none and the host's /etc/hosts", ns, s.Mounts)
	}
}
