package backstore

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// TestServeRemoteLayersInOrder mounts a two-layer image whose layers both
// come from the registry (upstream's baselayer pushed as a layer, then the
// converted hello-world): the layers open side by side and must still stack
// in the manifest's order, or /hello would not read back.
func TestServeRemoteLayersInOrder(t *testing.T) {
	requireRoot(t)
	layout, base, hello := twoLayerLayout(t)
	reg := registry.Start(t, registry.Options{})
	reg.PushRef(t, layout, "two", "two-layers:obd")
	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	cfg := Config{
		Ref: reg.Host + "/two-layers:obd", Mountpoint: mnt, StateRoot: filepath.Join(work, "state"),
		CacheDir: filepath.Join(work, "cache"), Baselayer: testdata.Baselayer(t),
		Registry:      regclient.Options{PlainHTTP: []string{reg.Host}},
		StatsInterval: 100 * time.Millisecond, StatsFile: filepath.Join(work, "stats.json"),
	}
	_, stop := serveOnce(t, cfg)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Errorf("/hello sha256 %s, want %s", got, testdata.HelloSHA256)
	}
	stats := stop()
	checkNothingLeft(t, work)
	var remote []digest.Digest
	for _, l := range stats.Layers {
		if !l.Local {
			remote = append(remote, l.Digest)
		}
	}
	if len(remote) != 2 || remote[0] != base || remote[1] != hello {
		t.Errorf("remote layers %v, want [%s %s] (the manifest's order)", remote, base, hello)
	}
}

// twoLayerLayout writes an OCI layout (ref "two") whose manifest lists the
// baselayer blob and the converted hello-world layer, and returns it with
// the two layer digests.
func twoLayerLayout(t *testing.T) (dir string, base, hello digest.Digest) {
	t.Helper()
	src := registry.HelloWorldOCI(t)
	var m ocispec.Manifest
	readJSON(t, registry.BlobPath(src, "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"), &m)
	dir = t.TempDir()
	os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755)
	put := func(b []byte) ocispec.Descriptor {
		d := digest.FromBytes(b)
		if err := os.WriteFile(registry.BlobPath(dir, d.String()), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return ocispec.Descriptor{Digest: d, Size: int64(len(b))}
	}
	copyBlob := func(d ocispec.Descriptor) {
		b, err := os.ReadFile(registry.BlobPath(src, d.Digest.String()))
		if err != nil {
			t.Fatal(err)
		}
		put(b)
	}
	copyBlob(m.Config)
	copyBlob(m.Layers[0])
	b, err := os.ReadFile(testdata.Baselayer(t))
	if err != nil {
		t.Fatal(err)
	}
	bd := put(b)
	bd.MediaType = m.Layers[0].MediaType
	bd.Annotations = map[string]string{AnnotationBlobDigest: bd.Digest.String(), AnnotationBlobSize: strconv.FormatInt(bd.Size, 10)}
	m.Layers = []ocispec.Descriptor{bd, m.Layers[0]}
	mb, _ := json.Marshal(m)
	md := put(mb)
	md.MediaType = ocispec.MediaTypeImageManifest
	md.Annotations = map[string]string{ocispec.AnnotationRefName: "two"}
	ib, _ := json.Marshal(ocispec.Index{Versioned: m.Versioned, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{md}})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), ib, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, bd.Digest, m.Layers[1].Digest
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// TestOpenTail: the last refill window, and the one before when the last
// is under a quarter of one, but never more than the blob.
func TestOpenTail(t *testing.T) {
	const w = 256 << 10
	for _, c := range []struct{ size, want int64 }{
		{100, 100},
		{642560, 642560 - 2*w},       // last window 118 KiB
		{79443968, 14336 + w},        // last window 14 KiB: and the one before
		{10 * w, w},                  // window-aligned: a whole last window
		{w + 1000, 1000},             // a short last window, but before it the whole blob
		{3*w + w/4 - 1, w/4 - 1 + w}, // just under a quarter
		{3*w + w/4, w / 4},           // a quarter
	} {
		if got := openTail(c.size, w); got != [2]int64{c.size - c.want, c.want} {
			t.Errorf("blob of %d bytes: read %v of its end, want its last %d bytes", c.size, got, c.want)
		}
	}
}
