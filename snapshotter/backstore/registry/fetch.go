package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// errTruncated marks a response body that ended before the bytes it
// promised; the remainder is asked for again.
var errTruncated = errors.New("response body truncated")

// Repository reads blobs of one repository on one registry host. It is safe
// for concurrent use.
type Repository struct {
	c       *Client
	name    string // e.g. "docker.io/library/hello-world"
	path    string // repository path on the host, e.g. "library/hello-world"
	host    docker.RegistryHost
	blobURL string
}

// Repository opens the repository an image reference names ("host/name",
// a tag or digest is allowed and ignored). Short Docker Hub names are
// normalised ("busybox" is docker.io/library/busybox).
func (c *Client) Repository(ref string) (*Repository, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidReference, ref, err)
	}
	return c.repository(reference.Domain(named), reference.Path(named))
}

// RepositoryFromBlobURL opens the repository of a blob base URL of the form
// upstream overlaybd stores as repoBlobUrl: "https://host/v2/<repo>/blobs".
// The URL's scheme wins over Options.PlainHTTP.
func (c *Client) RepositoryFromBlobURL(blobURL string) (*Repository, error) {
	u, err := url.Parse(blobURL)
	if err != nil {
		return nil, fmt.Errorf("%w: blob URL %q: %w", ErrInvalidReference, blobURL, err)
	}
	p, okPrefix := strings.CutPrefix(strings.TrimSuffix(u.Path, "/"), "/v2/")
	p, okSuffix := strings.CutSuffix(p, "/blobs")
	if !okPrefix || !okSuffix || p == "" || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("%w: blob URL %q is not scheme://host/v2/<repo>/blobs", ErrInvalidReference, blobURL)
	}
	refHost := u.Host
	if refHost == "registry-1.docker.io" {
		refHost = "docker.io"
	}
	r, err := c.repository(refHost, p)
	if err != nil {
		return nil, err
	}
	r.host.Scheme = u.Scheme
	r.blobURL = u.Scheme + "://" + r.host.Host + r.host.Path + "/" + p + "/blobs"
	return r, nil
}

func (c *Client) repository(refHost, path string) (*Repository, error) {
	h, err := c.pullHost(refHost)
	if err != nil {
		return nil, err
	}
	return &Repository{
		c:       c,
		name:    refHost + "/" + path,
		path:    path,
		host:    h,
		blobURL: h.Scheme + "://" + h.Host + h.Path + "/" + path + "/blobs",
	}, nil
}

// Name is the repository's normalised name, "host/path".
func (r *Repository) Name() string { return r.name }

// BlobURL is the base URL of the repository's blobs,
// "scheme://host/v2/<repo>/blobs" (upstream overlaybd's repoBlobUrl).
func (r *Repository) BlobURL() string { return r.blobURL }

// FetchRange fills p with the blob's bytes [off, off+len(p)). It returns nil
// only when every byte was read; a short or failed response is retried for
// the remainder with backoff, and when the retry budget is spent the error
// wraps ErrFetch (and ErrNotFound or ErrUnauthorized when those were the
// cause). A range past the blob's end fails with ErrFetch.
func (r *Repository) FetchRange(ctx context.Context, dgst digest.Digest, off int64, p []byte) error {
	if err := dgst.Validate(); err != nil {
		return fmt.Errorf("%w: blob digest %q: %w", ErrFetch, dgst, err)
	}
	if off < 0 {
		return fmt.Errorf("%w: blob %s: negative offset %d", ErrFetch, dgst, off)
	}
	// Bearer tokens are scoped; containerd's authorizer reads the scope from
	// the context.
	ctx = docker.WithScope(ctx, "repository:"+r.path+":pull")
	done, failures := 0, 0
	for done < len(p) {
		n, err := r.rangeOnce(ctx, dgst, off+int64(done), p[done:])
		done += n
		if err == nil {
			continue // the server may legitimately send less than asked
		}
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("registry: read %s [%d, %d): %w", dgst, off, off+int64(len(p)), cerr)
		}
		var perm *permanentError
		if errors.As(err, &perm) {
			return fmt.Errorf("%w: read %s [%d, %d): %w", ErrFetch, dgst, off, off+int64(len(p)), err)
		}
		failures++
		if failures > r.c.opts.MaxRetries {
			return fmt.Errorf("%w: read %s [%d, %d): giving up after %d attempts: %w",
				ErrFetch, dgst, off, off+int64(len(p)), failures, err)
		}
		if err := sleep(ctx, r.c.backoff(failures)); err != nil {
			return fmt.Errorf("registry: read %s [%d, %d): %w", dgst, off, off+int64(len(p)), err)
		}
	}
	return nil
}

