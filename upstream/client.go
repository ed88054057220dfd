// Package upstream talks to upstream registries through go-containerregistry's
// transport (token auth), and fills the cache from them: one upstream fetch
// per digest, streamed to every waiting client while it fills.
package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// Sentinel errors. Every error a Client returns wraps one of them.
var (
	ErrNotFound     = errors.New("upstream: not found")
	ErrUnauthorized = errors.New("upstream: unauthorized")
	ErrRateLimited  = errors.New("upstream: rate limited")
	ErrUnavailable  = errors.New("upstream: unavailable")
	ErrTooLarge     = errors.New("upstream: response too large")
	ErrBadResponse  = errors.New("upstream: bad response")
)

// MaxManifestSize caps what an upstream may send as a manifest.
const MaxManifestSize = 4 << 20

// AcceptedTypes are the manifest media types a client may ask for, and
// that slipway passes on in an Accept header: ManifestTypes, and Docker's
// schema 1 for old clients.
var AcceptedTypes = append(slices.Clone(ManifestTypes),
	"application/vnd.docker.distribution.manifest.v1+prettyjws",
	"application/vnd.docker.distribution.manifest.v1+json",
)

// ManifestTypes are the manifest media types slipway asks for when the
// client did not say.
var ManifestTypes = []string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// Config describes one upstream registry.
type Config struct {
	// URL is the registry's base URL: https://registry-1.docker.io, or
	// http://127.0.0.1:5001 for a registry without TLS.
	URL string
	// Auth is used for token exchange and basic auth; nil is anonymous.
	Auth authn.Authenticator
	// Transport is the base round tripper; nil is slipway's own, which
	// refuses to connect to loopback, private and link-local addresses
	// unless AllowPrivate.
	Transport http.RoundTripper
	// AllowPrivate lets the client connect to loopback and private
	// addresses. It is on by itself when the URL's host is such an address
	// or "localhost".
	AllowPrivate bool
	// MaxConcurrent caps the requests in flight to this upstream (a blob
	// download counts until its body is closed). Default 32. A quarter of
	// it (at least one) is kept for everything but blob downloads:
	// manifests, tags, referrers and HEADs never wait behind big layers
	// streaming in.
	MaxConcurrent int
	// Retries is how often an idempotent request that failed with a
	// network error or a 5xx is tried again. Default 2; negative: none.
	Retries int
	Logger  *slog.Logger
	// Observer, if set, hears how long each request took (metrics).
	Observer Observer
}

// Client talks to one upstream registry. It keeps one authenticated
// transport per repository, so a token is fetched once per repository scope
// and refreshed only when it expires (the transport retries a 401 with a new
// token).
type Client struct {
	reg     name.Registry
	base    *url.URL
	auth    authn.Authenticator
	rt      http.RoundTripper
	blobSem chan struct{} // blob downloads
	metaSem chan struct{} // everything else
	retries int
	log     *slog.Logger

	mu sync.Mutex
	// transports holds one authenticated transport (and so its token) per
	// repository, at most maxTransports, least recently used first out.
	transports   *simplelru.LRU[string, http.RoundTripper]
	backoffUntil time.Time // after a 429: no requests until then

	rateRemaining atomic.Int64 // Docker Hub's ratelimit-remaining, -1 unknown
	rateLimit     atomic.Int64 // and its ratelimit-limit, -1 unknown
	observer      Observer

	statsMu   sync.Mutex
	responses map[string]uint64 // by status code, or "error" for no response

	health health // last success and failure, for the status page
}

const maxTransports = 1024

// New returns a client for the upstream c describes.
func New(c Config) (*Client, error) {
	u, err := url.Parse(c.URL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("upstream: invalid URL %q: want http(s)://host[:port]", c.URL)
	}
	var opts []name.Option
	if u.Scheme == "http" {
		opts = append(opts, name.Insecure)
	}
	reg, err := name.NewRegistry(u.Host, opts...)
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	if c.Auth == nil {
		c.Auth = authn.Anonymous
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = 32
	}
	if c.Retries == 0 {
		c.Retries = 2
	} else if c.Retries < 0 {
		c.Retries = 0
	}
	if c.Transport == nil {
		c.Transport = newTransport(u, c.AllowPrivate || isPrivateHost(u.Hostname()))
	}
	transports, err := simplelru.NewLRU[string, http.RoundTripper](maxTransports, nil)
	if err != nil {
		return nil, err
	}
	cl := &Client{
		reg:        reg,
		base:       &url.URL{Scheme: u.Scheme, Host: u.Host},
		auth:       c.Auth,
		rt:         &hostGuard{upstream: u.Hostname(), allowPrivate: c.AllowPrivate, inner: c.Transport},
		blobSem:    make(chan struct{}, max(c.MaxConcurrent-c.MaxConcurrent/4, 1)),
		metaSem:    make(chan struct{}, max(c.MaxConcurrent/4, 1)),
		retries:    c.Retries,
		log:        c.Logger,
		transports: transports,
		observer:   c.Observer,
	}
	cl.rateRemaining.Store(-1)
	cl.rateLimit.Store(-1)
	return cl, nil
}

