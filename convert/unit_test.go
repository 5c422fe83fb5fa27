package convert

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// Upstream's conversion of the amd64 hello-world (aci-hello-world-oci).
const (
	helloSourceConfig = "sha256:9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d"
	helloUpstreamCfg  = "sha256:b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e"
	helloUpstreamMan  = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
	helloSourceDiffID = "sha256:01bb4fce3eb1b56b05adf99504dafd31907a5aadac736e36b27595c8b92f07f1"
)

// TestUpstreamDocuments writes the config and manifest of upstream's
// converted hello-world from its source config and converted layer and
// expects upstream's bytes.
func TestUpstreamDocuments(t *testing.T) {
	raw, err := os.ReadFile(testdata.Blob(t, helloSourceConfig))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig(raw)
	if err != nil {
		t.Fatal(err)
	}
	layer := layerDescriptor(testdata.HelloLayerDigest, 642560)
	cfgData, cfgDesc, err := convertedConfig(cfg, []ocispec.Descriptor{layer})
	if err != nil {
		t.Fatal(err)
	}
	if cfgDesc.Digest != helloUpstreamCfg {
		t.Errorf("config %s, upstream wrote %s:\n%s", cfgDesc.Digest, helloUpstreamCfg, cfgData)
	}
	var src ocispec.Manifest
	readJSONFile(t, testdata.Blob(t, "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"), &src)
	data, desc, err := convertedManifest(src, cfgDesc, []ocispec.Descriptor{layer})
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != helloUpstreamMan {
		t.Errorf("manifest %s, upstream wrote %s:\n%s", desc.Digest, helloUpstreamMan, data)
	}
}

func TestChainUUID(t *testing.T) {
	ids := chainIDs([]digest.Digest{helloSourceDiffID})
	u, err := chainUUID(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	// The UUID in upstream's converted hello-world layer.
	if u != "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31" {
		t.Errorf("chainUUID = %s", u)
	}
	if _, err := chainUUID("sha256:abc"); err == nil {
		t.Error("a short chain id was accepted")
	}
	two := chainIDs([]digest.Digest{helloSourceDiffID, helloSourceDiffID})
	if two[0] != ids[0] || two[1] == two[0] {
		t.Errorf("chain ids %v", two)
	}
}

func TestParseLocation(t *testing.T) {
	for in, want := range map[string]Location{
		"oci:/tmp/x":                  {Layout: "/tmp/x"},
		"oci:/tmp/x:v1":               {Layout: "/tmp/x", Ref: "v1"},
		"oci:rel/dir:sha256:abc":      {Layout: "rel/dir", Ref: "sha256:abc"},
		"busybox":                     {Ref: "docker.io/library/busybox:latest"},
		"docker://127.0.0.1:5000/a:b": {Ref: "127.0.0.1:5000/a:b"},
	} {
		got, err := ParseLocation(in)
		if err != nil || got != want {
			t.Errorf("ParseLocation(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	if h := (Location{Ref: "127.0.0.1:5000/a:b"}).Host(); h != "127.0.0.1:5000" {
		t.Errorf("Host = %q", h)
	}
	for _, bad := range []string{"oci:", "oci::tag", "a/B", "a b", ""} {
		if _, err := ParseLocation(bad); !errors.Is(err, ErrReference) {
			t.Errorf("ParseLocation(%q): %v, want ErrReference", bad, err)
		}
	}
}

// compressed returns tar data compressed as c, with its blob descriptor
// (media type mt) and diff_id.
func compressed(t *testing.T, data []byte, c compression, mt string) (ocispec.Descriptor, digest.Digest, []byte) {
	t.Helper()
	var buf bytes.Buffer
	switch c {
	case gzipped:
		w := gzip.NewWriter(&buf)
		w.Write(data)
		w.Close()
	case zstdCompressed:
		w, _ := zstd.NewWriter(&buf)
		w.Write(data)
		w.Close()
	default:
		buf.Write(data)
	}
	return ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(buf.Bytes()), Size: int64(buf.Len())},
		digest.FromBytes(data), buf.Bytes()
}

func readLayer(desc ocispec.Descriptor, diffID digest.Digest, blob []byte) ([]byte, error) {
	lr, err := newLayerReader(io.NopCloser(bytes.NewReader(blob)), desc, diffID)
	if err != nil {
		return nil, err
	}
	got, err := io.ReadAll(lr)
	if cerr := lr.Close(); err == nil {
		err = cerr
	}
	return got, err
}

func TestLayerReader(t *testing.T) {
	tarData := bytes.Repeat([]byte("layer tar bytes "), 10000)
	for name, c := range map[string]struct {
		c  compression
		mt string
	}{
		"plain":                   {uncompressed, ocispec.MediaTypeImageLayer},
		"gzip":                    {gzipped, ocispec.MediaTypeImageLayerGzip},
		"zstd":                    {zstdCompressed, ocispec.MediaTypeImageLayerZstd},
		"gzip under a tar type":   {gzipped, mediaTypeDockerLayer},
		"plain under a gzip type": {uncompressed, mediaTypeDockerLayerGzip},
	} {
		desc, diffID, blob := compressed(t, tarData, c.c, c.mt)
		got, err := readLayer(desc, diffID, blob)
		if err != nil || !bytes.Equal(got, tarData) {
			t.Errorf("%s: %d bytes, %v", name, len(got), err)
		}
	}
	desc, diffID, blob := compressed(t, tarData, gzipped, ocispec.MediaTypeImageLayerGzip)
	if _, err := readLayer(desc, digest.FromString("other"), blob); !errors.Is(err, ErrDigest) {
		t.Errorf("wrong diff_id: %v, want ErrDigest", err)
	}
	bad := bytes.Clone(blob)
	bad[len(bad)/2] ^= 0xFF
	if _, err := readLayer(desc, diffID, bad); err == nil {
		t.Error("a corrupted blob was accepted")
	}
	if _, err := readLayer(desc, diffID, blob[:len(blob)-10]); err == nil {
		t.Error("a truncated blob was accepted")
	}
	desc.MediaType = "application/vnd.oci.image.layer.v1.tar+encrypted"
	if _, err := readLayer(desc, diffID, blob); !errors.Is(err, ErrUnsupportedLayer) {
		t.Errorf("encrypted layer: %v, want ErrUnsupportedLayer", err)
	}
}

func TestParseManifestRejects(t *testing.T) {
	m := func(layer ocispec.Descriptor) []byte {
		b, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, Layers: []ocispec.Descriptor{layer}})
		return b
	}
	d := digest.FromString("x")
	if _, err := parseManifest(m(layerDescriptor(d, 1))); !errors.Is(err, ErrAlreadyConverted) {
		t.Errorf("overlaybd layer: %v, want ErrAlreadyConverted", err)
	}
	if _, err := parseManifest(m(ocispec.Descriptor{MediaType: "application/x-foo", Digest: d})); !errors.Is(err, ErrUnsupportedLayer) {
		t.Errorf("foreign layer: %v, want ErrUnsupportedLayer", err)
	}
	if _, err := parseManifest([]byte(`{"schemaVersion":1}`)); !errors.Is(err, ErrInvalidImage) {
		t.Errorf("schema 1: %v, want ErrInvalidImage", err)
	}
	if _, err := parseConfig([]byte(`{"rootfs":{"type":"other"}}`)); !errors.Is(err, ErrInvalidImage) {
		t.Errorf("bad rootfs type: %v, want ErrInvalidImage", err)
	}
}

