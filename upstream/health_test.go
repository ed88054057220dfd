package upstream

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// A scripted upstream: each manifest request gets the next answer.
type scripted struct {
	mu      sync.Mutex
	answers []func(w http.ResponseWriter)
}

func (s *scripted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v2/" {
		return
	}
	s.mu.Lock()
	next := s.answers[0]
	if len(s.answers) > 1 {
		s.answers = s.answers[1:]
	}
	s.mu.Unlock()
	next(w)
}

func TestHealthRecordsSuccessFailureAndBackoff(t *testing.T) {
	const hostile = `<script>window.pwned=1</script><img src=x onerror="alert(1)">`
	up := &scripted{answers: []func(http.ResponseWriter){
		func(w http.ResponseWriter) {
			w.Header().Set("ratelimit-remaining", "41;w=21600")
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			io.WriteString(w, "{}")
		},
		func(w http.ResponseWriter) { w.WriteHeader(http.StatusNotFound) },
		func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"errors":[{"code":"UNAVAILABLE","message":"`+strings.ReplaceAll(hostile, `"`, `\"`)+`"}]}`)
		},
		func(w http.ResponseWriter) {
			w.Header().Set("Retry-After", "120")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, "slow down\x00\x07 please\n\n  now")
		},
	}}
	srv := httptest.NewServer(up)
	defer srv.Close()
	clock := time.Unix(1_800_000_000, 0)
	c, err := New(Config{URL: srv.URL, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	c.health.now = func() time.Time { return clock }
	ctx := context.Background()

	h := c.Health()
	if !h.LastSuccess.IsZero() || !h.LastError.IsZero() || h.Failing() || h.RateLimitRemaining != -1 || h.Requests != 0 {
		t.Fatalf("a new client: %+v", h)
	}

	if _, _, err := c.GetManifest(ctx, "a/b", "v1", nil); err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(time.Second)
	if _, _, err := c.GetManifest(ctx, "a/b", "gone", nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("404: %v", err)
	}
	h = c.Health()
	if !h.LastSuccess.Equal(clock) || h.Failing() || h.RateLimitRemaining != 41 || h.Requests != 2 {
		t.Fatalf("after a 200 and a 404 (an answer, not a failure): %+v", h)
	}

	clock = clock.Add(time.Second)
	if _, _, err := c.GetManifest(ctx, "a/b", "v1", nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("503: %v", err)
	}
	h = c.Health()
	if !h.Failing() || !h.LastError.Equal(clock) || h.Backoff(clock) {
		t.Fatalf("after a 503: %+v", h)
	}
	// The upstream's words are kept as they were (escaping is for whoever
	// shows them), after the status.
	if !strings.Contains(h.LastErrorText, "503") || !strings.Contains(h.LastErrorText, "UNAVAILABLE "+hostile) {
		t.Errorf("last error text %q: want the status and the upstream's message", h.LastErrorText)
	}

	clock = clock.Add(time.Second)
	if _, _, err := c.GetManifest(ctx, "a/b", "v1", nil); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("429: %v", err)
	}
	h = c.Health()
	now := time.Now()
	if !h.Backoff(now) || h.BackoffUntil.Sub(now) > 2*time.Minute+time.Second || !h.Last429.Equal(clock) {
		t.Fatalf("after a 429 with Retry-After 120: %+v", h)
	}
	if want := "slow down please now"; !strings.HasSuffix(h.LastErrorText, want) {
		t.Errorf("last error text %q: want control characters and runs of space gone, ending %q", h.LastErrorText, want)
	}
	if h.Responses["429"] != 1 || h.Responses["503"] != 1 || h.Requests != 4 {
		t.Errorf("responses %v, requests %d", h.Responses, h.Requests)
	}

	// While backing off nothing is sent, and nothing new is recorded.
	c.GetManifest(ctx, "a/b", "v1", nil)
	if h2 := c.Health(); h2.Requests != 4 || !h2.LastError.Equal(h.LastError) {
		t.Errorf("a request held back by the backoff changed the record: %+v", h2)
	}
}

func TestHealthOfAnUpstreamThatIsGone(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	c, _ := New(Config{URL: url, Retries: -1})
	if _, err := c.HeadManifest(context.Background(), "a/b", "v1", nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("a closed port: %v", err)
	}
	h := c.Health()
	if !h.Failing() || !strings.Contains(h.LastErrorText, "refused") {
		t.Errorf("a closed port: %+v", h)
	}

	// A request its caller canceled says nothing about the upstream.
	c2, _ := New(Config{URL: url, Retries: -1})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c2.HeadManifest(ctx, "a/b", "v1", nil)
	if h := c2.Health(); h.Failing() {
		t.Errorf("a canceled request counted as a failure: %+v", h)
	}
}

func TestUpstreamMessageIsBoundedAndClean(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`{"errors":[{"code":"DENIED","message":"no"},{"code":"X","message":"y"}]}`, "DENIED no; X y"},
		{"plain\r\ntext\t\tbody", "plain text body"},
		{"bad \xff\xfe utf8", "bad \uFFFD utf8"},
		{"", ""},
	} {
		if got := upstreamMessage([]byte(tc.body)); got != tc.want {
			t.Errorf("upstreamMessage(%q) = %q, want %q", tc.body, got, tc.want)
		}
	}
	long := upstreamMessage([]byte(strings.Repeat("é", 10_000)))
	if len(long) > maxMessage+len("…") || !utf8.ValidString(long) || !strings.HasSuffix(long, "…") {
		t.Errorf("a long body gave %d bytes (valid UTF-8: %v)", len(long), utf8.ValidString(long))
	}
}
