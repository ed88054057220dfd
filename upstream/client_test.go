package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"
)

// tokenRegistry is an in-process registry behind Docker-style bearer-token
// auth, with the token endpoint on the same host.
type tokenRegistry struct {
	*httptest.Server
	host      string
	tokens    atomic.Int32 // token requests
	withCreds atomic.Int32 // token requests that carried basic credentials
	user      string       // if set, the token endpoint requires this user
	pass      string
}

func newTokenRegistry(t *testing.T) *tokenRegistry {
	t.Helper()
	tr := &tokenRegistry{}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	tr.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			tr.tokens.Add(1)
			u, p, ok := r.BasicAuth()
			if ok {
				tr.withCreds.Add(1)
			}
			if tr.user != "" && (u != tr.user || p != tr.pass) {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			fmt.Fprintf(w, `{"token":"tok-%s","expires_in":300}`, r.URL.Query().Get("scope"))
			return
		}
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer tok-") {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="test"`, tr.URL))
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(tr.Close)
	tr.host = strings.TrimPrefix(tr.URL, "http://")
	return tr
}

func TestTokenReusedPerRepository(t *testing.T) {
	tr := newTokenRegistry(t)
	img, _ := random.Image(1024, 1)
	if err := crane.Push(img, tr.host+"/team/app:v1", crane.WithAuth(authn.Anonymous)); err != nil {
		t.Fatal(err)
	}
	pushTokens := tr.tokens.Load()

	c, err := New(Config{URL: tr.URL})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := 0; i < 10; i++ {
		if _, _, err := c.GetManifest(ctx, "team/app", "v1", nil); err != nil {
			t.Fatal(err)
		}
		if _, err := c.HeadManifest(ctx, "team/app", "v1", nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := tr.tokens.Load() - pushTokens; n != 1 {
		t.Errorf("20 requests to one repository fetched %d tokens, want 1", n)
	}
	if _, _, err := c.GetManifest(ctx, "team/other", "v1", nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing repository: %v, want ErrNotFound", err)
	}
	if n := tr.tokens.Load() - pushTokens; n != 2 {
		t.Errorf("a second repository: %d tokens in all, want 2 (one per scope)", n)
	}
}

func TestCredentialsAndWrongCredentials(t *testing.T) {
	tr := newTokenRegistry(t)
	tr.user, tr.pass = "ci", "secret"
	img, _ := random.Image(1024, 1)
	if err := crane.Push(img, tr.host+"/team/app:v1", crane.WithAuth(&authn.Basic{Username: "ci", Password: "secret"})); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	good, _ := New(Config{URL: tr.URL, Auth: &authn.Basic{Username: "ci", Password: "secret"}})
	if _, _, err := good.GetManifest(ctx, "team/app", "v1", nil); err != nil {
		t.Fatalf("right credentials: %v", err)
	}
	bad, _ := New(Config{URL: tr.URL, Auth: &authn.Basic{Username: "ci", Password: "wrong"}})
	_, _, err := bad.GetManifest(ctx, "team/app", "v1", nil)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("wrong credentials: %v, want ErrUnauthorized", err)
	}
	if strings.Contains(err.Error(), "wrong") {
		t.Errorf("the error shows the password: %v", err)
	}
}

func TestErrorsAreClassified(t *testing.T) {
	var status atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		if status.Load() == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "7")
		}
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	for _, tc := range []struct {
		status int
		want   error
	}{
		{404, ErrNotFound}, {401, ErrUnauthorized}, {403, ErrUnauthorized}, {429, ErrRateLimited},
		{500, ErrUnavailable}, {502, ErrUnavailable}, {503, ErrUnavailable}, {400, ErrBadResponse},
	} {
		status.Store(int32(tc.status))
		c, _ := New(Config{URL: srv.URL, Retries: -1}) // a 429 makes a client back off
		_, _, err := c.GetManifest(context.Background(), "team/app", "v1", nil)
		if !errors.Is(err, tc.want) {
			t.Errorf("status %d: %v, want %v", tc.status, err, tc.want)
		}
		if tc.status == 429 {
			var rl *RateLimitError
			if !errors.As(err, &rl) || rl.RetryAfter != 7*time.Second {
				t.Errorf("429: Retry-After not kept: %v", err)
			}
		}
	}
	c, _ := New(Config{URL: srv.URL})
	srv.Close()
	_, _, err := c.GetManifest(context.Background(), "team/app", "v1", nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("upstream down: %v, want ErrUnavailable", err)
	}
}

