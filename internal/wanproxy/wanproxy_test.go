package wanproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"
)

func TestBytesIdentical(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{})
	r := fetch(context.Background(), newClient(t), http.MethodGet, base+"/blob", "")
	if r.err != nil || r.status != http.StatusOK {
		t.Fatalf("GET: status %d, %v", r.status, r.err)
	}
	if !bytes.Equal(r.body, up.data) {
		t.Fatalf("body differs from the upstream's (%d bytes, want %d)", len(r.body), len(up.data))
	}
	want := Stats{Requests: 1, Connections: 1, Bytes: blobSize}
	if got := p.Stats(); got != want {
		t.Fatalf("stats %+v, want %+v", got, want)
	}
}

func TestRangeRequests(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{})
	c := newClient(t)
	n := int64(len(up.data))
	cases := []struct {
		rng        string
		start, end int64 // the expected body is data[start:end]
	}{
		{"bytes=0-0", 0, 1},
		{"bytes=1000-1999", 1000, 2000},
		{"bytes=-100", n - 100, n},
		{"bytes=8388000-", 8388000, n},
		{"bytes=4194304-6291455", 4 << 20, 6 << 20},
	}
	var total int64
	for _, tc := range cases {
		r := fetch(context.Background(), c, http.MethodGet, base+"/blob", tc.rng)
		if r.err != nil || r.status != http.StatusPartialContent {
			t.Fatalf("%s: status %d, %v", tc.rng, r.status, r.err)
		}
		wantCR := fmt.Sprintf("bytes %d-%d/%d", tc.start, tc.end-1, n)
		if cr := r.header.Get("Content-Range"); cr != wantCR {
			t.Errorf("%s: Content-Range %q, want %q", tc.rng, cr, wantCR)
		}
		if !bytes.Equal(r.body, up.data[tc.start:tc.end]) {
			t.Errorf("%s: body of %d bytes differs from data[%d:%d]", tc.rng, len(r.body), tc.start, tc.end)
		}
		total += tc.end - tc.start
	}
	r := fetch(context.Background(), c, http.MethodGet, base+"/blob", "bytes=99999999-")
	if r.status != http.StatusRequestedRangeNotSatisfiable {
		t.Errorf("unsatisfiable range: status %d, want 416", r.status)
	}
	total += int64(len(r.body))
	r = fetch(context.Background(), c, http.MethodHead, base+"/blob", "")
	if r.status != http.StatusOK || r.header.Get("Content-Length") != fmt.Sprint(n) || r.header.Get("Accept-Ranges") != "bytes" {
		t.Errorf("HEAD: status %d, headers %v", r.status, r.header)
	}
	st := p.Stats()
	if st.Requests != int64(len(cases))+2 || st.Bytes != total || st.Dropped != 0 || st.InFlight != 0 {
		t.Errorf("stats %+v: want %d requests, %d bytes", st, len(cases)+2, total)
	}
}

func TestBandwidthCap(t *testing.T) {
	slow(t)
	up := startUpstream(t)
	const bps = 4 << 20
	p, base := startProxy(t, up.URL, Options{BytesPerSecond: bps})
	r := fetch(context.Background(), newClient(t), http.MethodGet, base+"/blob", "")
	if r.err != nil || !bytes.Equal(r.body, up.data) {
		t.Fatalf("GET: %v (%d bytes)", r.err, len(r.body))
	}
	// 8 MiB at 4 MiB/s is 2 s; the first 10 ms of burst may pass at once.
	if r.elapsed < 1800*time.Millisecond {
		t.Fatalf("8 MiB at 4 MiB/s took %v, want >= 1.8s", r.elapsed)
	}
	t.Logf("8 MiB at 4 MiB/s: %v (%.2f MiB/s)", r.elapsed, float64(blobSize)/(1<<20)/r.elapsed.Seconds())
	if st := p.Stats(); st.Bytes != blobSize {
		t.Fatalf("stats %+v: want %d bytes", st, blobSize)
	}
}

// TestParallelShare checks that parallel responses share one cap, and share
// it fairly: none gets through at the full rate while the others wait.
func TestParallelShare(t *testing.T) {
	slow(t)
	up := startUpstream(t)
	const bps, parts = 4 << 20, 4
	p, base := startProxy(t, up.URL, Options{BytesPerSecond: bps})
	c := newClient(t)
	part := int64(blobSize / parts)
	results := make([]result, parts)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range parts {
		wg.Go(func() {
			rng := fmt.Sprintf("bytes=%d-%d", int64(i)*part, int64(i+1)*part-1)
			results[i] = fetch(context.Background(), c, http.MethodGet, base+"/blob", rng)
		})
	}
	wg.Wait()
	total := time.Since(start)
	for i, r := range results {
		if r.err != nil || !bytes.Equal(r.body, up.data[int64(i)*part:int64(i+1)*part]) {
			t.Fatalf("part %d: status %d, %v, %d bytes", i, r.status, r.err, len(r.body))
		}
		// Alone on the link a part takes 0.5 s; sharing it fairly, 2 s.
		if r.elapsed < 1400*time.Millisecond {
			t.Errorf("part %d finished after %v: it did not share the link (want >= 1.4s)", i, r.elapsed)
		}
	}
	if total < 1800*time.Millisecond {
		t.Fatalf("%d parallel parts of 8 MiB in total at 4 MiB/s took %v, want >= 1.8s", parts, total)
	}
	t.Logf("4 x 2 MiB in parallel at 4 MiB/s: %v", total)
	if st := p.Stats(); st.Bytes != blobSize || st.Requests != parts {
		t.Fatalf("stats %+v: want %d requests, %d bytes", st, parts, blobSize)
	}
}

