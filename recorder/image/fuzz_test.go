package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/trace"
)

// fuzzErrors are the sentinels a parser of outside data may return; anything else is a bug.
var fuzzErrors = []error{ErrInvalid, ErrUnsupported, ErrLayer, ErrNoTrace, ErrTooLarge,
	trace.ErrInvalid, trace.ErrTooLarge, trace.ErrFormat, trace.ErrBadMagic, trace.ErrTruncated,
	trace.ErrSize, trace.ErrChecksum, trace.ErrPathList}

func checkFuzzErr(t *testing.T, err error) {
	t.Helper()
	for _, s := range fuzzErrors {
		if errors.Is(err, s) {
			return
		}
	}
	t.Fatalf("error wraps no sentinel: %v", err)
}

func FuzzReadLayer(f *testing.F) {
	l, err := BuildLayer(sampleTrace(8, 3), ocispec.MediaTypeImageLayer)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(l.Data)
	var bin bytes.Buffer
	trace.ToBinary(&bin, sampleTrace(3, 1))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "./trace", Mode: 0o444, Size: int64(bin.Len()), Typeflag: tar.TypeReg})
	tw.Write(bin.Bytes())
	tw.Close()
	f.Add(buf.Bytes())
	f.Add([]byte{})
	layers := sampleTrace(1, 1).Layers
	f.Fuzz(func(t *testing.T, data []byte) {
		tr, err := ReadLayer(bytes.NewReader(data), layers)
		if err != nil {
			checkFuzzErr(t, err)
			return
		}
		if err := tr.Validate(); err != nil {
			t.Fatalf("ReadLayer returned an invalid trace: %v", err)
		}
	})
}

func FuzzParseIndex(f *testing.F) {
	f.Add([]byte(`{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88","size":641,"annotations":{"org.opencontainers.image.ref.name":"amd64-converted"}}],"extra":{"x":1}}`))
	f.Add([]byte(`{"schemaVersion":2}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		x, err := ParseIndex(data)
		if err != nil {
			checkFuzzErr(t, err)
			return
		}
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88", Size: 1}
		if err := x.Tag("fuzz", desc); err != nil {
			t.Fatal(err)
		}
		out, err := x.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		y, err := ParseIndex(out)
		if err != nil {
			t.Fatalf("re-parse of a tagged index: %v\n%s", err, out)
		}
		if i := y.Find("fuzz"); i != len(y.Manifests)-1 || y.Manifests[i].Digest != desc.Digest {
			t.Fatalf("tag lost: %s", out)
		}
	})
}

func FuzzUpdate(f *testing.F) {
	f.Add([]byte(ociManifest), []byte(ociConfig))
	f.Add([]byte(dockerManifest), []byte(dockerConfig))
	f.Add([]byte(`{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e","size":1}}`),
		[]byte(`{"rootfs":{"type":"layers","diff_ids":[]},"history":null}`))
	oci, _ := BuildLayer(sampleTrace(2, 1), ocispec.MediaTypeImageLayer)
	docker, _ := BuildLayer(sampleTrace(2, 1), MediaTypeDockerLayer)
	f.Fuzz(func(t *testing.T, manifest, cfg []byte) {
		m, err := ParseManifest(manifest)
		if err != nil {
			checkFuzzErr(t, err)
			return
		}
		layer := oci.Desc
		if m.Docker() {
			layer = docker.Desc
		}
		u, err := Update(manifest, cfg, layer, UpdateOptions{})
		if err != nil {
			checkFuzzErr(t, err)
			return
		}
		// The result is a valid image whose last layer is the trace layer, and updating it
		// again replaces that layer.
		m2, err := ParseManifest(u.Manifest)
		if err != nil {
			t.Fatalf("updated manifest does not parse: %v\n%s", err, u.Manifest)
		}
		if m2.TraceLayer() != len(m2.Layers)-1 || len(m2.Layers) > len(m.Layers)+1 {
			t.Fatalf("trace layer at %d of %d", m2.TraceLayer(), len(m2.Layers))
		}
		u2, err := Update(u.Manifest, u.Config, layer, UpdateOptions{})
		if err != nil {
			t.Fatalf("second update: %v", err)
		}
		if !bytes.Equal(u2.Config, u.Config) || !bytes.Equal(u2.Manifest, u.Manifest) || !json.Valid(u2.Config) {
			t.Fatalf("updating with the same layer changed the image:\n%s\n%s", u.Manifest, u2.Manifest)
		}
	})
}
