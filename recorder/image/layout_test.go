package image

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/trace"
)

// helloLayout copies upstream's hello-world OCI layout into a temporary directory (the
// shared copy is read-only) and opens it.
func helloLayout(t *testing.T) (*Layout, string) {
	t.Helper()
	src, dst := testdata.OCILayout(t), t.TempDir()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := OpenLayout(dst)
	if err != nil {
		t.Fatal(err)
	}
	return l, dst
}

// readImage returns the manifest and config ref names in l.
func readImage(t *testing.T, l *Layout, ref string) (ocispec.Descriptor, ocispec.Manifest, testConfig) {
	t.Helper()
	ctx := context.Background()
	desc, err := l.ResolveManifest(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	data, err := ReadVerified(ctx, l, desc, MaxManifestSize)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	cfg, err := ReadVerified(ctx, l, m.Config, MaxConfigSize)
	if err != nil {
		t.Fatal(err)
	}
	var c testConfig
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	return desc, m, c
}

func TestAddTraceLayerOCILayout(t *testing.T) {
	ctx := context.Background()
	l, dir := helloLayout(t)
	origDesc, orig, origCfg := readImage(t, l, "amd64-converted")
	tr := sampleTrace(40, 3)
	tr.Layers = tr.Layers[:1]
	tr.Layers[0] = trace.Layer{Digest: orig.Layers[0].Digest, Size: orig.Layers[0].Size, MediaType: orig.Layers[0].MediaType}
	for i := range tr.Frames {
		tr.Frames[i].Layer = 0
	}

	res, err := AddTraceLayer(ctx, l, "amd64-converted", "amd64-traced", tr, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	desc, m, c := readImage(t, l, "amd64-traced")
	if desc.Digest != res.Manifest.Digest || res.Replaced != nil {
		t.Errorf("resolved %v, result %+v", desc.Digest, res)
	}
	if len(m.Layers) != 2 || m.Layers[0].Digest != orig.Layers[0].Digest || m.Layers[1].Digest != res.Layer.Digest ||
		!IsTraceLayer(m.Layers[1]) || m.Layers[1].MediaType != ocispec.MediaTypeImageLayer {
		t.Fatalf("layers %+v", m.Layers)
	}
	if !reflect.DeepEqual(c.RootFS.DiffIDs, []digest.Digest{origCfg.RootFS.DiffIDs[0], res.Layer.Digest}) {
		t.Errorf("diff_ids %v", c.RootFS.DiffIDs)
	}
	if len(c.History) != 3 || c.History[2].CreatedBy != DefaultCreatedBy || c.History[2].EmptyLayer {
		t.Errorf("history %+v", c.History)
	}
	got, layerDesc, err := ReadTraceLayer(ctx, l, "amd64-traced")
	if err != nil {
		t.Fatal(err)
	}
	if layerDesc.Digest != res.Layer.Digest || !reflect.DeepEqual(got, tr) {
		t.Errorf("trace read back %+v\nwant %+v", got, tr)
	}
	// The source is untouched and every other entry of index.json survives.
	if d, _, _ := readImage(t, l, "amd64-converted"); d.Digest != origDesc.Digest {
		t.Error("the source ref moved")
	}
	x, err := l.readIndex()
	if err != nil {
		t.Fatal(err)
	}
	if len(x.Manifests) != 12 {
		t.Errorf("index.json has %d entries, want the 11 upstream ones plus ours", len(x.Manifests))
	}
	if _, _, err := ReadTraceLayer(ctx, l, "amd64-converted"); !errors.Is(err, ErrNoTrace) {
		t.Errorf("ReadTraceLayer of an image without one: %v, want ErrNoTrace", err)
	}

	// Again, in place: the trace layer is replaced, not stacked.
	tr2 := *tr
	tr2.Frames = tr.Frames[:10]
	res2, err := AddTraceLayer(ctx, l, "amd64-traced", "amd64-traced", &tr2, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, m2, c2 := readImage(t, l, "amd64-traced")
	if res2.Replaced == nil || res2.Replaced.Digest != res.Layer.Digest || len(m2.Layers) != 2 ||
		m2.Layers[1].Digest != res2.Layer.Digest || len(c2.RootFS.DiffIDs) != 2 || len(c2.History) != 3 {
		t.Fatalf("second trace layer stacked: %+v", m2.Layers)
	}
	if x, _ := l.readIndex(); len(x.Manifests) != 12 {
		t.Errorf("retagging added an index entry: %d", len(x.Manifests))
	}

	// The same trace twice gives the same layer and, with no date, the same manifest.
	res3, err := AddTraceLayer(ctx, l, "amd64-converted", "amd64-again", tr, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res3.Layer.Digest != res.Layer.Digest || res3.Manifest.Digest != res.Manifest.Digest {
		t.Errorf("same trace: layer %s vs %s, manifest %s vs %s", res3.Layer.Digest, res.Layer.Digest,
			res3.Manifest.Digest, res.Manifest.Digest)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, "blobs", "sha256", ".*"))
	if len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

func TestAddTraceLayerDockerManifest(t *testing.T) {
	ctx := context.Background()
	l, _ := helloLayout(t)
	if _, err := AddTraceLayer(ctx, l, "amd64", "amd64-traced", sampleTrace(4, 1), UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	desc, m, c := readImage(t, l, "amd64-traced")
	if desc.MediaType != MediaTypeDockerManifest || m.Layers[1].MediaType != MediaTypeDockerLayer || len(c.RootFS.DiffIDs) != 2 {
		t.Errorf("docker image became %s with layers %+v", desc.MediaType, m.Layers)
	}
	if desc.Platform == nil || desc.Platform.Architecture != "amd64" {
		t.Errorf("platform not carried over: %+v", desc.Platform)
	}
}

func TestLayoutErrors(t *testing.T) {
	ctx := context.Background()
	l, dir := helloLayout(t)
	if _, err := l.ResolveManifest(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown ref: %v", err)
	}
	if _, err := AddTraceLayer(ctx, l, "docker-list", "x", sampleTrace(1, 1), UpdateOptions{}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("index ref: %v, want ErrUnsupported", err)
	}
	d, err := l.ResolveManifest(ctx, "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88")
	if err != nil || d.MediaType != ocispec.MediaTypeImageManifest || d.Size != 641 {
		t.Errorf("resolve by digest: %+v, %v", d, err)
	}
	if _, err := l.ReadBlob(ctx, ocispec.Descriptor{Digest: "sha256:../../../etc/passwd"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("path in a digest: %v, want ErrInvalid", err)
	}
	if _, err := l.ReadBlob(ctx, ocispec.Descriptor{Digest: digest.FromString("absent")}); !errors.Is(err, ErrNotFound) {
		t.Errorf("absent blob: %v, want ErrNotFound", err)
	}
	data := []byte("some bytes")
	bad := ocispec.Descriptor{Digest: digest.FromString("other"), Size: int64(len(data))}
	if err := l.WriteBlob(ctx, bad, bytes.NewReader(data)); !errors.Is(err, ErrDigest) {
		t.Errorf("wrong digest: %v, want ErrDigest", err)
	}
	if _, err := os.Stat(l.blobPath(bad.Digest)); !errors.Is(err, fs.ErrNotExist) {
		t.Error("a blob with the wrong content was stored")
	}
	short := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data)) - 1}
	if err := l.WriteBlob(ctx, short, bytes.NewReader(data)); !errors.Is(err, ErrDigest) {
		t.Errorf("wrong size: %v, want ErrDigest", err)
	}
	good := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))}
	if err := l.WriteBlob(ctx, good, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	rc, err := l.ReadBlob(ctx, good)
	if err != nil {
		t.Fatal(err)
	}
	back, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(back, data) {
		t.Error("blob read back differs")
	}
	if err := l.PutManifest(ctx, "has space", good, data); !errors.Is(err, ErrInvalid) {
		t.Errorf("ref with a space: %v", err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := l.ResolveManifest(cancelled, "amd64"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v", err)
	}
	if _, err := OpenLayout(filepath.Join(dir, "blobs")); !errors.Is(err, ErrNotFound) {
		t.Errorf("not a layout: %v", err)
	}
}
