package registry

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	testreg "github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/wanproxy"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

const annotationPrefix = "containerd.io/snapshot/overlaybd/"

func anonymous(string) (string, string, error) { return "", "", nil }

// newClient returns a client speaking plain HTTP to host with short retry
// delays so fault tests stay fast.
func newClient(t *testing.T, host string, opts Options) *Client {
	t.Helper()
	opts.PlainHTTP = append(opts.PlainHTTP, host)
	if opts.Credentials == nil && opts.DockerConfigDir == "" {
		opts.Credentials = anonymous
	}
	if opts.RetryBaseDelay == 0 {
		opts.RetryBaseDelay = time.Millisecond
		opts.RetryMaxDelay = 10 * time.Millisecond
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func layerFile(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(testreg.BlobPath(testreg.HelloWorldOCI(t), testreg.ConvertedLayer))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func checkConverted(t *testing.T, img *Image, host string) {
	t.Helper()
	if got := img.ManifestDescriptor.Digest.String(); got != testreg.ConvertedManifest {
		t.Errorf("manifest digest %s, want %s", got, testreg.ConvertedManifest)
	}
	if img.IndexDigest != "" {
		t.Errorf("IndexDigest %s for a single-manifest image", img.IndexDigest)
	}
	if len(img.Layers) != 1 {
		t.Fatalf("%d layers, want 1", len(img.Layers))
	}
	l := img.Layers[0]
	if l.Digest.String() != testreg.ConvertedLayer || l.Size != 642560 || l.MediaType != ocispec.MediaTypeImageLayer {
		t.Errorf("layer %s size %d type %s", l.Digest, l.Size, l.MediaType)
	}
	want := map[string]string{
		annotationPrefix + "blob-digest": testreg.ConvertedLayer,
		annotationPrefix + "blob-size":   "642560",
		annotationPrefix + "version":     "0.1.0",
	}
	for k, v := range want {
		if l.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q", k, l.Annotations[k], v)
		}
	}
	if !slices.Equal(img.Config.Config.Cmd, []string{"/hello"}) {
		t.Errorf("config Cmd %q", img.Config.Config.Cmd)
	}
	if img.Platform.OS != "linux" || img.Platform.Architecture != "amd64" {
		t.Errorf("platform %+v", img.Platform)
	}
	if want := "http://" + host + "/v2/hello-world/blobs"; img.Repo.BlobURL() != want {
		t.Errorf("BlobURL %q, want %q", img.Repo.BlobURL(), want)
	}
}

func TestResolveByTagAndDigest(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{})
	ref := srv.PushHelloWorld(t)
	c := newClient(t, srv.Host, Options{})
	img, err := c.Resolve(ctxT(t), ref)
	if err != nil {
		t.Fatal(err)
	}
	checkConverted(t, img, srv.Host)
	if img.Ref != ref {
		t.Errorf("Ref %q, want %q", img.Ref, ref)
	}
	img, err = c.Resolve(ctxT(t), srv.Host+"/hello-world@"+testreg.ConvertedManifest)
	if err != nil {
		t.Fatal(err)
	}
	checkConverted(t, img, srv.Host)

	for _, bad := range []string{srv.Host + "/hello-world:missing", srv.Host + "/nope:obd"} {
		if _, err := c.Resolve(ctxT(t), bad); !errors.Is(err, ErrNotFound) {
			t.Errorf("Resolve(%s) = %v, want ErrNotFound", bad, err)
		}
	}
	if _, err := c.Resolve(ctxT(t), "Not A Ref"); !errors.Is(err, ErrInvalidReference) {
		t.Errorf("bad reference: %v, want ErrInvalidReference", err)
	}
}

// TestResolveManifestSkipsTheConfig counts the requests at a transparent
// wanproxy in front of the registry: a mount resolves without reading the
// config, and FetchConfig then reads just it.
func TestResolveManifestSkipsTheConfig(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{})
	ref := srv.PushHelloWorld(t)
	up, err := url.Parse("http://" + srv.Host)
	if err != nil {
		t.Fatal(err)
	}
	p, err := wanproxy.New(up, wanproxy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	addr, stop, err := p.Start(ctxT(t), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stop() })
	c := newClient(t, addr, Options{})
	_, path, _ := strings.Cut(ref, "/")

	img, err := c.ResolveManifest(ctxT(t), addr+"/"+path)
	if err != nil {
		t.Fatal(err)
	}
	if n := p.Stats().Requests; n != 2 {
		t.Errorf("ResolveManifest made %d requests, want 2 (HEAD and GET of the manifest)", n)
	}
	if len(img.Layers) != 1 || img.Config.Config.Cmd != nil || img.Platform.OS != "" {
		t.Errorf("ResolveManifest: %d layers, config %+v, platform %+v: want 1 layer and no config", len(img.Layers), img.Config.Config, img.Platform)
	}
	if err := c.FetchConfig(ctxT(t), img); err != nil {
		t.Fatal(err)
	}
	if n := p.Stats().Requests; n != 3 {
		t.Errorf("%d requests after FetchConfig, want 3", n)
	}
	checkConverted(t, img, addr)
	if err := c.FetchConfig(ctxT(t), &Image{Ref: "elsewhere/x:y"}); err == nil {
		t.Error("FetchConfig of an image this client did not resolve: no error")
	}
}