// RateLimitRemaining is the last ratelimit-remaining Docker Hub reported,
// or -1.
func (c *Client) RateLimitRemaining() int64 { return c.rateRemaining.Load() }

// Responses counts the requests sent to this upstream by the status code
// of the answer ("200", "404"), or "error" when none came; metrics read it.
func (c *Client) Responses() map[string]uint64 {
	c.statsMu.Lock()
	defer c.statsMu.Unlock()
	return maps.Clone(c.responses)
}

func (c *Client) count(status string) {
	c.statsMu.Lock()
	if c.responses == nil {
		c.responses = map[string]uint64{}
	}
	c.responses[status]++
	c.statsMu.Unlock()
}

// Host is the upstream's host[:port]; it names the upstream in the index.
func (c *Client) Host() string { return c.base.Host }

// URL is the upstream's base URL.
func (c *Client) URL() string { return c.base.String() }

func (c *Client) transport(ctx context.Context, repo string) (http.RoundTripper, error) {
	c.mu.Lock()
	if rt, ok := c.transports.Get(repo); ok {
		c.mu.Unlock()
		return rt, nil
	}
	c.mu.Unlock()

	scope := c.reg.Repo(repo).Scope(transport.PullScope)
	rt, err := transport.NewWithContext(ctx, c.reg, c.auth, c.rt, []string{scope})
	if err != nil {
		return nil, classify(err)
	}

	c.mu.Lock()
	c.transports.Add(repo, rt)
	c.mu.Unlock()
	return rt, nil
}

// forget drops a repository's transport, so the next request sets up auth
// again (after the upstream refused the credentials it holds).
func (c *Client) forget(repo string) {
	c.mu.Lock()
	c.transports.Remove(repo)
	c.mu.Unlock()
}

// do sends one request for repo's kind/ref ("manifests/latest",
// "blobs/sha256:...") and classifies a failed answer into a sentinel. Network
// errors and 5xx are retried with backoff; after a 429 the upstream is left
// alone for its Retry-After. On success the caller owns the response body,
// and closing it frees the request's slot under MaxConcurrent.
func (c *Client) do(ctx context.Context, method, repo, path string, accept []string) (*http.Response, error) {
	var err error
	for attempt := 0; ; attempt++ {
		var resp *http.Response
		resp, err = c.doOnce(ctx, method, repo, path, accept)
		if err == nil {
			return resp, nil
		}
		if attempt >= c.retries || !errors.Is(err, ErrUnavailable) || ctx.Err() != nil {
			return nil, err
		}
		// 100 ms, 400 ms, ... with jitter.
		wait := time.Duration(100<<(2*attempt)) * time.Millisecond
		wait += time.Duration(mathrand.Int64N(int64(wait / 2)))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, err
		}
	}
}

func (c *Client) doOnce(ctx context.Context, method, repo, path string, accept []string) (*http.Response, error) {
	if err := c.backingOff(); err != nil {
		return nil, err
	}
	sem := c.metaSem
	if method == http.MethodGet && strings.HasPrefix(path, "blobs/") {
		sem = c.blobSem
	}
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for a free upstream connection: %v", ErrUnavailable, ctx.Err())
	}
	release := sync.OnceFunc(func() { <-sem })

	rt, err := c.transport(ctx, repo)
	if err != nil {
		release()
		if !errors.Is(err, ErrNotFound) {
			c.health.failed(ctx, err)
		}
		return nil, err
	}
	u := *c.base
	path, u.RawQuery, _ = strings.Cut(path, "?")
	u.Path = "/v2/" + repo + "/" + path
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		release()
		return nil, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	if len(accept) > 0 {
		req.Header.Set("Accept", strings.Join(accept, ", "))
	}
	sent := time.Now()
	resp, err := (&http.Client{Transport: rt}).Do(req)
	c.observeRequest(time.Since(sent))
	if err != nil {
		c.count("error")
		release()
		err = classify(err)
		c.health.failed(ctx, err)
		return nil, err
	}
	c.count(strconv.Itoa(resp.StatusCode))
	c.noteRateLimit(resp)
	if resp.StatusCode == http.StatusOK {
		c.health.answered(resp.StatusCode, nil, nil)
		resp.Body = &releaseBody{ReadCloser: resp.Body, release: release}
		return resp, nil
	}
	defer release()
	defer resp.Body.Close()
	var body []byte // the start of a failure's body says why, for the status page
	if failure(resp.StatusCode) {
		body, _ = io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	err = statusError(resp)
	c.health.answered(resp.StatusCode, err, body)
	var rl *RateLimitError
	if errors.As(err, &rl) {
		c.backOff(rl.RetryAfter)
	}
	if errors.Is(err, ErrUnauthorized) {
		c.forget(repo)
	}
	return nil, err
}