func TestManifestSizeCapAndDigestCheck(t *testing.T) {
	var body atomic.Value
	var header atomic.Value
	header.Store("")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		if h := header.Load().(string); h != "" {
			w.Header().Set("Docker-Content-Digest", h)
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		io.WriteString(w, body.Load().(string))
	}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL})
	ctx := context.Background()

	body.Store(strings.Repeat(" ", MaxManifestSize+1))
	if _, _, err := c.GetManifest(ctx, "a/b", "v1", nil); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversize manifest: %v, want ErrTooLarge", err)
	}
	body.Store(`{"schemaVersion":2}`)
	header.Store("sha256:" + strings.Repeat("0", 64))
	if _, _, err := c.GetManifest(ctx, "a/b", "v1", nil); !errors.Is(err, ErrBadResponse) {
		t.Errorf("manifest not matching the upstream's digest header: %v, want ErrBadResponse", err)
	}
	header.Store("")
	if _, _, err := c.GetManifest(ctx, "a/b", "sha256:"+strings.Repeat("1", 64), nil); !errors.Is(err, ErrBadResponse) {
		t.Errorf("manifest not matching the digest asked for: %v, want ErrBadResponse", err)
	}
	desc, b, err := c.GetManifest(ctx, "a/b", "v1", nil)
	if err != nil || string(b) != `{"schemaVersion":2}` || desc.Digest == "" || desc.Size != int64(len(b)) {
		t.Errorf("good manifest: %v %q %+v", err, b, desc)
	}
}

func TestTransportsAreBounded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL})
	var wg sync.WaitGroup
	for i := 0; i < maxTransports+50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.HeadBlob(context.Background(), fmt.Sprintf("r/%d", i), digest.Digest("sha256:"+strings.Repeat("a", 64)))
		}()
		if i%64 == 63 {
			wg.Wait()
		}
	}
	wg.Wait()
	c.mu.Lock()
	n := c.transports.Len()
	c.mu.Unlock()
	if n > maxTransports {
		t.Errorf("%d transports cached, limit %d", n, maxTransports)
	}
}

// Past the limit, the repositories in use keep their transport (and so
// their token); one not used since is the one that goes, one at a time.
func TestTransportsKeepTheOnesInUse(t *testing.T) {
	tr := newTokenRegistry(t)
	c, _ := New(Config{URL: tr.URL})
	ctx := context.Background()
	d := digest.Digest("sha256:" + strings.Repeat("a", 64))
	c.HeadBlob(ctx, "team/hot", d)
	c.HeadBlob(ctx, "team/cold", d)
	tokens := tr.tokens.Load()
	const flood = maxTransports + maxTransports/4
	for i := range flood {
		c.HeadBlob(ctx, fmt.Sprintf("flood/%d", i), d)
		if i%(maxTransports/4) == 0 {
			c.HeadBlob(ctx, "team/hot", d)
		}
	}
	after := tr.tokens.Load()
	if want := tokens + flood; after != want {
		t.Errorf("%d token requests for %d new repositories, want one each", after-tokens, flood)
	}
	c.HeadBlob(ctx, "team/hot", d)
	if n := tr.tokens.Load(); n != after {
		t.Errorf("team/hot, used all along, needed %d new tokens after the flood", n-after)
	}
	c.HeadBlob(ctx, "team/cold", d)
	if n := tr.tokens.Load(); n != after+1 {
		t.Errorf("team/cold, unused during the flood, needed %d new tokens, want 1 (its transport evicted)", n-after)
	}
	c.mu.Lock()
	n := c.transports.Len()
	c.mu.Unlock()
	if n != maxTransports {
		t.Errorf("%d transports held, want the limit %d", n, maxTransports)
	}
}

