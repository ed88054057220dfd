package mirror

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// opsEnv is a mirror with push, on loopback, in front of a fakeUpstream,
// with the Server at hand and its Config open to the test.
type opsEnv struct {
	up    *fakeUpstream
	store *cache.Store
	fills *upstream.Filler
	clock *fakeClock
	s     *Server
	srv   *httptest.Server
	host  string
}

func newOpsEnv(t *testing.T, tweak func(*Config)) *opsEnv {
	t.Helper()
	e := &opsEnv{up: newFakeUpstream(t), clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}}
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("SLIPWAY_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	st, err := cache.Open(t.TempDir(), cache.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: e.up.URL, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	e.fills = upstream.NewFiller(st, upstream.FillerOptions{Logger: log, IdleTimeout: 20 * time.Second})
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{Logger: log, TagTTL: testTagTTL, Now: e.clock.Now})
	pm, err := push.New(push.Config{Store: st, Logger: log, Prefixes: []string{"ci", "team"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Store: st, Upstreams: []Upstream{{Proxy: p, Names: []string{"up"}}}, Logger: log, Push: pm, Fills: e.fills}
	if tweak != nil {
		tweak(&cfg)
	}
	e.s, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(e.s.Handler())
	e.host = strings.TrimPrefix(e.srv.URL, "http://")
	t.Cleanup(func() {
		e.srv.Close()
		e.fills.Close()
		pm.Close()
		st.Close()
	})
	return e
}

func (e *opsEnv) url(path string) string { return e.srv.URL + path }

// scrape reads /metrics into "name{labels}" -> value, labels as Prometheus
// writes them (sorted by name).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func getBody(t *testing.T, url string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// Metrics move as they should after a miss, a hit, a joined fill and a
// stale serve; the X-Slipway-Cache header says the same to the client.
func TestMetricsAfterMissHitJoinedStale(t *testing.T) {
	e := newOpsEnv(t, nil)
	b := randomBytes(t, 256<<10)
	d := e.up.pushBlobTo(t, "team/app", b)
	blobURL := e.url("/v2/up/team/app/blobs/" + string(d))
	size := float64(len(b))

	resp, _ := getBody(t, blobURL)
	if got := resp.Header.Get("X-Slipway-Cache"); got != "miss" {
		t.Errorf("first GET: X-Slipway-Cache %q, want miss", got)
	}
	// The client has every byte just before the fill commits and leaves.
	waitFor(t, "the fill to end", func() bool { return e.fills.InFlight() == 0 })
	resp, _ = getBody(t, blobURL)
	if got := resp.Header.Get("X-Slipway-Cache"); got != "hit" {
		t.Errorf("second GET: X-Slipway-Cache %q, want hit", got)
	}
	m := scrape(t, e.url("/metrics"))
	for k, want := range map[string]float64{
		`slipway_cache_results_total{kind="blob",result="miss"}`:                     1,
		`slipway_cache_results_total{kind="blob",result="hit"}`:                      1,
		`slipway_served_bytes_total{source="upstream"}`:                              size,
		`slipway_served_bytes_total{source="cache"}`:                                 size,
		`slipway_http_requests_total{method="GET",route="blob",status="200"}`:        2,
		`slipway_fills_in_flight`:                                                    0,
		`slipway_upstream_requests_total{status="200",upstream="` + e.up.host + `"}`: 1,
	} {
		if m[k] != want {
			t.Errorf("%s = %v, want %v", k, m[k], want)
		}
	}

	// A joined fill: the upstream holds the second half until released.
	b2 := randomBytes(t, 256<<10)
	d2 := e.up.pushBlobTo(t, "team/app", b2)
	release := make(chan struct{})
	e.up.setHook(holdHook(d2, b2, release))
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	get := func() {
		defer wg.Done()
		errs <- getAndVerify(e.url("/v2/up/team/app/blobs/"+string(d2)), d2, int64(len(b2)), nil)
	}
	wg.Add(1)
	go get()
	waitFor(t, "a fill in flight", func() bool { return e.fills.InFlight() == 1 })
	if v := scrape(t, e.url("/metrics"))["slipway_fills_in_flight"]; v != 1 {
		t.Errorf("slipway_fills_in_flight = %v during the fill, want 1", v)
	}
	wg.Add(1)
	go get()
	waitFor(t, "the second client to join", func() bool {
		return scrape(t, e.url("/metrics"))["slipway_fill_joins_total"] == 1
	})
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}

	// A stale serve: the tag is past its window and the upstream says 429.
	img, _ := random.Image(1024, 1)
	e.up.pushImageTo(t, img, "team/app:v1")
	getBody(t, e.url("/v2/up/team/app/manifests/v1"))
	e.clock.Advance(2 * testTagTTL)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	resp, _ = getBody(t, e.url("/v2/up/team/app/manifests/v1"))
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Slipway-Cache") != "stale" {
		t.Errorf("stale GET: %s, X-Slipway-Cache %q; want 200 stale", resp.Status, resp.Header.Get("X-Slipway-Cache"))
	}
	m = scrape(t, e.url("/metrics"))
	for k, want := range map[string]float64{
		`slipway_cache_results_total{kind="blob",result="miss"}`:                     2,
		`slipway_cache_results_total{kind="blob",result="joined"}`:                   1,
		`slipway_cache_results_total{kind="manifest",result="miss"}`:                 1,
		`slipway_cache_results_total{kind="manifest",result="stale"}`:                1,
		`slipway_served_bytes_total{source="upstream"}`:                              size + 2*float64(len(b2)) + float64(mustManifestSize(t, img)),
		`slipway_fills_in_flight`:                                                    0,
		`slipway_upstream_requests_total{status="429",upstream="` + e.up.host + `"}`: 1,
	} {
		if m[k] != want {
			t.Errorf("%s = %v, want %v", k, m[k], want)
		}
	}
}

