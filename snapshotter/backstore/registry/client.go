// Package registry is the block backstore's access to OCI registries. It
// resolves an image reference (tag or digest; a multi-platform index is
// narrowed to one platform) to its manifest, config and layer descriptors,
// and reads arbitrary byte ranges of layer blobs with HTTP range requests.
//
// Name resolution, host configuration and authentication (anonymous, basic,
// bearer tokens) are containerd's (core/remotes/docker). containerd's blob
// fetcher can only open a blob at an offset and read to its end, so ranged
// reads of [off, off+n) are issued here on the same hosts, HTTP client and
// authorizer, with retries (exponential backoff with jitter) on server
// errors, connection resets, timeouts and truncated bodies, and a per-host
// concurrency cap.
package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/platforms"
)

// Errors returned (wrapped) by this package.
var (
	// ErrFetch means a registry request failed for good: a permanent error
	// status, or transient faults that outlasted the retry budget.
	ErrFetch = errors.New("registry: fetch failed")
	// ErrNotFound means the registry does not have the manifest or blob.
	ErrNotFound = errors.New("registry: not found")
	// ErrUnauthorized means the registry refused the credentials (or their
	// absence).
	ErrUnauthorized = errors.New("registry: unauthorized")
	// ErrNoPlatform means an image index lists no manifest for the wanted
	// platform.
	ErrNoPlatform = errors.New("registry: no manifest for platform")
	// ErrInvalidManifest means a manifest, index or config is malformed, of
	// an unsupported media type, or does not match its digest.
	ErrInvalidManifest = errors.New("registry: invalid manifest")
	// ErrInvalidReference means an image reference or blob URL cannot be
	// parsed.
	ErrInvalidReference = errors.New("registry: invalid reference")
)

// Defaults for the zero values of Options.
const (
	DefaultRequestTimeout = 60 * time.Second
	DefaultMaxRetries     = 5
	DefaultRetryBaseDelay = 100 * time.Millisecond
	DefaultRetryMaxDelay  = 5 * time.Second
	DefaultConcurrency    = 16
	DefaultUserAgent      = "obdtrace"
)

// CredentialsFunc returns the user name and secret for a registry host
// ("host:port"). An empty user with a secret is an identity (refresh) token;
// both empty means anonymous.
type CredentialsFunc func(host string) (user, secret string, err error)

// Options configures a Client. The zero value talks HTTPS to every host,
// takes credentials from the docker config and uses the defaults above.
type Options struct {
	// PlainHTTP lists the hosts ("host:port", as written in references)
	// spoken to over plain HTTP instead of HTTPS.
	PlainHTTP []string
	// TLSConfig customises HTTPS (extra CAs, client certificates).
	TLSConfig *tls.Config
	// Credentials supplies registry credentials. When nil, the docker CLI
	// config in DockerConfigDir is read (see DockerConfigCredentials).
	Credentials CredentialsFunc
	// DockerConfigDir is where config.json lives; "" means $DOCKER_CONFIG,
	// else ~/.docker.
	DockerConfigDir string
	// Platform picks the manifest from an index, e.g. "linux/arm64/v8";
	// "" means the host's platform.
	Platform string
	// RequestTimeout bounds one HTTP request, body included.
	RequestTimeout time.Duration
	// MaxRetries is how many times a failed range read is retried; negative
	// disables retries.
	MaxRetries int
	// RetryBaseDelay and RetryMaxDelay bound the exponential backoff.
	RetryBaseDelay, RetryMaxDelay time.Duration
	// Concurrency caps the range requests in flight to one host.
	Concurrency int
	// UserAgent is sent with every request.
	UserAgent string
	// Transport replaces the HTTP transport (mainly for tests and proxies).
	Transport http.RoundTripper
}

func (o Options) withDefaults() Options {
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.MaxRetries == 0 {
		o.MaxRetries = DefaultMaxRetries
	} else if o.MaxRetries < 0 {
		o.MaxRetries = 0
	}
	if o.RetryBaseDelay <= 0 {
		o.RetryBaseDelay = DefaultRetryBaseDelay
	}
	if o.RetryMaxDelay < o.RetryBaseDelay {
		o.RetryMaxDelay = max(DefaultRetryMaxDelay, o.RetryBaseDelay)
	}
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.UserAgent == "" {
		o.UserAgent = DefaultUserAgent
	}
	return o
}