func TestInvalidURL(t *testing.T) {
	for _, u := range []string{"", "ftp://x", "registry.example.com", "http://"} {
		if _, err := New(Config{URL: u}); err == nil {
			t.Errorf("New(%q) accepted", u)
		}
	}
}

func TestRateLimitBacksOffTheUpstream(t *testing.T) {
	var reqs atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		reqs.Add(1)
		w.Header().Set("Retry-After", "60")
		w.WriteHeader(http.StatusTooManyRequests)
	}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL})
	ctx := context.Background()
	if _, err := c.HeadManifest(ctx, "a/b", "v1", nil); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("429: %v", err)
	}
	for i := 0; i < 5; i++ {
		_, err := c.HeadManifest(ctx, "a/b", "v1", nil)
		var rl *RateLimitError
		if !errors.As(err, &rl) || rl.RetryAfter <= 0 || rl.RetryAfter > time.Minute {
			t.Fatalf("while backing off: %v", err)
		}
	}
	if n := reqs.Load(); n != 1 {
		t.Errorf("the upstream got %d requests while it asked for a pause, want 1", n)
	}
}

func TestRetryAfterForms(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	date := func(d time.Duration) string { return now.Add(d).Format(http.TimeFormat) }
	for _, c := range []struct {
		v    string
		want time.Duration
		ok   bool
	}{
		{"7", 7 * time.Second, true},
		{" 120 ", 2 * time.Minute, true},
		{"0", 0, true},
		{"3600", maxBackoff, true},                    // capped
		{"99999999999999999999999", maxBackoff, true}, // past uint64, still capped
		{"10000000000", maxBackoff, true},             // would overflow a Duration
		{date(90 * time.Second), 90 * time.Second, true},
		{date(-time.Hour), 0, true}, // a past date: now
		{date(24 * time.Hour), maxBackoff, true},
		{now.Add(42 * time.Second).Format(time.RFC850), 42 * time.Second, true},
		{now.Add(5 * time.Second).Format(time.ANSIC), 5 * time.Second, true},
		{"", 0, false},
		{"-5", 0, false},
		{"+5", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"2026-11-25T12:01:00Z", 0, false}, // not an HTTP-date
	} {
		got, ok := retryAfter(c.v, now)
		if got != c.want || ok != c.ok {
			t.Errorf("retryAfter(%q) = %s, %v; want %s, %v", c.v, got, ok, c.want, c.ok)
		}
	}
	// A fraction of a second left rounds up, not down to "now".
	if got, _ := retryAfter(date(2*time.Second), now.Add(1500*time.Millisecond)); got != time.Second {
		t.Errorf("half a second before the date: %s, want 1s", got)
	}
}