type releaseBody struct {
	io.ReadCloser
	release func()
}

func (b *releaseBody) Close() error {
	err := b.ReadCloser.Close()
	b.release()
	return err
}

// Backoff after a 429 without Retry-After, and the longest we honour.
const (
	defaultBackoff = 10 * time.Second
	maxBackoff     = 5 * time.Minute
)

// retryAfter reads a Retry-After value (RFC 9110, 10.2.3): delta-seconds
// or an HTTP-date (http.ParseTime's three formats), relative to now. A date
// in the past means now (0), as "Retry-After: 0" does; a wait longer than
// maxBackoff is maxBackoff, the longest slipway honours. ok is false when
// v is empty or neither form.
func retryAfter(v string, now time.Time) (d time.Duration, ok bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	s, err := strconv.ParseUint(v, 10, 64)
	switch {
	case err == nil:
		return time.Duration(min(s, uint64(maxBackoff/time.Second))) * time.Second, true
	case errors.Is(err, strconv.ErrRange):
		return maxBackoff, true // more digits than a uint64 holds
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	// An HTTP-date counts whole seconds: round a part of one up.
	d = max(t.Sub(now), 0)
	return min((d + time.Second - 1).Truncate(time.Second), maxBackoff), true
}

func (c *Client) backOff(d time.Duration) {
	if d <= 0 {
		d = defaultBackoff
	}
	d = min(d, maxBackoff)
	c.mu.Lock()
	if until := time.Now().Add(d); until.After(c.backoffUntil) {
		c.backoffUntil = until
	}
	c.mu.Unlock()
	c.log.Warn("upstream rate limited: backing off", "upstream", c.Host(), "dur", d)
}

func (c *Client) backingOff() error {
	c.mu.Lock()
	left := time.Until(c.backoffUntil)
	c.mu.Unlock()
	if left > 0 {
		return &RateLimitError{RetryAfter: left.Round(time.Second)}
	}
	return nil
}

// noteRateLimit records Docker Hub's "ratelimit-remaining: 76;w=21600".
func (c *Client) noteRateLimit(resp *http.Response) {
	v := resp.Header.Get("Ratelimit-Remaining")
	if v == "" {
		return
	}
	n, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(v, ";", 2)[0]), 10, 64)
	if err != nil {
		return
	}
	c.rateRemaining.Store(n)
	if l, ok := parseRateLimit(resp.Header.Get("Ratelimit-Limit")); ok {
		c.rateLimit.Store(l)
	}
	c.log.Info("upstream rate limit", "upstream", c.Host(), "remaining", n, "limit", resp.Header.Get("Ratelimit-Limit"))
}

// Descriptor is what a HEAD tells about a manifest or blob.
type Descriptor struct {
	Digest    digest.Digest // empty if the upstream did not say
	Size      int64         // -1 if the upstream did not say
	MediaType string
}

// descriptorOf reads a response's headers. A Content-Type that is not a
// media type, or is too long to be one, is a bad response: it would be
// stored and served as the manifest's.
func descriptorOf(resp *http.Response) (Descriptor, error) {
	mt, err := cache.MediaType(resp.Header.Get("Content-Type"))
	if err != nil {
		return Descriptor{}, fmt.Errorf("%w: Content-Type: %v", ErrBadResponse, err)
	}
	d := Descriptor{Size: resp.ContentLength, MediaType: mt}
	if dg, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
		d.Digest = dg
	}
	return d, nil
}

// HeadManifest asks the upstream what repo:ref is, without downloading it.
// Docker Hub does not count a HEAD against its pull limit.
func (c *Client) HeadManifest(ctx context.Context, repo, ref string, accept []string) (Descriptor, error) {
	resp, err := c.do(ctx, http.MethodHead, repo, "manifests/"+ref, acceptOrAll(accept))
	if err != nil {
		return Descriptor{}, err
	}
	resp.Body.Close()
	return descriptorOf(resp)
}