func TestRTT(t *testing.T) {
	up := startUpstream(t)
	const rtt = 100 * time.Millisecond
	p, base := startProxy(t, up.URL, Options{RTT: rtt})
	c := newClient(t)
	first := fetch(context.Background(), c, http.MethodGet, base+"/blob", "bytes=0-99")
	second := fetch(context.Background(), c, http.MethodGet, base+"/blob", "bytes=100-199")
	for _, r := range []result{first, second} {
		if r.err != nil || r.status != http.StatusPartialContent || len(r.body) != 100 {
			t.Fatalf("GET: status %d, %v, %d bytes", r.status, r.err, len(r.body))
		}
	}
	if first.elapsed < 2*rtt {
		t.Errorf("first request on a new connection took %v, want >= 2 RTT (handshake + request)", first.elapsed)
	}
	if second.elapsed < rtt {
		t.Errorf("second request took %v, want >= 1 RTT", second.elapsed)
	}
	if st := p.Stats(); st.Connections != 1 || st.Requests != 2 {
		t.Errorf("stats %+v: want one connection (keep-alive) and two requests", st)
	}
}

func TestSlowStart(t *testing.T) {
	up := startUpstream(t)
	const rtt = 50 * time.Millisecond
	// 64 MiB/s x 50 ms is a 3.3 MB window: 1 MiB fits in well under one
	// RTT at the link rate, but slow start needs 7 rounds to send it
	// (14.6 KB, then doubling).
	_, base := startProxy(t, up.URL, Options{RTT: rtt, BytesPerSecond: 64 << 20})
	r := fetch(context.Background(), newClient(t), http.MethodGet, base+"/blob", "bytes=0-1048575")
	if r.err != nil || !bytes.Equal(r.body, up.data[:1<<20]) {
		t.Fatalf("GET: status %d, %v", r.status, r.err)
	}
	if want := 2*rtt + 6*rtt; r.elapsed < want {
		t.Fatalf("1 MiB on a new connection took %v, want >= %v (handshake, request, 6 more slow-start rounds)", r.elapsed, want)
	}
}

func TestDropEveryResponse(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{DropRate: 1, Seed: 7})
	c := newClient(t)
	ranges := []string{"", "bytes=0-1", "bytes=1000-999999", "bytes=-5000"}
	for _, rng := range ranges {
		r := fetch(context.Background(), c, http.MethodGet, base+"/blob", rng)
		if r.status != http.StatusOK && r.status != http.StatusPartialContent {
			t.Fatalf("range %q: status %d, %v: the headers should arrive before the drop", rng, r.status, r.err)
		}
		if !errors.Is(r.err, io.ErrUnexpectedEOF) {
			t.Errorf("range %q: body read error %v after %d bytes, want unexpected EOF", rng, r.err, len(r.body))
		}
		if want := r.header.Get("Content-Length"); want == fmt.Sprint(len(r.body)) {
			t.Errorf("range %q: all %s bytes arrived", rng, want)
		}
	}
	// A response without a body is dropped before its headers.
	if r := fetch(context.Background(), newClient(t), http.MethodHead, base+"/blob", ""); r.err == nil {
		t.Errorf("HEAD through a dropping link succeeded: status %d", r.status)
	}
	st := p.Stats()
	if st.Dropped != int64(len(ranges))+1 || st.Requests != st.Dropped || st.InFlight != 0 {
		t.Errorf("stats %+v: want %d requests, all dropped", st, len(ranges)+1)
	}
}

func TestDropSome(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{DropRate: 0.5, Seed: 1})
	c := newClient(t)
	const n = 40
	failed := 0
	for range n {
		r := fetch(context.Background(), c, http.MethodGet, base+"/blob", "bytes=0-65535")
		if r.err != nil {
			failed++
		} else if !bytes.Equal(r.body, up.data[:65536]) {
			t.Fatal("an undropped response has the wrong bytes")
		}
	}
	st := p.Stats()
	if failed == 0 || failed == n || st.Dropped != int64(failed) || st.Requests != n {
		t.Fatalf("%d of %d failed, stats %+v: want some, all counted", failed, n, st)
	}
}

