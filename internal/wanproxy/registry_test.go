package wanproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
)

// TestRealRegistry puts the proxy in front of a real registry
// (docker-registry) holding the converted hello-world and reads its layer
// blob through it, whole and by range, as the block backstore does.
func TestRealRegistry(t *testing.T) {
	reg := registry.Start(t, registry.Options{})
	reg.PushHelloWorld(t)
	blob, err := os.ReadFile(registry.BlobPath(registry.HelloWorldOCI(t), registry.ConvertedLayer))
	if err != nil {
		t.Fatal(err)
	}
	target, err := url.Parse("http://" + reg.Host)
	if err != nil {
		t.Fatal(err)
	}
	const rtt = 40 * time.Millisecond
	p, base := startProxy(t, target, Options{BytesPerSecond: 25e6 / 8, RTT: rtt})
	c := newClient(t)
	ctx := context.Background()

	if r := fetch(ctx, c, http.MethodGet, base+"/v2/", ""); r.err != nil || r.status != http.StatusOK {
		t.Fatalf("GET /v2/: status %d, %v", r.status, r.err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/hello-world/manifests/obd", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if dgst := resp.Header.Get("Docker-Content-Digest"); resp.StatusCode != http.StatusOK || dgst != registry.ConvertedManifest {
		t.Fatalf("manifest: status %d, digest %s, want %s", resp.StatusCode, dgst, registry.ConvertedManifest)
	}

	blobURL := base + "/v2/hello-world/blobs/" + registry.ConvertedLayer
	whole := fetch(ctx, c, http.MethodGet, blobURL, "")
	if whole.err != nil || whole.status != http.StatusOK {
		t.Fatalf("blob: status %d, %v", whole.status, whole.err)
	}
	if got := fmt.Sprintf("sha256:%x", sha256.Sum256(whole.body)); got != registry.ConvertedLayer {
		t.Fatalf("blob through the proxy has digest %s, want %s", got, registry.ConvertedLayer)
	}
	start, end := int64(len(blob)/3), int64(len(blob)/3+4096)
	ranged := fetch(ctx, c, http.MethodGet, blobURL, fmt.Sprintf("bytes=%d-%d", start, end-1))
	if ranged.err != nil || ranged.status != http.StatusPartialContent {
		t.Fatalf("ranged blob GET: status %d, %v", ranged.status, ranged.err)
	}
	if !bytes.Equal(ranged.body, blob[start:end]) {
		t.Fatalf("ranged GET returned %d bytes that differ from blob[%d:%d]", len(ranged.body), start, end)
	}
	if cr := ranged.header.Get("Content-Range"); !strings.HasPrefix(cr, fmt.Sprintf("bytes %d-%d/", start, end-1)) {
		t.Errorf("Content-Range %q", cr)
	}
	if ranged.elapsed < rtt {
		t.Errorf("ranged GET on a warm connection took %v, want >= RTT %v", ranged.elapsed, rtt)
	}
	// An upload started through the proxy must continue through it: the
	// registry builds its Location from X-Forwarded-Host.
	resp, err = c.Post(base+"/v2/hello-world/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusAccepted || !strings.HasPrefix(loc, base+"/") {
		t.Errorf("upload start: status %d, Location %q: want 202 and a URL under %s", resp.StatusCode, loc, base)
	}
	st := p.Stats()
	if st.Requests != 5 || st.Bytes < int64(len(blob))+4096 || st.Dropped != 0 || st.UpstreamErrors != 0 {
		t.Errorf("stats %+v: want 5 requests and at least %d bytes", st, len(blob)+4096)
	}
}
