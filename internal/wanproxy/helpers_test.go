package wanproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

const blobSize = 8 << 20

// upstream is a real HTTP server on 127.0.0.1 serving one random blob with
// Range support (http.ServeContent) at any GET path, an endless stream at
// /endless, and hashing POST and PUT bodies.
type upstream struct {
	URL  *url.URL
	data []byte
	// endlessDone counts the /endless streams that ended: only the proxy
	// hanging up ends one.
	endlessDone atomic.Int64
	// active and maxActive count GETs being served, now and at most.
	active, maxActive atomic.Int64
}

func startUpstream(t testing.TB) *upstream {
	t.Helper()
	u := &upstream{data: make([]byte, blobSize)}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range u.data {
		u.data[i] = byte(rng.Uint32())
	}
	modTime := time.Unix(1700000000, 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost || r.Method == http.MethodPut {
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("X-Received", hex.EncodeToString(h.Sum(nil)))
			w.Header().Set("X-Length", strconv.FormatInt(n, 10))
			w.WriteHeader(http.StatusCreated)
			return
		}
		n := u.active.Add(1)
		defer u.active.Add(-1)
		for m := u.maxActive.Load(); n > m; m = u.maxActive.Load() {
			if u.maxActive.CompareAndSwap(m, n) {
				break
			}
		}
		if r.URL.Path == "/endless" {
			defer u.endlessDone.Add(1)
			for {
				if _, err := w.Write(u.data[:32<<10]); err != nil {
					return
				}
			}
		}
		http.ServeContent(w, r, "blob", modTime, bytes.NewReader(u.data))
	}))
	t.Cleanup(srv.Close)
	var err error
	if u.URL, err = url.Parse(srv.URL); err != nil {
		t.Fatal(err)
	}
	return u
}

// startProxy serves a proxy to target on 127.0.0.1 and returns it and its
// base URL.
func startProxy(t testing.TB, target *url.URL, opts Options) (*Proxy, string) {
	t.Helper()
	p, err := New(target, opts)
	if err != nil {
		t.Fatal(err)
	}
	addr, stop, err := p.Start(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return p, "http://" + addr
}

// newClient returns a client with its own connection pool, so tests do not
// share emulated TCP connections.
func newClient(t testing.TB) *http.Client {
	t.Helper()
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 60 * time.Second}
}

type result struct {
	status  int
	header  http.Header
	body    []byte
	err     error // from the request or from reading the body
	elapsed time.Duration
}

// fetch sends one request and reads the whole body.
func fetch(ctx context.Context, c *http.Client, method, url, rangeHdr string) result {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return result{err: err}
	}
	if rangeHdr != "" {
		req.Header.Set("Range", rangeHdr)
	}
	resp, err := c.Do(req)
	if err != nil {
		return result{err: err, elapsed: time.Since(start)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: body, err: err, elapsed: time.Since(start)}
}

// slow skips timing tests under -short: each takes a couple of seconds.
func slow(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("timing test takes seconds; skipped with -short")
	}
}