// backoff is the delay before retry number attempt (1-based): exponential,
// capped, with "equal jitter" so parallel readers hit by the same fault do
// not retry in lockstep.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.opts.RetryBaseDelay << min(attempt-1, 30)
	if d <= 0 || d > c.opts.RetryMaxDelay {
		d = c.opts.RetryMaxDelay
	}
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// rangeOnce issues one ranged GET (plus one re-authorised repeat after a 401)
// and copies what arrives into p. It returns the bytes copied and nil when
// the response was complete, even if it covered less than p.
func (r *Repository) rangeOnce(ctx context.Context, dgst digest.Digest, off int64, p []byte) (int, error) {
	release, err := r.c.acquire(ctx, r.host.Host)
	if err != nil {
		return 0, err
	}
	defer release()
	rctx, cancel := context.WithTimeout(ctx, r.c.opts.RequestTimeout)
	defer cancel()
	for authorized := false; ; authorized = true {
		req, err := r.newRequest(rctx, dgst, off, len(p))
		if err != nil {
			return 0, err
		}
		resp, err := r.host.Client.Do(req)
		if err != nil {
			var certErr *tls.CertificateVerificationError
			if errors.As(err, &certErr) {
				return 0, permanent(err)
			}
			return 0, err
		}
		if resp.StatusCode == http.StatusUnauthorized && !authorized && r.host.Authorizer != nil {
			aerr := r.host.Authorizer.AddResponses(ctx, []*http.Response{resp})
			drain(resp)
			if aerr != nil {
				return 0, permanent(fmt.Errorf("%w: %s: %w", ErrUnauthorized, r.host.Host, aerr))
			}
			continue
		}
		n, err := readRange(resp, off, p)
		drain(resp)
		return n, err
	}
}

func (r *Repository) newRequest(ctx context.Context, dgst digest.Digest, off int64, n int) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.blobURL+"/"+dgst.String(), nil)
	if err != nil {
		return nil, permanent(err)
	}
	for k, v := range r.host.Header {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", r.c.opts.UserAgent)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+int64(n)-1))
	if r.host.Authorizer != nil {
		if err := r.host.Authorizer.Authorize(ctx, req); err != nil {
			return nil, permanent(fmt.Errorf("%w: %s: %w", ErrUnauthorized, r.host.Host, err))
		}
	}
	return req, nil
}

func drain(resp *http.Response) {
	// A little draining lets the connection be reused; a big leftover is
	// cheaper to drop with the connection.
	_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

var errServer = errors.New("server error")

// readRange copies the body of an answer to a range request into p.
func readRange(resp *http.Response, off int64, p []byte) (int, error) {
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, end, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return 0, permanent(err)
		}
		if start != off {
			return 0, permanent(fmt.Errorf("server answered range starting at %d, asked %d", start, off))
		}
		want := int(min(int64(len(p)), end-start+1))
		n, err := io.ReadFull(resp.Body, p[:want])
		if err != nil {
			return n, fmt.Errorf("%w: got %d of %d bytes at offset %d: %w", errTruncated, n, want, off, err)
		}
		return n, nil
	case http.StatusOK:
		// The server ignored Range and sends the whole blob: skip to off.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return 0, fmt.Errorf("%w: skipping to offset %d of a full-body answer: %w", errTruncated, off, err)
		}
		n, err := io.ReadFull(resp.Body, p)
		if err != nil && !(errors.Is(err, io.ErrUnexpectedEOF) && resp.ContentLength == off+int64(n)) {
			return n, fmt.Errorf("%w: got %d of %d bytes at offset %d: %w", errTruncated, n, len(p), off, err)
		}
		if n < len(p) {
			return n, permanent(fmt.Errorf("range [%d, %d) beyond the blob's end %d", off, off+int64(len(p)), off+int64(n)))
		}
		return n, nil
	case http.StatusNotFound:
		return 0, permanent(fmt.Errorf("%w: %s", ErrNotFound, resp.Request.URL))
	case http.StatusUnauthorized, http.StatusForbidden:
		return 0, permanent(fmt.Errorf("%w: %s: %s", ErrUnauthorized, resp.Request.URL, resp.Status))
	case http.StatusTooManyRequests:
		return 0, fmt.Errorf("%w: %s", errServer, resp.Status)
	}
	if resp.StatusCode >= 500 {
		return 0, fmt.Errorf("%w: %s", errServer, resp.Status)
	}
	return 0, permanent(fmt.Errorf("unexpected answer %s to a range request", resp.Status))
}

// parseContentRange parses "bytes start-end/total" (total may be "*").
func parseContentRange(v string) (start, end int64, err error) {
	spec, ok := strings.CutPrefix(v, "bytes ")
	rng, _, ok2 := strings.Cut(spec, "/")
	a, b, ok3 := strings.Cut(rng, "-")
	if ok && ok2 && ok3 {
		start, err1 := strconv.ParseInt(a, 10, 64)
		end, err2 := strconv.ParseInt(b, 10, 64)
		if err1 == nil && err2 == nil && start >= 0 && end >= start {
			return start, end, nil
		}
	}
	return 0, 0, fmt.Errorf("malformed Content-Range %q", v)
}

// Blob is one blob of a repository read at random offsets. Size and Digest
// come from its descriptor and are trusted.
type Blob struct {
	r    *Repository
	desc ocispec.Descriptor
}

// Blob returns a random-access reader for the blob desc describes.
func (r *Repository) Blob(desc ocispec.Descriptor) *Blob { return &Blob{r: r, desc: desc} }

// Size is the blob's length in bytes.
func (b *Blob) Size() int64 { return b.desc.Size }

// Digest is the blob's digest.
func (b *Blob) Digest() digest.Digest { return b.desc.Digest }

// ReadAt implements io.ReaderAt without a deadline; prefer ReadAtContext.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads len(p) bytes at off with io.ReaderAt's contract: a read
// reaching the blob's end returns the bytes up to it and io.EOF.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: blob %s: negative offset %d", ErrFetch, b.desc.Digest, off)
	}
	if off >= b.desc.Size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), b.desc.Size-off))
	if err := b.r.FetchRange(ctx, b.desc.Digest, off, p[:n]); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