// A 429 with an HTTP-date Retry-After pauses the upstream until that date,
// counted from the upstream's own Date header (its clock, not ours).
func TestRateLimitHTTPDate(t *testing.T) {
	var reqs atomic.Int32
	var retryAt atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		reqs.Add(1)
		// The upstream's clock runs an hour ahead of ours.
		upNow := time.Now().Add(time.Hour)
		w.Header().Set("Date", upNow.UTC().Format(http.TimeFormat))
		w.Header().Set("Retry-After", upNow.Add(retryAt.Load().(time.Duration)).UTC().Format(http.TimeFormat))
		w.WriteHeader(http.StatusTooManyRequests)
	}))
	defer srv.Close()
	for _, c := range []struct {
		after    time.Duration
		min, max time.Duration
	}{
		{45 * time.Second, 44 * time.Second, 46 * time.Second},
		{-10 * time.Minute, 0, 0}, // a past date: now
		{3 * time.Hour, maxBackoff, maxBackoff},
	} {
		retryAt.Store(c.after)
		cl, _ := New(Config{URL: srv.URL, Retries: -1})
		_, err := cl.HeadManifest(context.Background(), "a/b", "v1", nil)
		var rl *RateLimitError
		if !errors.As(err, &rl) || rl.RetryAfter < c.min || rl.RetryAfter > c.max {
			t.Fatalf("Retry-After in %s: %v, want a wait in [%s, %s]", c.after, err, c.min, c.max)
		}
		// The client holds off: the next request is refused here, with
		// the time left (at least the 10 s default after "now").
		n := reqs.Load()
		_, err = cl.HeadManifest(context.Background(), "a/b", "v1", nil)
		if !errors.As(err, &rl) || rl.RetryAfter < min(max(c.min, defaultBackoff), maxBackoff)-2*time.Second {
			t.Errorf("Retry-After in %s: while backing off: %v", c.after, err)
		}
		if reqs.Load() != n {
			t.Errorf("Retry-After in %s: the upstream was asked again while it asked for a pause", c.after)
		}
	}
}

func TestRetriesTransientFailures(t *testing.T) {
	var reqs atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		if reqs.Add(1) <= 2 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Docker-Content-Digest", "sha256:"+strings.Repeat("a", 64))
	}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL})
	if _, err := c.HeadManifest(context.Background(), "a/b", "v1", nil); err != nil {
		t.Fatalf("after two 503s: %v", err)
	}
	if n := reqs.Load(); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
	reqs.Store(-100) // always failing now
	c2, _ := New(Config{URL: srv.URL, Retries: -1})
	reqs.Store(0)
	c2.HeadManifest(context.Background(), "a/b", "v1", nil)
	if n := reqs.Load(); n != 1 {
		t.Errorf("Retries -1 sent %d requests, want 1", n)
	}
}

func TestMaxConcurrentCapsUpstreamRequests(t *testing.T) {
	release := make(chan struct{})
	var inFlight, peak atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		w.Header().Set("Content-Length", "1")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "x")
	}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL, MaxConcurrent: 2})
	d := digestOf("x")
	var bodies []io.ReadCloser
	for i := 0; i < 2; i++ {
		b, _, err := c.GetBlob(context.Background(), "a/b", d)
		if err != nil {
			t.Fatal(err)
		}
		bodies = append(bodies, b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, _, err := c.GetBlob(ctx, "a/b", d); !errors.Is(err, ErrUnavailable) {
		t.Errorf("a third request with two bodies open: %v, want to wait and give up", err)
	}
	close(release)
	for _, b := range bodies {
		io.ReadAll(b)
		b.Close()
	}
	b, _, err := c.GetBlob(context.Background(), "a/b", d)
	if err != nil {
		t.Fatalf("after the bodies were closed: %v", err)
	}
	b.Close()
	if p := peak.Load(); p > 2 {
		t.Errorf("peak of %d concurrent upstream requests, cap 2", p)
	}
}

func TestDockerHubRateLimitRemainingRecorded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ratelimit-limit", "100;w=21600")
		w.Header().Set("ratelimit-remaining", "76;w=21600")
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		io.WriteString(w, "{}")
	}))
	defer srv.Close()
	c, _ := New(Config{URL: srv.URL})
	if c.RateLimitRemaining() != -1 || c.RateLimit() != -1 {
		t.Error("unknown remaining and limit should be -1")
	}
	if _, _, err := c.GetManifest(context.Background(), "a/b", "v1", nil); err != nil {
		t.Fatal(err)
	}
	if n := c.RateLimitRemaining(); n != 76 {
		t.Errorf("remaining %d, want 76", n)
	}
	if n := c.RateLimit(); n != 100 {
		t.Errorf("limit %d, want 100", n)
	}
}

func digestOf(s string) digest.Digest { return digest.FromString(s) }
