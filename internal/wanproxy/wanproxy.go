// Package wanproxy owns the project's WAN emulation: an HTTP reverse proxy
// that puts a slow, distant link between a client (the block backstore) and
// an upstream server (a local registry). The kernel here has no netem, and
// what trace prefetch buys depends on the link, so benchmarks and tests run
// every registry access through this proxy.
//
// What it models, per direction of a full-duplex bottleneck link:
//
//   - Bandwidth: one link shared by every connection carries all response
//     body bytes (a second one, at the same rate, carries request bodies).
//     Bodies move in small chunks (16 KiB) queued on the link in arrival
//     order, so parallel responses share it chunk by chunk, like flows
//     through one bottleneck queue. An idle link gives no burst; time a
//     busy stream loses to the proxy's own scheduling on a loaded machine
//     (up to 50 ms) is made up, as a sender's socket buffer would have kept
//     the link busy.
//   - Latency: each request waits half an RTT before it is forwarded (the
//     request crossing the link) and the response waits another half before
//     its headers are sent (the first byte coming back): a request costs one
//     RTT plus its bytes at the link rate.
//   - TCP costs: a client connection's first request pays one more RTT for
//     the handshake. Each connection has a congestion window that starts at
//     10 segments and grows by the bytes acknowledged each RTT (slow start)
//     until it reaches the bandwidth-delay product; after more than
//     RTT+200ms idle it restarts, as Linux does by default. Loss, recovery
//     and TLS are not modelled.
//   - Drops: each request is dropped with a probability; a dropped response
//     sends its headers and part of its body and then the connection is
//     closed, so the client sees a truncated body (bodyless responses are
//     dropped before their headers).
//
// Range requests, streaming and 206 answers pass through unchanged; bodies
// are never buffered whole, and no bytes are decompressed or rewritten.
package wanproxy

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// Errors.
var (
	// ErrDropped is the error of a response the emulated link dropped.
	ErrDropped = errors.New("wanproxy: connection dropped by the emulated link")
	// ErrBadOptions is wrapped by New's errors.
	ErrBadOptions = errors.New("wanproxy: bad options")
)

// Defaults of Options' zero fields.
const (
	DefaultChunkSize   = 16 << 10
	DefaultMaxInFlight = 256
	DefaultMaxConns    = 1024
	// MaxChunkSize bounds Options.ChunkSize: pacing coarser than this is
	// not pacing.
	MaxChunkSize = 1 << 20
)

// unknownLengthCut bounds where a response of unknown length is cut.
const unknownLengthCut = 64 << 10

// Options configure the emulated link. The zero value is a transparent proxy.
type Options struct {
	// BytesPerSecond caps the link in each direction, in bytes (not bits)
	// per second, shared by all connections; 0 is unlimited. ParseRate reads
	// "25mbit" or "3MB".
	BytesPerSecond int64
	// RTT is the round-trip time added to every request.
	RTT time.Duration
	// DropRate is the probability, in [0, 1], that a request's connection is
	// dropped mid-response.
	DropRate float64
	// Seed seeds the drop decisions: the same seed gives the same sequence
	// of decisions in the order requests arrive.
	Seed uint64
	// DisableSlowStart turns off the congestion-window model, leaving a
	// fixed RTT per request and the bandwidth cap.
	DisableSlowStart bool
	// ChunkSize is the pacing unit in bytes; default DefaultChunkSize.
	ChunkSize int
	// MaxInFlight bounds the requests forwarded at once; more wait.
	// Default DefaultMaxInFlight.
	MaxInFlight int
	// MaxConns bounds the client connections Start accepts at once.
	// Default DefaultMaxConns.
	MaxConns int
	// Logger receives per-request debug records and upstream failures; the
	// zero value discards them.
	Logger zerolog.Logger
}

// Stats are the proxy's counters since New.
type Stats struct {
	Requests       int64 `json:"requests"`        // requests received
	InFlight       int64 `json:"in_flight"`       // requests being served now
	Connections    int64 `json:"connections"`     // client connections that paid a handshake
	Bytes          int64 `json:"bytes"`           // response body bytes sent over the link
	BytesUp        int64 `json:"bytes_up"`        // request body bytes sent over the link
	Dropped        int64 `json:"dropped"`         // responses cut by an emulated drop
	UpstreamErrors int64 `json:"upstream_errors"` // requests the upstream failed (answered 502)
}