func TestResolvePlatformFromIndex(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{})
	srv.PushIndex(t, testreg.HelloWorldOCI(t), "hello-world", testreg.DockerList, "list")
	ref := srv.Host + "/hello-world:list"
	cases := []struct{ platform, manifest string }{
		{"linux/arm64/v8", "sha256:efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8"},
		{"linux/arm/v7", "sha256:a0a386314d69d1514d7aa63d12532b284bf37bba15ed7b4fc1a3f86605f86c63"},
		{"linux/s390x", "sha256:574efe68740d3bee2ef780036aee2e2da5cf7097ac06513f9f01f41e03365399"},
	}
	if runtime.GOARCH == "amd64" {
		cases = append(cases, struct{ platform, manifest string }{"", "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"})
	}
	for _, tc := range cases {
		c := newClient(t, srv.Host, Options{Platform: tc.platform})
		img, err := c.Resolve(ctxT(t), ref)
		if err != nil {
			t.Fatalf("platform %q: %v", tc.platform, err)
		}
		if img.ManifestDescriptor.Digest.String() != tc.manifest || img.IndexDigest.String() != testreg.DockerList {
			t.Errorf("platform %q: manifest %s from index %s, want %s", tc.platform, img.ManifestDescriptor.Digest, img.IndexDigest, tc.manifest)
		}
		if len(img.Layers) != 1 || img.Config.Architecture != img.Platform.Architecture {
			t.Errorf("platform %q: %d layers, config arch %q, platform %+v", tc.platform, len(img.Layers), img.Config.Architecture, img.Platform)
		}
	}
	c := newClient(t, srv.Host, Options{Platform: "windows/amd64"})
	if _, err := c.Resolve(ctxT(t), ref); !errors.Is(err, ErrNoPlatform) {
		t.Errorf("windows/amd64: %v, want ErrNoPlatform", err)
	}
}