// pushImageTo puts img at the fake upstream under repo:tag.
func (u *fakeUpstream) pushImageTo(t *testing.T, img v1.Image, ref string) {
	t.Helper()
	if err := crane.Push(img, u.host+"/"+ref); err != nil {
		t.Fatal(err)
	}
}

func mustManifestSize(t *testing.T, img v1.Image) int {
	b, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	return len(b)
}

// /healthz answers while the process runs; /readyz turns 503 once the
// server drains for shutdown.
func TestHealthAndReadiness(t *testing.T) {
	e := newOpsEnv(t, nil)
	for _, p := range []string{"/healthz", "/readyz"} {
		if resp, body := getBody(t, e.url(p)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s %s", p, resp.Status, body)
		}
	}
	e.s.Drain()
	if resp, body := getBody(t, e.url("/readyz")); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "shutting down") {
		t.Errorf("GET /readyz while draining: %s %q, want 503 shutting down", resp.Status, body)
	}
	if resp, _ := getBody(t, e.url("/healthz")); resp.StatusCode != http.StatusOK {
		t.Errorf("GET /healthz while draining: %s, want 200", resp.Status)
	}
}

// A read-only data directory makes the server not ready.
func TestReadinessNeedsWritableDataDir(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root can write to a read-only directory")
	}
	e := newOpsEnv(t, nil)
	os.Chmod(e.store.Dir(), 0o500)
	defer os.Chmod(e.store.Dir(), 0o700)
	if resp, body := getBody(t, e.url("/readyz")); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("GET /readyz with a read-only data dir: %s %q, want 503", resp.Status, body)
	}
}