func TestClientGoesAway(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{BytesPerSecond: 1 << 20})
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/endless", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := newClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 100<<10)); err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()
	deadline := time.Now().Add(5 * time.Second)
	for p.Stats().InFlight != 0 || up.endlessDone.Load() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("5 s after the client left: stats %+v, upstream streams ended: %d (want 1)", p.Stats(), up.endlessDone.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if b := p.Stats().Bytes; b >= 1<<20 {
		t.Fatalf("%d bytes sent after the client left early", b)
	}
}

func TestMaxInFlight(t *testing.T) {
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{BytesPerSecond: 8 << 20, MaxInFlight: 2})
	c := newClient(t)
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			rng := fmt.Sprintf("bytes=%d-%d", i<<20, i<<20+256<<10-1)
			if r := fetch(context.Background(), c, http.MethodGet, base+"/blob", rng); r.err != nil || len(r.body) != 256<<10 {
				t.Errorf("GET %s: %v, %d bytes", rng, r.err, len(r.body))
			}
		})
	}
	wg.Wait()
	if m := up.maxActive.Load(); m > 2 {
		t.Fatalf("upstream served %d requests at once, want <= MaxInFlight 2", m)
	}
	if st := p.Stats(); st.Requests != 6 || st.Bytes != 6*256<<10 {
		t.Fatalf("stats %+v: want 6 requests of 256 KiB", st)
	}
}

func TestUploadPaced(t *testing.T) {
	slow(t)
	up := startUpstream(t)
	p, base := startProxy(t, up.URL, Options{BytesPerSecond: 4 << 20})
	body := up.data[:2<<20]
	start := time.Now()
	resp, err := newClient(t).Post(base+"/upload", "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	elapsed := time.Since(start)
	sum := sha256.Sum256(body)
	if resp.StatusCode != http.StatusCreated || resp.Header.Get("X-Received") != hex.EncodeToString(sum[:]) {
		t.Fatalf("upload: status %d, upstream received %s bytes hashing %s", resp.StatusCode, resp.Header.Get("X-Length"), resp.Header.Get("X-Received"))
	}
	if elapsed < 400*time.Millisecond {
		t.Errorf("2 MiB upload at 4 MiB/s took %v, want >= 0.4s", elapsed)
	}
	if st := p.Stats(); st.BytesUp != int64(len(body)) || st.Bytes != 0 {
		t.Errorf("stats %+v: want %d bytes up, none down", st, len(body))
	}
}

func TestUpstreamDown(t *testing.T) {
	dead, _ := url.Parse("http://127.0.0.1:1")
	p, base := startProxy(t, dead, Options{})
	r := fetch(context.Background(), newClient(t), http.MethodGet, base+"/x", "")
	if r.err != nil || r.status != http.StatusBadGateway {
		t.Fatalf("status %d, %v: want 502", r.status, r.err)
	}
	if st := p.Stats(); st.UpstreamErrors != 1 {
		t.Fatalf("stats %+v: want one upstream error", st)
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	good, _ := url.Parse("http://127.0.0.1:5000")
	ftp, _ := url.Parse("ftp://127.0.0.1/")
	cases := map[string]struct {
		u    *url.URL
		opts Options
	}{
		"nil upstream":  {nil, Options{}},
		"no host":       {&url.URL{Scheme: "http"}, Options{}},
		"scheme":        {ftp, Options{}},
		"negative rate": {good, Options{BytesPerSecond: -1}},
		"huge rate":     {good, Options{BytesPerSecond: MaxRate + 1}},
		"negative RTT":  {good, Options{RTT: -time.Second}},
		"drop > 1":      {good, Options{DropRate: 1.5}},
		"drop < 0":      {good, Options{DropRate: -0.1}},
		"chunk":         {good, Options{ChunkSize: -1}},
	}
	for name, tc := range cases {
		if _, err := New(tc.u, tc.opts); !errors.Is(err, ErrBadOptions) {
			t.Errorf("%s: error %v, want ErrBadOptions", name, err)
		}
	}
}

func TestStartStop(t *testing.T) {
	up := startUpstream(t)
	p, err := New(up.URL, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr, stop, err := p.Start(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t)
	if r := fetch(context.Background(), c, http.MethodGet, "http://"+addr+"/", "bytes=0-9"); r.err != nil || len(r.body) != 10 {
		t.Fatalf("GET: %v", r.err)
	}
	cancel() // ctx ending stops the server as stop would
	if err := stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	if r := fetch(context.Background(), c, http.MethodGet, "http://"+addr+"/", ""); r.err == nil {
		t.Fatal("the proxy still answers after stop")
	}
	if _, _, err := p.Start(context.Background(), "256.0.0.1:0"); err == nil {
		t.Fatal("Start on a bad address succeeded")
	}
}
