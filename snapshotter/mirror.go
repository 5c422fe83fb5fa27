package snapshotter

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes/docker"

	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// dockerHubHost is where containerd sends requests for docker.io images.
const dockerHubHost = "registry-1.docker.io"

// maxDrain bounds what is read from a mirror's refused answer before its
// connection is reused.
const maxDrain = 64 << 10

// mirrorTransport sends a registry's pull requests to its mirrors in
// order, and to the registry itself when none of them answers usefully.
// Only reads (GET, HEAD of /v2/ paths) go to mirrors. A mirror never sees
// the origin's Authorization header: it gets its own credentials (basic
// auth, from registry.credentials) or none.
type mirrorTransport struct {
	base    http.RoundTripper
	mirrors map[string][]*url.URL // origin request host -> mirror scheme and host
	creds   registry.CredentialsFunc
}

// newMirrorTransport parses the mirrors configuration (origin host -> list
// of "host:port", optionally with an http:// or https:// scheme; a mirror
// without one speaks plain HTTP when it is listed in insecure).
func newMirrorTransport(base http.RoundTripper, mirrors map[string][]string, insecure []string, creds registry.CredentialsFunc) (*mirrorTransport, error) {
	t := &mirrorTransport{base: base, mirrors: map[string][]*url.URL{}, creds: creds}
	for origin, list := range mirrors {
		if origin == "" || strings.ContainsAny(origin, "/ ") {
			return nil, fmt.Errorf("%w: registry.mirrors: bad registry host %q", ErrConfig, origin)
		}
		var urls []*url.URL
		for _, m := range list {
			u, err := parseMirror(m, insecure)
			if err != nil {
				return nil, fmt.Errorf("%w: registry.mirrors[%s]: %w", ErrConfig, origin, err)
			}
			urls = append(urls, u)
		}
		t.mirrors[origin] = urls
		if origin == "docker.io" {
			t.mirrors[dockerHubHost] = urls
		}
	}
	return t, nil
}

func parseMirror(m string, insecure []string) (*url.URL, error) {
	raw := m
	if !strings.Contains(m, "://") {
		scheme := "https"
		if slices.Contains(insecure, m) {
			scheme = "http"
		}
		raw = scheme + "://" + m
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return nil, fmt.Errorf("mirror %q: %w", m, err)
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Errorf("mirror %q: scheme must be http or https", m)
	case u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil:
		return nil, fmt.Errorf("mirror %q: want host[:port], optionally with a scheme", m)
	}
	return &url.URL{Scheme: u.Scheme, Host: u.Host}, nil
}

// RoundTrip implements http.RoundTripper.
func (t *mirrorTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	mirrors := t.mirrors[req.URL.Host]
	if len(mirrors) == 0 || (req.Method != http.MethodGet && req.Method != http.MethodHead) ||
		!strings.HasPrefix(req.URL.Path, "/v2/") {
		return t.base.RoundTrip(req)
	}
	for _, m := range mirrors {
		mreq := req.Clone(req.Context())
		mreq.URL.Scheme, mreq.URL.Host, mreq.Host = m.Scheme, m.Host, ""
		mreq.Header.Del("Authorization")
		if t.creds != nil {
			if user, secret, err := t.creds(m.Host); err == nil && user != "" {
				mreq.SetBasicAuth(user, secret)
			}
		}
		resp, err := t.base.RoundTrip(mreq)
		if err == nil && mirrorAnswered(resp.StatusCode) {
			return resp, nil
		}
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
			resp.Body.Close()
		}
		if err := req.Context().Err(); err != nil {
			return nil, err
		}
	}
	return t.base.RoundTrip(req)
}

// mirrorAnswered tells whether a mirror's status is the answer (content,
// a redirect to it, or a range past the blob's end) rather than a reason
// to ask the next one.
func mirrorAnswered(code int) bool {
	return (code >= 200 && code < 400) || code == http.StatusRequestedRangeNotSatisfiable
}

// registryTransport is the HTTP transport the registry client uses when
// mirrors are configured, tuned as the client's default one.
func registryTransport(concurrency int) *http.Transport {
	if concurrency <= 0 {
		concurrency = registry.DefaultConcurrency
	}
	t := docker.DefaultHTTPTransport(nil)
	t.MaxIdleConnsPerHost = concurrency
	t.MaxIdleConns = 4 * concurrency
	return t
}