// Many clients at once, on answers of several kinds (hits, 404s, HEADs,
// the base route): every request is counted once in its own series, its
// latency too, and bytes only for what had a body.
func TestMetricsCountConcurrentRequestsOnce(t *testing.T) {
	e := newOpsEnv(t, nil)
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	e.up.pushImageTo(t, img, "team/app:v1")
	manURL := e.url("/v2/up/team/app/manifests/v1")
	resp, body := getBody(t, manURL) // the miss, before the counting starts
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("first pull: %s", resp.Status)
	}
	before := scrape(t, e.url("/metrics"))
	const clients, each = 8, 25
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				for _, r := range []struct{ method, url string }{
					{http.MethodGet, manURL}, {http.MethodHead, manURL},
					{http.MethodGet, e.url("/v2/up/team/app/manifests/nope")}, {http.MethodGet, e.url("/v2/")},
				} {
					req, _ := http.NewRequest(r.method, r.url, nil)
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}()
	}
	wg.Wait()
	after := scrape(t, e.url("/metrics"))
	n := float64(clients * each)
	for k, want := range map[string]float64{
		`slipway_http_requests_total{method="GET",route="manifest",status="200"}`:                 n,
		`slipway_http_requests_total{method="HEAD",route="manifest",status="200"}`:                n,
		`slipway_http_requests_total{method="GET",route="manifest",status="404"}`:                 n,
		`slipway_http_requests_total{method="GET",route="base",status="200"}`:                     n,
		`slipway_cache_results_total{kind="manifest",result="hit"}`:                               2 * n,
		`slipway_served_bytes_total{source="cache"}`:                                              n * float64(len(body)),
		`slipway_http_request_duration_seconds_count{cache="hit",method="GET",route="manifest"}`:  n,
		`slipway_http_request_duration_seconds_count{cache="hit",method="HEAD",route="manifest"}`: n,
		`slipway_http_request_duration_seconds_count{cache="none",method="GET",route="base"}`:     n,
	} {
		if got := after[k] - before[k]; got != want {
			t.Errorf("%s moved by %v, want %v", k, got, want)
		}
	}
}

// A request's log line holds what it always held, in the same order: the
// request, its route and answer, where its name went, how the cache
// answered, and the error.
func TestRequestLogLine(t *testing.T) {
	var out syncBuffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		switch a.Key {
		case slog.TimeKey:
			return slog.Attr{}
		case "dur":
			return slog.String("dur", "D")
		}
		return a
	}}))
	e := newOpsEnv(t, func(c *Config) { c.Logger = log })
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	e.up.pushImageTo(t, img, "team/app:v1")
	get := func(path, id string) int64 {
		req, _ := http.NewRequest(http.MethodGet, e.url(path), nil)
		req.Header.Set("X-Request-ID", id)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if got := resp.Header.Get("X-Request-Id"); got != id {
			t.Errorf("X-Request-Id %q, want %q", got, id)
		}
		return n
	}
	n := get("/v2/up/team/app/manifests/v1?x=1", "id-1")
	get("/v2/up/team/app/manifests/v1", "id-2")
	get("/v2/up/team/app/manifests/Bad!", "id-3")
	get("/v2/", "id-4")
	host := e.up.host
	want := []string{
		fmt.Sprintf(`level=INFO msg=request request_id=id-1 method=GET path=/v2/up/team/app/manifests/v1 query="x=1" route=manifest status=200 bytes=%d dur=D upstream=%s repo=team/app cache=miss`, n, host),
		fmt.Sprintf(`level=INFO msg=request request_id=id-2 method=GET path=/v2/up/team/app/manifests/v1 route=manifest status=200 bytes=%d dur=D upstream=%s repo=team/app cache=hit`, n, host),
		`level=INFO msg=request request_id=id-3 method=GET path=/v2/up/team/app/manifests/Bad! route=unknown status=400 bytes=`,
		`level=INFO msg=request request_id=id-4 method=GET path=/v2/ route=base status=200 bytes=2 dur=D`,
	}
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if strings.Contains(l, "msg=request") {
			got = append(got, l)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d request lines, want %d:\n%s", len(got), len(want), out.String())
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("line %d:\n got %s\nwant %s", i, got[i], want[i])
		}
	}
	if !strings.Contains(got[2], " dur=D err=") {
		t.Errorf("the refused request's line has no error after its duration: %s", got[2])
	}
}
