package snapshotter

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// hostOf is the host:port of a test server.
func hostOf(t *testing.T, s *httptest.Server) string {
	t.Helper()
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

func TestMirrorTransport(t *testing.T) {
	serve := func(status int, body string, hits *atomic.Int32, auth *atomic.Value) *httptest.Server {
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			if auth != nil {
				auth.Store(r.Header.Get("Authorization"))
			}
			w.WriteHeader(status)
			io.WriteString(w, body)
		}))
		t.Cleanup(s.Close)
		return s
	}
	var originHits, downHits, goodHits atomic.Int32
	var goodAuth atomic.Value
	origin := serve(200, "origin", &originHits, nil)
	down := serve(503, "down", &downHits, nil)
	good := serve(200, "mirror", &goodHits, &goodAuth)
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()

	get := func(mirrors []string, method, path string) (string, error) {
		t.Helper()
		mt, err := newMirrorTransport(http.DefaultTransport, map[string][]string{hostOf(t, origin): mirrors}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest(method, origin.URL+path, nil)
		req.Header.Set("Authorization", "Bearer origin-secret")
		resp, err := mt.RoundTrip(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if body, err := get([]string{down.URL, good.URL}, http.MethodGet, "/v2/r/blobs/x"); err != nil || body != "mirror" {
		t.Errorf("first mirror down: %q, %v; want the second mirror's answer", body, err)
	}
	if downHits.Load() != 1 || originHits.Load() != 0 {
		t.Errorf("hits: down %d, origin %d; want 1, 0", downHits.Load(), originHits.Load())
	}
	if a, _ := goodAuth.Load().(string); a != "" {
		t.Errorf("the mirror received the origin's Authorization header %q", a)
	}
	if body, err := get([]string{gone.URL, down.URL}, http.MethodGet, "/v2/r/blobs/x"); err != nil || body != "origin" {
		t.Errorf("every mirror failing: %q, %v; want the origin's answer", body, err)
	}
	if body, _ := get([]string{good.URL}, http.MethodPut, "/v2/r/blobs/x"); body != "origin" {
		t.Errorf("a PUT went to %q, want the origin", body)
	}
	if body, _ := get([]string{good.URL}, http.MethodGet, "/token"); body != "origin" {
		t.Errorf("a non-/v2/ request went to %q, want the origin", body)
	}
}

func TestMirrorConfig(t *testing.T) {
	for _, bad := range []map[string][]string{
		{"": {"m:5000"}},
		{"r.example": {"ftp://m"}},
		{"r.example": {"https://m/path"}},
		{"r.example": {"http://user:pw@m"}},
	} {
		c := DefaultConfig()
		c.Registry.Mirrors = bad
		if err := c.Validate(); !errors.Is(err, ErrConfig) {
			t.Errorf("mirrors %v: %v, want ErrConfig", bad, err)
		}
	}
	mt, err := newMirrorTransport(nil, map[string][]string{"docker.io": {"m.example", "p.example:80"}}, []string{"p.example:80"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := mt.mirrors[dockerHubHost]
	if len(got) != 2 || got[0].String() != "https://m.example" || got[1].String() != "http://p.example:80" {
		t.Errorf("docker.io mirrors as used: %v", got)
	}
}

// TestMirrorResolve resolves an image through a mirror (a real registry)
// while its origin does not answer, and through the origin while the
// mirror does not.
func TestMirrorResolve(t *testing.T) {
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	dead := httptest.NewServer(http.NotFoundHandler())
	deadHost := hostOf(t, dead)
	dead.Close()
	for name, rc := range map[string]RegistryConfig{
		"via mirror": {Insecure: []string{reg.Host, deadHost}, Mirrors: map[string][]string{deadHost: {reg.Host}}},
		"fallback":   {Insecure: []string{reg.Host, deadHost}, Mirrors: map[string][]string{reg.Host: {deadHost}}},
	} {
		opts, err := rc.Options()
		if err != nil {
			t.Fatal(err)
		}
		opts.MaxRetries = -1
		client, err := regclient.New(opts)
		if err != nil {
			t.Fatal(err)
		}
		r := ref
		if name == "via mirror" {
			r = strings.Replace(ref, reg.Host, deadHost, 1)
		}
		img, err := client.Resolve(context.Background(), r)
		if err != nil || len(img.Layers) == 0 {
			t.Errorf("%s: resolve %s: %v", name, r, err)
		}
	}
}
