package registry

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testreg "github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/opencontainers/go-digest"
)

type fault int

const (
	pass        fault = iota
	reset             // TCP reset before any answer
	status500         // 500 Internal Server Error
	status503         // 503 Service Unavailable
	truncate          // full headers, half the body, connection dropped
	delay             // answer later than the client's request timeout
	shortRange        // a valid 206 covering only the first part of the range
	status404         // permanent
	ignoreRange       // the server ignores Range and sends the whole blob with 200
)

var faultNames = map[fault]string{pass: "pass", reset: "reset", status500: "500", status503: "503",
	truncate: "truncate", delay: "delay", shortRange: "short range", status404: "404", ignoreRange: "200 full body"}

// faultProxy is a reverse proxy in front of the real registry that injects
// transport faults into blob range requests. It is the one stand-in in these
// tests: a real registry cannot be made to reset connections, fail with 5xx,
// cut bodies short or stall on demand, and those are exactly the faults the
// retry logic exists for. Everything it forwards is the registry's answer.
type faultProxy struct {
	srv   *httptest.Server
	delay time.Duration
	// next chooses the fault for the n-th (0-based) blob range request.
	next func(n int) fault

	requests  atomic.Int64
	inflight  atomic.Int64
	maxFlight atomic.Int64
}

func startFaultProxy(t *testing.T, target string, next func(int) fault) *faultProxy {
	u, err := url.Parse("http://" + target)
	if err != nil {
		t.Fatal(err)
	}
	fp := &faultProxy{next: next, delay: 300 * time.Millisecond}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Header.Get("X-Fault") == "truncate" && resp.ContentLength > 1 {
			resp.Body = &cutReader{r: resp.Body, left: resp.ContentLength / 2}
		}
		return nil
	}
	rp.ErrorLog = log.New(io.Discard, "", 0) // injected faults are expected
	fp.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") || r.Header.Get("Range") == "" {
			rp.ServeHTTP(w, r)
			return
		}
		n := fp.requests.Add(1) - 1
		cur := fp.inflight.Add(1)
		defer fp.inflight.Add(-1)
		for {
			m := fp.maxFlight.Load()
			if cur <= m || fp.maxFlight.CompareAndSwap(m, cur) {
				break
			}
		}
		fp.serveFault(w, r, rp, fp.next(int(n)))
	}))
	t.Cleanup(fp.srv.Close)
	return fp
}

func (fp *faultProxy) serveFault(w http.ResponseWriter, r *http.Request, rp *httputil.ReverseProxy, f fault) {
	switch f {
	case reset:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // close sends RST
			}
			conn.Close()
		}
		return
	case status500, status503, status404:
		code := map[fault]int{status500: 500, status503: 503, status404: 404}[f]
		http.Error(w, "injected", code)
		return
	case delay:
		select {
		case <-time.After(fp.delay):
		case <-r.Context().Done():
			return
		}
	case truncate:
		r.Header.Set("X-Fault", "truncate")
	case ignoreRange:
		r.Header.Del("Range")
	case shortRange:
		var a, b int64
		if _, err := parseRangeHeader(r.Header.Get("Range"), &a, &b); err == nil && b > a {
			r.Header.Set("Range", "bytes="+strconv.FormatInt(a, 10)+"-"+strconv.FormatInt(a+(b-a)/3, 10))
		}
	}
	rp.ServeHTTP(w, r)
}

func parseRangeHeader(v string, a, b *int64) (int, error) {
	s, _ := strings.CutPrefix(v, "bytes=")
	x, y, _ := strings.Cut(s, "-")
	var err error
	if *a, err = strconv.ParseInt(x, 10, 64); err != nil {
		return 0, err
	}
	*b, err = strconv.ParseInt(y, 10, 64)
	return 2, err
}

// cutReader yields left bytes, then fails, which makes the reverse proxy
// abort the connection mid-body.
type cutReader struct {
	r    io.ReadCloser
	left int64
}

func (c *cutReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		return 0, errors.New("injected truncation")
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

func (c *cutReader) Close() error { return c.r.Close() }

// faultSetup pushes hello-world to a real registry and returns a repository
// reached through a fault proxy.
func faultSetup(t *testing.T, opts Options, next func(int) fault) (*Repository, *faultProxy, []byte) {
	t.Helper()
	srv := testreg.Start(t, testreg.Options{})
	srv.PushHelloWorld(t)
	fp := startFaultProxy(t, srv.Host, next)
	proxyHost := strings.TrimPrefix(fp.srv.URL, "http://")
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 100 * time.Millisecond
	}
	c := newClient(t, proxyHost, opts)
	repo, err := c.Repository(proxyHost + "/hello-world")
	if err != nil {
		t.Fatal(err)
	}
	return repo, fp, layerFile(t)
}