// GetManifest downloads repo:ref, at most MaxManifestSize bytes. The returned
// digest is computed from the bytes; if the upstream named a digest, it must
// match.
func (c *Client) GetManifest(ctx context.Context, repo, ref string, accept []string) (Descriptor, []byte, error) {
	resp, err := c.do(ctx, http.MethodGet, repo, "manifests/"+ref, acceptOrAll(accept))
	if err != nil {
		return Descriptor{}, nil, err
	}
	defer resp.Body.Close()
	desc, err := descriptorOf(resp)
	if err != nil {
		return Descriptor{}, nil, err
	}
	if desc.Size > MaxManifestSize {
		return Descriptor{}, nil, fmt.Errorf("%w: manifest of %d bytes (limit %d)", ErrTooLarge, desc.Size, MaxManifestSize)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return Descriptor{}, nil, classify(err)
	}
	if len(b) > MaxManifestSize {
		return Descriptor{}, nil, fmt.Errorf("%w: manifest over %d bytes", ErrTooLarge, MaxManifestSize)
	}
	alg := digest.Canonical
	if want, err := digest.Parse(ref); err == nil {
		alg = want.Algorithm()
	} else if desc.Digest != "" {
		alg = desc.Digest.Algorithm()
	}
	if !alg.Available() {
		return Descriptor{}, nil, fmt.Errorf("%w: digest algorithm %q", ErrBadResponse, alg)
	}
	got := alg.FromBytes(b)
	if desc.Digest != "" && desc.Digest != got {
		return Descriptor{}, nil, fmt.Errorf("%w: manifest digest %s, upstream said %s", ErrBadResponse, got, desc.Digest)
	}
	if want, err := digest.Parse(ref); err == nil && want != got {
		return Descriptor{}, nil, fmt.Errorf("%w: manifest digest %s, asked for %s", ErrBadResponse, got, want)
	}
	desc.Digest, desc.Size = got, int64(len(b))
	if desc.MediaType == "" {
		if desc.MediaType, err = cache.MediaType(sniffMediaType(b)); err != nil {
			return Descriptor{}, nil, fmt.Errorf("%w: mediaType: %v", ErrBadResponse, err)
		}
	}
	return desc, b, nil
}

// HeadBlob asks whether repo has blob d, and its size.
func (c *Client) HeadBlob(ctx context.Context, repo string, d digest.Digest) (Descriptor, error) {
	resp, err := c.do(ctx, http.MethodHead, repo, "blobs/"+string(d), nil)
	if err != nil {
		return Descriptor{}, err
	}
	resp.Body.Close()
	// A blob's Content-Type says nothing slipway keeps.
	return Descriptor{Digest: d, Size: resp.ContentLength}, nil
}

// GetBlob starts downloading blob d of repo. The caller closes the body and
// verifies the bytes. size is -1 if the upstream sent no Content-Length.
func (c *Client) GetBlob(ctx context.Context, repo string, d digest.Digest) (body io.ReadCloser, size int64, err error) {
	resp, err := c.do(ctx, http.MethodGet, repo, "blobs/"+string(d), nil)
	if err != nil {
		return nil, 0, err
	}
	return resp.Body, resp.ContentLength, nil
}

// Bounds of a tag list read from an upstream: pages followed, tags kept,
// bytes of one page.
const (
	maxTagPages = 64
	maxTags     = 100_000
	maxTagPage  = 4 << 20
)

// Tags lists all of repo's tags on the upstream, following its Link
// headers page by page (at most maxTagPages pages and maxTags tags).
func (c *Client) Tags(ctx context.Context, repo string) ([]string, error) {
	tags := []string{}
	path := "tags/list"
	for page := 0; page < maxTagPages && len(tags) < maxTags; page++ {
		resp, err := c.do(ctx, http.MethodGet, repo, path, nil)
		if err != nil {
			return nil, err
		}
		var list struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(io.LimitReader(resp.Body, maxTagPage)).Decode(&list)
		next := nextPage(resp, repo)
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("%w: tags list: %v", ErrBadResponse, err)
		}
		tags = append(tags, list.Tags...)
		if next == "" {
			break
		}
		path = next
	}
	if len(tags) > maxTags {
		tags = tags[:maxTags]
	}
	return tags, nil
}