// TestFetchRangeExactBytes compares ranged reads through a real registry with
// the blob file the image was pushed from.
func TestFetchRangeExactBytes(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{})
	ref := srv.PushHelloWorld(t)
	c := newClient(t, srv.Host, Options{})
	img, err := c.Resolve(ctxT(t), ref)
	if err != nil {
		t.Fatal(err)
	}
	want := layerFile(t)
	size := int64(len(want))
	dgst := img.Layers[0].Digest
	rng := rand.New(rand.NewPCG(1, 2))
	ranges := [][2]int64{{0, 1}, {0, 512}, {size - 1, 1}, {size - 4096, 4096}, {0, size}, {65535, 65538}}
	for range 30 {
		off := rng.Int64N(size)
		ranges = append(ranges, [2]int64{off, 1 + rng.Int64N(size-off)})
	}
	for _, r := range ranges {
		p := make([]byte, r[1])
		if err := img.Repo.FetchRange(ctxT(t), dgst, r[0], p); err != nil {
			t.Fatalf("FetchRange(%d, %d): %v", r[0], r[1], err)
		}
		if !bytes.Equal(p, want[r[0]:r[0]+r[1]]) {
			t.Fatalf("FetchRange(%d, %d): bytes differ from the blob file", r[0], r[1])
		}
	}

	blob := img.Repo.Blob(img.Layers[0])
	var _ io.ReaderAt = blob
	tail := make([]byte, 100)
	n, err := blob.ReadAt(tail, size-40)
	if n != 40 || err != io.EOF || !bytes.Equal(tail[:40], want[size-40:]) {
		t.Errorf("ReadAt over the end: n=%d err=%v", n, err)
	}
	if n, err := blob.ReadAt(tail, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end: n=%d err=%v", n, err)
	}

	if err := img.Repo.FetchRange(ctxT(t), dgst, size-10, make([]byte, 20)); !errors.Is(err, ErrFetch) {
		t.Errorf("range past the end: %v, want ErrFetch", err)
	}
	missing := digest.FromString("not in the registry")
	err = img.Repo.FetchRange(ctxT(t), missing, 0, make([]byte, 10))
	if !errors.Is(err, ErrFetch) || !errors.Is(err, ErrNotFound) {
		t.Errorf("missing blob: %v, want ErrFetch and ErrNotFound", err)
	}
	if err := img.Repo.FetchRange(ctxT(t), "sha256:xyz", 0, make([]byte, 10)); !errors.Is(err, ErrFetch) {
		t.Errorf("malformed digest: %v, want ErrFetch", err)
	}
}

func TestRepositoryFromBlobURL(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{})
	srv.PushHelloWorld(t)
	c := newClient(t, srv.Host, Options{})
	repo, err := c.RepositoryFromBlobURL("http://" + srv.Host + "/v2/hello-world/blobs")
	if err != nil {
		t.Fatal(err)
	}
	if repo.Name() != srv.Host+"/hello-world" {
		t.Errorf("Name %q", repo.Name())
	}
	p := make([]byte, 4096)
	if err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), 1000, p); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, layerFile(t)[1000:5096]) {
		t.Error("bytes differ from the blob file")
	}
	for _, bad := range []string{"", "ftp://h/v2/r/blobs", "http://h/v2/r", "http:///v2/r/blobs", "http://h/v2//blobs", "%zz"} {
		if _, err := c.RepositoryFromBlobURL(bad); !errors.Is(err, ErrInvalidReference) {
			t.Errorf("RepositoryFromBlobURL(%q) = %v, want ErrInvalidReference", bad, err)
		}
	}
	r2, err := c.Repository("docker.io/library/busybox:latest")
	if err != nil || r2.BlobURL() != "https://registry-1.docker.io/v2/library/busybox/blobs" {
		t.Errorf("docker hub repository: %v %v", r2, err)
	}
}

// authCases runs the same checks against a registry with basic or token auth.
func authCases(t *testing.T, opts testreg.Options) {
	srv := testreg.Start(t, opts)
	ref := srv.PushHelloWorld(t)
	good := func(string) (string, string, error) { return srv.User, srv.Password, nil }
	wrong := func(string) (string, string, error) { return srv.User, "wrong", nil }

	c := newClient(t, srv.Host, Options{Credentials: good})
	img, err := c.Resolve(ctxT(t), ref)
	if err != nil {
		t.Fatalf("correct credentials: %v", err)
	}
	checkConverted(t, img, srv.Host)
	p := make([]byte, 8192)
	if err := img.Repo.FetchRange(ctxT(t), img.Layers[0].Digest, 300000, p); err != nil {
		t.Fatalf("range read with correct credentials: %v", err)
	}
	if !bytes.Equal(p, layerFile(t)[300000:308192]) {
		t.Error("bytes differ from the blob file")
	}

	for name, creds := range map[string]CredentialsFunc{"wrong": wrong, "none": anonymous} {
		c := newClient(t, srv.Host, Options{Credentials: creds})
		if _, err := c.Resolve(ctxT(t), ref); !errors.Is(err, ErrUnauthorized) {
			t.Errorf("%s credentials: Resolve = %v, want ErrUnauthorized", name, err)
		}
		repo, err := c.Repository(ref)
		if err != nil {
			t.Fatal(err)
		}
		err = repo.FetchRange(ctxT(t), img.Layers[0].Digest, 0, p)
		if !errors.Is(err, ErrUnauthorized) || !errors.Is(err, ErrFetch) {
			t.Errorf("%s credentials: FetchRange = %v, want ErrFetch and ErrUnauthorized", name, err)
		}
	}
}