func TestLayerCache(t *testing.T) {
	c, err := newLayerCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	key := cacheKey(helloSourceDiffID, "test")
	if _, ok, err := c.get(key); ok || err != nil {
		t.Fatalf("empty cache: %v, %v", ok, err)
	}
	write := func(data string) string {
		p := filepath.Join(c.dir, "new")
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	desc := layerDescriptor(digest.FromString("blob"), 4)
	b, err := c.put(key, write("blob"), desc)
	if err != nil {
		t.Fatal(err)
	}
	// A second put of the same key (another converter) keeps the first.
	if _, err := c.put(key, write("blob"), desc); err != nil {
		t.Fatalf("second put: %v", err)
	}
	got, ok, err := c.get(key)
	if !ok || err != nil || got.Path != b.Path || got.Desc.Digest != b.Desc.Digest {
		t.Fatalf("get = %+v, %v, %v; want %+v", got, ok, err, b)
	}
	if err := os.WriteFile(b.Path, []byte("blub"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := c.get(key); ok {
		t.Error("a damaged blob was served from the cache")
	}
	if _, err := os.Stat(c.entry(key)); !errors.Is(err, os.ErrNotExist) {
		t.Error("the damaged entry was not removed")
	}
	if cacheKey(helloSourceDiffID, "a") == cacheKey(helloSourceDiffID, "b") {
		t.Error("cache keys ignore the base")
	}
}

func TestJournalView(t *testing.T) {
	disk := bytes.Repeat([]byte{1}, 64)
	pre := bytes.Repeat([]byte{2}, 64)
	v := &journalView{disk: bytes.NewReader(disk), pre: bytes.NewReader(pre), ranges: []byteRange{{8, 16}, {40, 48}}}
	got := make([]byte, 44)
	if _, err := v.ReadAt(got, 4); err != nil {
		t.Fatal(err)
	}
	want := slices.Concat(bytes.Repeat([]byte{1}, 4), bytes.Repeat([]byte{2}, 8),
		bytes.Repeat([]byte{1}, 24), bytes.Repeat([]byte{2}, 8))
	if !bytes.Equal(got, want) {
		t.Errorf("journal view read\n%v\nwant\n%v", got, want)
	}
}