// nextPage is the path after /v2/<repo>/ of the page a Link header names
// (rel="next"), or "" if there is none or it leaves the repository's tag
// list.
func nextPage(resp *http.Response, repo string) string {
	for _, link := range resp.Header.Values("Link") {
		for _, part := range strings.Split(link, ",") {
			target, params, ok := strings.Cut(strings.TrimSpace(part), ";")
			if !ok || !strings.Contains(strings.ReplaceAll(params, " ", ""), `rel="next"`) {
				continue
			}
			u, err := url.Parse(strings.Trim(strings.TrimSpace(target), "<>"))
			if err != nil || (u.Host != "" && u.Host != resp.Request.URL.Host) {
				return ""
			}
			rest, ok := strings.CutPrefix(u.Path, "/v2/"+repo+"/")
			if !ok || rest != "tags/list" {
				return ""
			}
			if u.RawQuery != "" {
				rest += "?" + u.RawQuery
			}
			return rest
		}
	}
	return ""
}

// Referrers asks the upstream's referrers API for the manifests that refer
// to subject in repo: the OCI index it answers, unfiltered. ok is false
// when the upstream has no referrers API (or no such repository): a 404,
// after which the referrers tag schema is the way to ask.
func (c *Client) Referrers(ctx context.Context, repo string, subject digest.Digest) (idx []byte, ok bool, err error) {
	resp, err := c.do(ctx, http.MethodGet, repo, "referrers/"+string(subject), []string{mediaTypeOCIIndex})
	if errors.Is(err, ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return nil, false, classify(err)
	}
	if len(b) > MaxManifestSize {
		return nil, false, fmt.Errorf("%w: referrers of %s over %d bytes", ErrTooLarge, subject, MaxManifestSize)
	}
	return b, true, nil
}

func acceptOrAll(accept []string) []string {
	if len(accept) == 0 {
		return ManifestTypes
	}
	return accept
}

// sniffMediaType reads mediaType from a manifest that came without a
// Content-Type.
func sniffMediaType(b []byte) string {
	var m struct {
		MediaType string `json:"mediaType"`
	}
	if json.Unmarshal(b, &m) == nil && m.MediaType != "" {
		return m.MediaType
	}
	return "application/vnd.oci.image.manifest.v1+json"
}

// RateLimitError says how long the upstream asked us to wait.
type RateLimitError struct {
	RetryAfter time.Duration
}

func (e *RateLimitError) Error() string {
	if e.RetryAfter > 0 {
		return fmt.Sprintf("upstream: rate limited, retry after %s", e.RetryAfter)
	}
	return "upstream: rate limited"
}
func (e *RateLimitError) Unwrap() error { return ErrRateLimited }

func statusError(resp *http.Response) error {
	switch code := resp.StatusCode; {
	case code == http.StatusNotFound:
		return fmt.Errorf("%w: %s", ErrNotFound, resp.Request.URL.Path)
	case code == http.StatusUnauthorized || code == http.StatusForbidden:
		return fmt.Errorf("%w: status %d", ErrUnauthorized, code)
	case code == http.StatusTooManyRequests:
		// The upstream's own Date is "now" for an HTTP-date, so a clock
		// skew between it and us does not stretch or cut the pause.
		now := time.Now()
		if d, err := http.ParseTime(resp.Header.Get("Date")); err == nil {
			now = d
		}
		d, _ := retryAfter(resp.Header.Get("Retry-After"), now)
		return &RateLimitError{RetryAfter: d}
	case code >= 500:
		return fmt.Errorf("%w: status %d", ErrUnavailable, code)
	default:
		return fmt.Errorf("%w: status %d", ErrBadResponse, code)
	}
}

// classify turns a transport or network error into a sentinel.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ErrForbiddenHost) {
		return err
	}
	var te *transport.Error
	if errors.As(err, &te) {
		switch {
		case te.StatusCode == http.StatusNotFound:
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden:
			return fmt.Errorf("%w: %v", ErrUnauthorized, err)
		case te.StatusCode == http.StatusTooManyRequests:
			return fmt.Errorf("%w: %v", ErrRateLimited, err)
		case te.StatusCode >= 400 && te.StatusCode < 500:
			return fmt.Errorf("%w: %v", ErrBadResponse, err)
		}
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if errors.Is(err, context.Canceled) {
		return err
	}
	for _, s := range []error{ErrNotFound, ErrUnauthorized, ErrRateLimited, ErrUnavailable, ErrTooLarge, ErrBadResponse, ErrForbiddenHost} {
		if errors.Is(err, s) {
			return err
		}
	}
	return fmt.Errorf("%w: %v", ErrUnavailable, err)
}