type counters struct {
	requests, inFlight, connections, bytes, bytesUp, dropped, upstreamErrors atomic.Int64
}

// Proxy is an http.Handler that forwards to an upstream server over an
// emulated WAN link. It is safe for concurrent use.
type Proxy struct {
	opts     Options
	rp       *httputil.ReverseProxy
	tr       *http.Transport
	down, up *link // nil: unlimited
	ss       slowStart
	chunk    int
	sem      chan struct{}
	log      zerolog.Logger
	stats    counters

	rngMu sync.Mutex
	rng   *rand.Rand
}

type (
	connKey     struct{}
	exchangeKey struct{}
)

// exchange is one request's state, carried from ServeHTTP to the reverse
// proxy's hooks in the request context.
type exchange struct {
	conn *tcpConn
	drop bool
}

// New returns a proxy to upstream (an http or https URL; its path prefixes
// every request's path) with the link opts describe.
func New(upstream *url.URL, opts Options) (*Proxy, error) {
	if err := validate(upstream, &opts); err != nil {
		return nil, err
	}
	p := &Proxy{
		opts:  opts,
		chunk: opts.ChunkSize,
		sem:   make(chan struct{}, opts.MaxInFlight),
		log:   opts.Logger,
		rng:   rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x9e3779b97f4a7c15)),
	}
	p.down, p.up = newLink(opts.BytesPerSecond), newLink(opts.BytesPerSecond)
	bdp := int64(float64(opts.BytesPerSecond) * opts.RTT.Seconds())
	p.ss = slowStart{
		enabled: !opts.DisableSlowStart && opts.RTT > 0 && bdp > initialWindow,
		rtt:     opts.RTT,
		rto:     opts.RTT + minRTO,
		bdp:     bdp,
	}
	p.tr = &http.Transport{
		// No Proxy: the upstream is never routed through $HTTP_PROXY.
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          opts.MaxInFlight,
		MaxIdleConnsPerHost:   opts.MaxInFlight,
		DisableCompression:    true, // pass bytes through as the upstream sent them
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(upstream)
			// Registries build absolute Location URLs from X-Forwarded-Host,
			// so uploads come back through the proxy.
			pr.SetXForwarded()
		},
		Transport:      p.tr,
		FlushInterval:  -1, // each paced chunk reaches the client as it is released
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.errorHandler,
		ErrorLog:       log.New(debugWriter{p.log}, "", 0),
	}
	return p, nil
}

func validate(upstream *url.URL, opts *Options) error {
	switch {
	case upstream == nil || upstream.Host == "":
		return fmt.Errorf("%w: upstream URL %v has no host", ErrBadOptions, upstream)
	case upstream.Scheme != "http" && upstream.Scheme != "https":
		return fmt.Errorf("%w: upstream URL %v: scheme %q is not http or https", ErrBadOptions, upstream, upstream.Scheme)
	case opts.BytesPerSecond < 0 || opts.BytesPerSecond > MaxRate:
		return fmt.Errorf("%w: rate %d bytes/s is outside [0, %d]", ErrBadOptions, opts.BytesPerSecond, int64(MaxRate))
	case opts.RTT < 0:
		return fmt.Errorf("%w: negative RTT %v", ErrBadOptions, opts.RTT)
	case math.IsNaN(opts.DropRate) || opts.DropRate < 0 || opts.DropRate > 1:
		return fmt.Errorf("%w: drop rate %v is outside [0, 1]", ErrBadOptions, opts.DropRate)
	case opts.ChunkSize < 0 || opts.ChunkSize > MaxChunkSize:
		return fmt.Errorf("%w: chunk size %d is outside [0, %d]", ErrBadOptions, opts.ChunkSize, MaxChunkSize)
	case opts.MaxInFlight < 0 || opts.MaxConns < 0:
		return fmt.Errorf("%w: negative in-flight or connection limit", ErrBadOptions)
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.MaxInFlight == 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxConns == 0 {
		opts.MaxConns = DefaultMaxConns
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() Stats {
	s := &p.stats
	return Stats{
		Requests:       s.requests.Load(),
		InFlight:       s.inFlight.Load(),
		Connections:    s.connections.Load(),
		Bytes:          s.bytes.Load(),
		BytesUp:        s.bytesUp.Load(),
		Dropped:        s.dropped.Load(),
		UpstreamErrors: s.upstreamErrors.Load(),
	}
}

// ConnContext gives each client connection its emulated TCP state. Start
// installs it; a caller serving the proxy from its own http.Server should
// set it as the server's ConnContext, or else every request is treated as
// arriving on an established connection with a fresh congestion window.
func (p *Proxy) ConnContext(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, &tcpConn{})
}

// ServeHTTP forwards r to the upstream over the emulated link.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	defer func() { <-p.sem }()
	p.stats.requests.Add(1)
	p.stats.inFlight.Add(1)
	defer p.stats.inFlight.Add(-1)

	conn, ok := ctx.Value(connKey{}).(*tcpConn)
	if !ok {
		conn = &tcpConn{established: true}
	}
	delay := p.opts.RTT / 2
	if conn.handshake() {
		p.stats.connections.Add(1)
		delay += p.opts.RTT
	}
	if sleep(ctx, delay) != nil {
		return // the client went away
	}
	ctx = context.WithValue(ctx, exchangeKey{}, &exchange{conn: conn, drop: p.chance(p.opts.DropRate)})
	r = r.WithContext(ctx)
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &upBody{p: p, ctx: ctx, body: r.Body, pace: pacer{link: p.up}}
	}
	p.rp.ServeHTTP(w, r)
}