func TestFetchRangeRecoversFromEachFault(t *testing.T) {
	for _, f := range []fault{reset, status500, status503, truncate, delay, shortRange, ignoreRange} {
		t.Run(faultNames[f], func(t *testing.T) {
			repo, fp, want := faultSetup(t, Options{}, func(n int) fault {
				if n == 0 {
					return f
				}
				return pass
			})
			off, n := int64(70000), 200000
			p := make([]byte, n)
			if err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), off, p); err != nil {
				t.Fatalf("after one %s: %v", faultNames[f], err)
			}
			if !bytes.Equal(p, want[off:off+int64(n)]) {
				t.Fatalf("after one %s: wrong bytes", faultNames[f])
			}
			if got := fp.requests.Load(); got < 2 && f != ignoreRange {
				t.Errorf("%d range requests; the fault was not retried", got)
			}
		})
	}
}

// TestFetchRangeUnderRandomFaults reads random ranges from several goroutines
// while a third of all range requests fail in some way: every read must
// return the exact bytes.
func TestFetchRangeUnderRandomFaults(t *testing.T) {
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(7, 7))
	faults := []fault{reset, status500, status503, truncate, delay, shortRange}
	repo, fp, want := faultSetup(t, Options{MaxRetries: 30}, func(int) fault {
		mu.Lock()
		defer mu.Unlock()
		if rng.IntN(3) == 0 {
			return faults[rng.IntN(len(faults))]
		}
		return pass
	})
	fp.delay = 150 * time.Millisecond
	size := int64(len(want))
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 15 {
				off := r.Int64N(size)
				p := make([]byte, 1+r.Int64N(min(size-off, 100000)))
				if err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), off, p); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[off:off+int64(len(p))]) {
					errs <- errors.New("wrong bytes at offset " + strconv.FormatInt(off, 10))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d range requests for 120 reads", fp.requests.Load())
}

func TestFetchRangeGivesUpCleanly(t *testing.T) {
	for _, f := range []fault{status500, reset, truncate, delay} {
		t.Run(faultNames[f], func(t *testing.T) {
			repo, fp, _ := faultSetup(t, Options{MaxRetries: 3}, func(int) fault { return f })
			err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), 0, make([]byte, 100000))
			if !errors.Is(err, ErrFetch) {
				t.Fatalf("persistent %s: %v, want ErrFetch", faultNames[f], err)
			}
			if got := fp.requests.Load(); got != 4 {
				t.Errorf("%d requests, want 1 + 3 retries", got)
			}
			t.Logf("error: %v", err)
		})
	}
	t.Run("404 is not retried", func(t *testing.T) {
		repo, fp, _ := faultSetup(t, Options{MaxRetries: 3}, func(int) fault { return status404 })
		err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), 0, make([]byte, 10))
		if !errors.Is(err, ErrNotFound) || fp.requests.Load() != 1 {
			t.Errorf("%v after %d requests, want ErrNotFound after 1", err, fp.requests.Load())
		}
	})
	t.Run("cancel", func(t *testing.T) {
		repo, _, _ := faultSetup(t, Options{RequestTimeout: 10 * time.Second}, func(int) fault { return delay })
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := repo.FetchRange(ctx, digest.Digest(testreg.ConvertedLayer), 0, make([]byte, 10))
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
			t.Errorf("%v after %v, want the caller's deadline promptly", err, time.Since(start))
		}
	})
}

func TestPerHostConcurrencyCap(t *testing.T) {
	repo, fp, want := faultSetup(t, Options{Concurrency: 3, RequestTimeout: 5 * time.Second},
		func(int) fault { return delay })
	fp.delay = 30 * time.Millisecond
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Go(func() {
			p := make([]byte, 1000)
			off := int64(i * 5000)
			if err := repo.FetchRange(ctxT(t), digest.Digest(testreg.ConvertedLayer), off, p); err != nil {
				t.Error(err)
			} else if !bytes.Equal(p, want[off:off+1000]) {
				t.Error("wrong bytes")
			}
		})
	}
	wg.Wait()
	if got := fp.maxFlight.Load(); got != 3 {
		t.Errorf("at most %d requests in flight, want exactly the cap 3", got)
	}
}
