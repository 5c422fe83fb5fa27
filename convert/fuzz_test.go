package convert

import (
	"bytes"
	"os"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// FuzzParseImage feeds manifests and configs to the parsers and the
// writers of their converted forms.
func FuzzParseImage(f *testing.F) {
	manifest, _ := os.ReadFile(testdata.Blob(f, "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"))
	config, _ := os.ReadFile(testdata.Blob(f, helloSourceConfig))
	f.Add(manifest, config)
	f.Add([]byte(`{"schemaVersion":2,"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:x"}]}`),
		[]byte(`{"rootfs":{"type":"layers","diff_ids":["sha256:1"]}}`))
	f.Add([]byte(`{"schemaVersion":2,"layers":null}`), []byte(`{"rootfs":{"type":"layers"}}`))
	f.Fuzz(func(t *testing.T, manifest, config []byte) {
		m, err := parseManifest(manifest)
		if err != nil {
			return
		}
		cfg, err := parseConfig(config)
		if err != nil {
			return
		}
		layers := make([]ocispec.Descriptor, len(m.Layers))
		for i := range layers {
			layers[i] = layerDescriptor(digest.FromBytes([]byte{byte(i)}), int64(i))
		}
		_, cd, err := convertedConfig(cfg, layers)
		if err != nil {
			return
		}
		if _, _, err := convertedManifest(*m, cd, layers); err != nil {
			t.Errorf("a parsed manifest did not marshal again: %v", err)
		}
		_ = chainIDs(cfg.RootFS.DiffIDs)
	})
}

// FuzzParseLocation feeds image locations to the parser.
func FuzzParseLocation(f *testing.F) {
	for _, s := range []string{"oci:/tmp/x:tag", "docker://127.0.0.1:5000/a/b:c", "busybox@sha256:" +
		"0000000000000000000000000000000000000000000000000000000000000000", "oci:", ":::", "a/B"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		loc, err := ParseLocation(s)
		if err != nil {
			return
		}
		if loc.Layout == "" && loc.Ref == "" {
			t.Errorf("ParseLocation(%q) accepted an empty location", s)
		}
		_ = loc.Host()
		_ = loc.String()
	})
}

// FuzzLayerReader feeds blobs, claimed to be layers, to the reader that
// sniffs their compression and checks their digests.
func FuzzLayerReader(f *testing.F) {
	layer, _ := os.ReadFile(testdata.Blob(f, "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"))
	f.Add(layer)
	f.Add([]byte{0x28, 0xB5, 0x2F, 0xFD, 0, 0, 0})
	f.Add([]byte{0x1F, 0x8B, 8, 0})
	f.Fuzz(func(t *testing.T, blob []byte) {
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
		got, err := readLayer(desc, digest.FromString(""), blob)
		if err == nil && len(got) != 0 {
			t.Errorf("a layer that does not match its diff_id was accepted")
		}
		_, _ = readLayer(desc, digest.FromBytes(got), bytes.Clone(blob))
	})
}