// modifyResponse delays the response by the return half of the RTT and puts
// its body on the link.
func (p *Proxy) modifyResponse(res *http.Response) error {
	ctx := res.Request.Context()
	ex, ok := ctx.Value(exchangeKey{}).(*exchange)
	if !ok {
		return fmt.Errorf("wanproxy: response to %s without request state", res.Request.URL)
	}
	if err := sleep(ctx, p.opts.RTT-p.opts.RTT/2); err != nil {
		return err
	}
	cut := int64(-1)
	if ex.drop {
		if cut = p.cutPoint(res); cut < 0 {
			p.stats.dropped.Add(1)
			return ErrDropped
		}
	}
	p.log.Debug().Str("method", res.Request.Method).Str("path", res.Request.URL.Path).
		Str("range", res.Request.Header.Get("Range")).Int("status", res.StatusCode).
		Int64("length", res.ContentLength).Bool("drop", ex.drop).Msg("wan-proxy response")
	res.Body = &downBody{p: p, ctx: ctx, body: res.Body, conn: ex.conn, pace: pacer{link: p.down}, cut: cut}
	return nil
}

// cutPoint picks how many body bytes a dropped response delivers: at least
// one, so the headers reach the client, and at least one fewer than the
// body, so the client notices. It returns -1 when the response has no body
// to cut.
func (p *Proxy) cutPoint(res *http.Response) int64 {
	noBody := res.Request.Method == http.MethodHead || res.StatusCode == http.StatusNoContent ||
		res.StatusCode == http.StatusNotModified || (res.ContentLength >= 0 && res.ContentLength < 2)
	if noBody {
		return -1
	}
	n := res.ContentLength
	if n < 0 {
		n = unknownLengthCut + 1
	}
	p.rngMu.Lock()
	defer p.rngMu.Unlock()
	return 1 + p.rng.Int64N(n-1)
}

// chance returns true with probability prob.
func (p *Proxy) chance(prob float64) bool {
	if prob <= 0 {
		return false
	}
	p.rngMu.Lock()
	defer p.rngMu.Unlock()
	return p.rng.Float64() < prob
}

func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, ErrDropped):
		abort(w)
	case r.Context().Err() != nil:
		// The client went away; nobody is left to answer.
	default:
		p.stats.upstreamErrors.Add(1)
		p.log.Warn().Err(err).Str("method", r.Method).Str("path", r.URL.Path).Msg("wan-proxy: upstream failed")
		http.Error(w, "wanproxy: upstream: "+err.Error(), http.StatusBadGateway)
	}
}

// abort closes the client connection without a response, as a link that
// died would leave it.
func abort(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// HTTP/2 cannot hand over its connection; refuse the request instead.
		http.Error(w, ErrDropped.Error(), http.StatusBadGateway)
		return
	}
	conn.Close()
}

// debugWriter turns the reverse proxy's log lines into debug records: its
// messages are about the client or upstream going away, which the counters
// already show.
type debugWriter struct{ log zerolog.Logger }

func (d debugWriter) Write(b []byte) (int, error) {
	d.log.Debug().Msg(strings.TrimSpace(string(b)))
	return len(b), nil
}
