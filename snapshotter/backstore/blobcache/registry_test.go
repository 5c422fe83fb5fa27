package blobcache_test

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	testreg "github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

var _ blobcache.Fetcher = (*registry.Repository)(nil)

// TestCacheOverRealRegistry reads the upstream overlaybd layer through the
// cache from a real registry, then again after a restart with the registry
// gone: both must equal the blob file byte for byte.
func TestCacheOverRealRegistry(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, img, want := helloWorldLayer(ctx, t)
	layer := img.Layers[0]
	dir := t.TempDir()
	cache, err := blobcache.Open(dir, blobcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := cache.Blob(layer.Digest, layer.Size, img.Repo)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, layer.Size)
	for off := int64(0); off < layer.Size; off += 100 * 1000 { // unaligned reads
		n := min(100*1000, layer.Size-off)
		if _, err := blob.ReadAtContext(ctx, got[off:off+n], off); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("cached read differs from the blob file")
	}
	if err := cache.Close(); err != nil {
		t.Fatal(err)
	}
	if st := cache.Stats(); st.Fetches != (layer.Size+blobcache.DefaultRefillSize-1)/blobcache.DefaultRefillSize {
		t.Errorf("%d fetches for a %d-byte blob", st.Fetches, layer.Size)
	}

	cache, err = blobcache.Open(dir, blobcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	dead, err := client.RepositoryFromBlobURL("http://127.0.0.1:1/v2/gone/blobs")
	if err != nil {
		t.Fatal(err)
	}
	blob, err = cache.Blob(layer.Digest, layer.Size, dead)
	if err != nil {
		t.Fatal(err)
	}
	if !blob.Complete() {
		t.Error("layer not complete after a full read")
	}
	clear(got)
	if _, err := blob.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read after restart without a registry: %v", err)
	}
}

// helloWorldLayer pushes upstream's converted hello-world to a real
// registry and returns a client of it, the resolved image (one layer) and
// that layer's bytes as the test data holds them.
func helloWorldLayer(ctx context.Context, t *testing.T) (*registry.Client, *registry.Image, []byte) {
	t.Helper()
	srv := testreg.Start(t, testreg.Options{})
	ref := srv.PushHelloWorld(t)
	client, err := registry.New(registry.Options{
		PlainHTTP:   []string{srv.Host},
		Credentials: func(string) (string, string, error) { return "", "", nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err := client.ResolveManifest(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(testreg.BlobPath(testreg.HelloWorldOCI(t), img.Layers[0].Digest.String()))
	if err != nil {
		t.Fatal(err)
	}
	return client, img, want
}