func TestBasicAuth(t *testing.T) {
	authCases(t, testreg.Options{BasicAuth: map[string]string{"alice": "s3cret"}})
}

func TestBearerTokenAuth(t *testing.T) {
	authCases(t, testreg.Options{TokenAuth: map[string]string{"bob": "t0ken-pass"}})
}

func TestDockerConfigCredentials(t *testing.T) {
	srv := testreg.Start(t, testreg.Options{BasicAuth: map[string]string{"carol": "pw:with:colons"}})
	ref := srv.PushHelloWorld(t)
	dir := t.TempDir()
	// "auth" is base64("carol:pw:with:colons"); the key carries a scheme,
	// as docker login writes it for some registries.
	cfg := `{"auths":{"http://` + srv.Host + `":{"auth":"Y2Fyb2w6cHc6d2l0aDpjb2xvbnM="}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, srv.Host, Options{DockerConfigDir: dir})
	if _, err := c.Resolve(ctxT(t), ref); err != nil {
		t.Fatalf("credentials from config.json: %v", err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
	creds, err := DockerConfigCredentials("")
	if err != nil {
		t.Fatal(err)
	}
	if u, p, _ := creds(srv.Host); u != "carol" || p != "pw:with:colons" {
		t.Errorf("$DOCKER_CONFIG credentials %q %q", u, p)
	}
	if creds, err := DockerConfigCredentials(t.TempDir()); creds != nil || err != nil {
		t.Errorf("missing config.json: %v %v, want anonymous", creds != nil, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{DockerConfigDir: dir}); !errors.Is(err, ErrDockerConfig) {
		t.Errorf("malformed config.json: %v, want ErrDockerConfig", err)
	}
}

func TestParseDockerConfigHosts(t *testing.T) {
	creds, err := ParseDockerConfig([]byte(`{"auths":{
		"https://index.docker.io/v1/":{"username":"hub","password":"p1"},
		"quay.io":{"auth":"cXVheTpwMg=="},
		"ghcr.io":{"identitytoken":"tok"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string][2]string{
		"registry-1.docker.io": {"hub", "p1"}, "docker.io": {"hub", "p1"},
		"quay.io": {"quay", "p2"}, "ghcr.io": {"", "tok"}, "other:5000": {"", ""},
	} {
		u, p, err := creds(host)
		if err != nil || u != want[0] || p != want[1] {
			t.Errorf("%s: %q %q %v, want %q", host, u, p, err, want)
		}
	}
	for _, bad := range []string{`[]`, `{"auths":{"h":{"auth":"!!"}}}`, `{"auths":{"h":{"auth":"bm9jb2xvbg=="}}}`} {
		if _, err := ParseDockerConfig([]byte(bad)); !errors.Is(err, ErrDockerConfig) {
			t.Errorf("%s: %v, want ErrDockerConfig", bad, err)
		}
	}
}

func FuzzParseDockerConfig(f *testing.F) {
	f.Add([]byte(`{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}}}`))
	f.Add([]byte(`{"auths":{"h:1":{"username":"u","password":"p","identitytoken":"t"}}}`))
	f.Add([]byte(`{"auths":null}`))
	f.Add([]byte(`{"auths":{"h":{"auth":"%%%"}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		creds, err := ParseDockerConfig(data)
		if err != nil {
			if !errors.Is(err, ErrDockerConfig) {
				t.Fatalf("error %v does not wrap ErrDockerConfig", err)
			}
			return
		}
		for _, h := range []string{"docker.io", "h", "h:1", ""} {
			if _, _, err := creds(h); err != nil {
				t.Fatal(err)
			}
		}
	})
}
