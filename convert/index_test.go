package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// sourceHello returns the bytes of /hello in the source image of a
// platform: the one file of its gzip layer.
func sourceHello(t *testing.T, layout string, manifest ocispec.Descriptor) []byte {
	t.Helper()
	var m ocispec.Manifest
	readJSONFile(t, blobFile(layout, manifest), &m)
	f, err := os.Open(blobFile(layout, m.Layers[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("no hello in %s: %v", m.Layers[0].Digest, err)
		}
		if h.Name == "hello" {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
}

// TestMultiPlatform converts the docker manifest list of hello-world (nine
// platforms) from an OCI layout: the result is an OCI index with one
// converted manifest per platform, each of which mounts with its
// platform's /hello.
func TestMultiPlatform(t *testing.T) {
	needKernel(t)
	src := testdata.OCILayout(t)
	out := t.TempDir()
	res := convertOK(t, newTestConverter(t, "", nil), "oci:"+src+":"+registry.DockerList, "oci:"+out+":list")
	if res.Desc.MediaType != ocispec.MediaTypeImageIndex {
		t.Errorf("result media type %s, want an OCI index", res.Desc.MediaType)
	}
	var srcList, outIndex ocispec.Index
	readJSONFile(t, blobFile(src, ocispec.Descriptor{Digest: registry.DockerList}), &srcList)
	readJSONFile(t, blobFile(out, res.Desc), &outIndex)
	if len(outIndex.Manifests) != len(srcList.Manifests) || len(res.Images) != len(srcList.Manifests) {
		t.Fatalf("%d manifests converted, %d in the index, want %d", len(res.Images), len(outIndex.Manifests), len(srcList.Manifests))
	}
	for i, e := range outIndex.Manifests {
		want := srcList.Manifests[i]
		if e.Platform == nil || platformString(e.Platform) != platformString(want.Platform) {
			t.Errorf("entry %d has platform %s, want %s", i, platformString(e.Platform), platformString(want.Platform))
			continue
		}
		if e.MediaType != ocispec.MediaTypeImageManifest {
			t.Errorf("entry %d media type %s", i, e.MediaType)
		}
		mnt := mountLayout(t, out, e)
		got, err := os.ReadFile(filepath.Join(mnt, "hello"))
		if err != nil {
			t.Errorf("%s: %v", platformString(e.Platform), err)
			continue
		}
		if !bytes.Equal(got, sourceHello(t, src, want)) {
			t.Errorf("%s: /hello differs from the source layer's", platformString(e.Platform))
		}
	}
}

// TestRegistry converts the manifest list from one registry repository to
// another with plain HTTP, and checks the result is the same index a
// layout destination gets, with every blob in the registry.
func TestRegistry(t *testing.T) {
	needKernel(t)
	srv := registry.Start(t, registry.Options{})
	srv.PushIndex(t, testdata.OCILayout(t), "hello", registry.DockerList, "list")
	cache := t.TempDir()
	c := newTestConverter(t, cache, func(o *Options) { o.PlainHTTP = []string{srv.Host} })
	res := convertOK(t, c, srv.Host+"/hello:list", "docker://"+srv.Host+"/converted:obd")
	viaLayout := convertOK(t, newTestConverter(t, cache, nil),
		"oci:"+testdata.OCILayout(t)+":"+registry.DockerList, "oci:"+t.TempDir()+":list")
	if res.Desc.Digest != viaLayout.Desc.Digest {
		t.Errorf("registry and layout destinations got different indexes: %s, %s", res.Desc.Digest, viaLayout.Desc.Digest)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resolver, err := newResolver([]string{srv.Host})
	if err != nil {
		t.Fatal(err)
	}
	st, err := newRegistryStore(resolver, srv.Host+"/converted:obd")
	if err != nil {
		t.Fatal(err)
	}
	desc, err := st.ResolveManifest(ctx, srv.Host+"/converted:obd")
	if err != nil || desc.Digest != res.Desc.Digest {
		t.Fatalf("resolve the pushed tag: %v, %v; want %s", desc.Digest, err, res.Desc.Digest)
	}
	for _, img := range res.Images {
		var m ocispec.Manifest
		if _, err := readJSON(ctx, st, img.Manifest, &m); err != nil {
			t.Fatalf("manifest %s: %v", img.Manifest.Digest, err)
		}
		for _, l := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
			rc, err := st.ReadBlob(ctx, l)
			if err != nil {
				t.Fatalf("blob %s: %v", l.Digest, err)
			}
			v := l.Digest.Verifier()
			n, err := io.Copy(v, rc)
			rc.Close()
			if err != nil || n != l.Size || !v.Verified() {
				t.Errorf("blob %s in the registry: %d bytes, verified %v, %v", l.Digest, n, v.Verified(), err)
			}
		}
	}
	if _, err := c.Convert(ctx, srv.Host+"/hello:nosuchtag", "oci:"+t.TempDir()); !errors.Is(err, ErrReference) {
		t.Errorf("missing source tag: %v, want ErrReference", err)
	}
}