// Client resolves images and opens repositories. It is safe for concurrent
// use; share one per process so connections, tokens and the per-host
// concurrency caps are shared.
type Client struct {
	opts     Options
	hosts    docker.RegistryHosts
	platform platforms.MatchComparer

	mu   sync.Mutex
	sems map[string]chan struct{} // per registry host
}

// New builds a Client.
func New(opts Options) (*Client, error) {
	opts = opts.withDefaults()
	creds := opts.Credentials
	if creds == nil {
		var err error
		if creds, err = DockerConfigCredentials(opts.DockerConfigDir); err != nil {
			return nil, err
		}
	}
	matcher := platforms.Default()
	if opts.Platform != "" {
		p, err := platforms.Parse(opts.Platform)
		if err != nil {
			return nil, fmt.Errorf("registry: platform %q: %w", opts.Platform, err)
		}
		matcher = platforms.Only(p)
	}
	transport := opts.Transport
	if transport == nil {
		t := docker.DefaultHTTPTransport(opts.TLSConfig)
		// Go keeps only 2 idle connections per host by default, which would
		// make a burst of parallel range reads reconnect over and over.
		t.MaxIdleConnsPerHost = opts.Concurrency
		t.MaxIdleConns = 4 * opts.Concurrency
		t.ResponseHeaderTimeout = opts.RequestTimeout
		transport = t
	}
	httpClient := &http.Client{Transport: transport}
	authOpts := []docker.AuthorizerOpt{docker.WithAuthClient(httpClient)}
	if creds != nil {
		authOpts = append(authOpts, docker.WithAuthCreds(creds))
	}
	plain := slices.Clone(opts.PlainHTTP)
	c := &Client{
		opts:     opts,
		platform: matcher,
		sems:     make(map[string]chan struct{}),
	}
	c.hosts = docker.ConfigureDefaultRegistries(
		docker.WithClient(httpClient),
		docker.WithAuthorizer(docker.NewDockerAuthorizer(authOpts...)),
		docker.WithPlainHTTP(func(host string) (bool, error) {
			return slices.Contains(plain, host), nil
		}),
	)
	return c, nil
}

// pullHost returns the configured registry host serving pulls for refHost.
func (c *Client) pullHost(refHost string) (docker.RegistryHost, error) {
	hosts, err := c.hosts(refHost)
	if err != nil {
		return docker.RegistryHost{}, fmt.Errorf("%w: host %q: %w", ErrInvalidReference, refHost, err)
	}
	for _, h := range hosts {
		if h.Capabilities.Has(docker.HostCapabilityPull) {
			return h, nil
		}
	}
	return docker.RegistryHost{}, fmt.Errorf("%w: no pull host configured for %q", ErrInvalidReference, refHost)
}

// acquire takes a slot of host's concurrency cap; release gives it back.
func (c *Client) acquire(ctx context.Context, host string) (release func(), err error) {
	c.mu.Lock()
	sem, ok := c.sems[host]
	if !ok {
		sem = make(chan struct{}, c.opts.Concurrency)
		c.sems[host] = sem
	}
	c.mu.Unlock()
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// permanentError marks a failure that retrying cannot fix (a 404, refused
// credentials, a malformed answer).
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }

// isTransient reports whether an error from containerd's resolver or fetcher
// is worth retrying: 5xx and 429 answers and transport failures other than
// TLS verification.
func isTransient(err error) bool {
	var status remoteerrors.ErrUnexpectedStatus
	if errors.As(err, &status) {
		return status.StatusCode >= 500 || status.StatusCode == http.StatusTooManyRequests
	}
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return false
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF)
}

func hasStatus(err error, code int) bool {
	var status remoteerrors.ErrUnexpectedStatus
	return errors.As(err, &status) && status.StatusCode == code
}
