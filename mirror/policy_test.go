package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"slipway/upstream"
)

func mustRules(t *testing.T, dockerHub bool, ss ...string) []upstream.Rule {
	t.Helper()
	var out []upstream.Rule
	for _, s := range ss {
		r, err := upstream.ParseRule(s, dockerHub)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// The pull-through policy: a denied name, under every spelling and on
// every route, is 403 DENIED with no upstream request; allowed names work;
// tags a rule denies are neither served nor listed; content cached before
// a name was denied is not served once it is; and a metric counts it all.
func TestPullThroughPolicy(t *testing.T) {
	policy := &upstream.Policy{Deny: mustRules(t, true, "alpine", "nginx:*-alpine")}
	e := newProxyEnv(t, proxyEnvOptions{dockerHub: true, policy: policy})
	alpine := pushTags(t, e.up, "library/alpine", "3.20")
	ad, _ := alpine.Digest()
	am, _ := alpine.Manifest()
	nginx := pushTags(t, e.up, "library/nginx", "1.27", "1.27-alpine")
	nd, _ := nginx.Digest()
	pushTags(t, e.up, "library/busybox", "1")

	spellings := []string{"alpine", "library/alpine", "docker.io/library/alpine", "docker.io/alpine",
		"index.docker.io/library/alpine", "registry-1.docker.io/library/alpine", "alpine?ns=docker.io", "library/alpine?ns=registry-1.docker.io"}
	routes := []struct{ method, path string }{
		{"GET", "manifests/3.20"}, {"HEAD", "manifests/3.20"}, {"GET", "manifests/" + ad.String()},
		{"GET", "blobs/" + am.Layers[0].Digest.String()}, {"HEAD", "blobs/" + am.Config.Digest.String()},
		{"GET", "tags/list"}, {"GET", "referrers/" + ad.String()},
	}
	before := e.up.total()
	for _, sp := range spellings {
		name, query, _ := strings.Cut(sp, "?")
		if query != "" {
			query = "?" + query
		}
		for _, r := range routes {
			code := "DENIED"
			if r.method == "HEAD" {
				code = ""
			}
			expectError(t, r.method, e.url("/v2/"+name+"/"+r.path+query), nil, http.StatusForbidden, code)
		}
	}
	// A denied tag of an allowed repository.
	expectError(t, "GET", e.url("/v2/nginx/manifests/1.27-alpine"), nil, http.StatusForbidden, "DENIED")
	if n := e.up.total() - before; n != 0 {
		t.Errorf("denied requests made %d upstream requests", n)
	}
	// Prefetch of denied images fails per image, and reaches nothing.
	code, results := postPrefetchReq(t, e.url("/v2/_slipway/prefetch"), PrefetchRequest{Images: []string{"alpine:3.20", "docker.io/library/nginx:1.27-alpine"}})
	if code != http.StatusBadGateway || len(results) != 2 || !strings.Contains(results[0].Error, "policy") || !strings.Contains(results[1].Error, "policy") {
		t.Errorf("prefetch of denied images: %d %+v", code, results)
	}
	if n := e.up.total() - before; n != 0 {
		t.Errorf("denied prefetches made %d upstream requests", n)
	}
	// Allowed: another tag of nginx, nginx by digest, busybox.
	for _, p := range []string{"/v2/nginx/manifests/1.27", "/v2/library/nginx/manifests/" + nd.String(), "/v2/busybox/manifests/1"} {
		if resp := do(t, "GET", e.url(p), nil); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %d", p, resp.StatusCode)
		}
	}
	if _, tl := getTagList(t, e.url("/v2/nginx/tags/list")); !slices.Equal(tl.Tags, []string{"1.27"}) {
		t.Errorf("nginx's tags: %v, want the allowed one only", tl.Tags)
	}
	// busybox is cached; now the policy denies it.
	policy.Deny = append(policy.Deny, mustRules(t, true, "busybox")...)
	before = e.up.total()
	expectError(t, "GET", e.url("/v2/busybox/manifests/1"), nil, http.StatusForbidden, "DENIED")
	if n := e.up.total() - before; n != 0 {
		t.Errorf("%d upstream requests", n)
	}
	m := scrape(t, e.url("/metrics"))
	if got := m[`slipway_policy_denied_total{upstream="`+e.up.host+`"}`]; got < float64(len(spellings)*len(routes)+4) {
		t.Errorf("slipway_policy_denied_total = %v", got)
	}
	if !strings.Contains(e.log.String(), "pull-through policy") {
		t.Error("no log line names the policy")
	}
}

// Deny by default: only what a rule allows.
func TestPullThroughPolicyDenyByDefault(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{policy: &upstream.Policy{DenyByDefault: true, Allow: mustRules(t, false, "team/**", "lib/app:v*")}})
	pushTags(t, e.up, "team/a/b", "x")
	pushTags(t, e.up, "lib/app", "v1", "latest")
	pushTags(t, e.up, "lib/other", "v1")
	for path, want := range map[string]int{
		"/v2/team/a/b/manifests/x":     200,
		"/v2/lib/app/manifests/v1":     200,
		"/v2/lib/app/manifests/latest": 403,
		"/v2/lib/other/manifests/v1":   403,
		"/v2/lib/other/tags/list":      403,
	} {
		if resp := do(t, "GET", e.url(path), nil); resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	if _, tl := getTagList(t, e.url("/v2/lib/app/tags/list")); !slices.Equal(tl.Tags, []string{"v1"}) {
		t.Errorf("lib/app tags: %v", tl.Tags)
	}
}

// Manifest, tag and referrer requests never wait behind blob downloads:
// with every blob slot held by a download that does not end, a manifest of
// an uncached tag still comes within a second.
func TestManifestsDoNotWaitBehindBlobDownloads(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{maxConcurrent: 4})
	release := make(chan struct{})
	var holding atomic.Int32
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != "GET" || !strings.Contains(r.URL.Path, "/blobs/") {
			return false
		}
		holding.Add(1)
		w.WriteHeader(http.StatusOK)
		w.Write([]byte("x"))
		w.(http.Flusher).Flush()
		<-release
		return true
	})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(release) // before the wait: the downloads end
	for i := range 6 {   // more downloads than slots
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(e.url(fmt.Sprintf("/v2/lib/big/blobs/sha256:%064x", i+1)))
			if err == nil {
				resp.Body.Close()
			}
		}()
	}
	waitFor(t, "downloads holding every blob slot", func() bool { return holding.Load() >= 3 })
	pushTags(t, e.up, "lib/app", "v1")
	start := time.Now()
	resp := do(t, "GET", e.url("/v2/lib/app/manifests/v1"), nil)
	if resp.StatusCode != http.StatusOK || time.Since(start) > time.Second {
		t.Fatalf("manifest behind blob downloads: %d after %s", resp.StatusCode, time.Since(start))
	}
	if resp, _ := getTagList(t, e.url("/v2/lib/app/tags/list")); resp.StatusCode != http.StatusOK {
		t.Errorf("tag list behind blob downloads: %d", resp.StatusCode)
	}
}

// The request log line says where a request went: the query (containerd's
// ?ns=), the upstream it was routed to (or local) and the repository as
// resolved.
func TestRequestLogNamesUpstreamAndRepository(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{})
	pushTags(t, e.up, "lib/app", "v1")
	do(t, "GET", e.url("/v2/lib/app/manifests/v1?ns="+e.up.host), nil)
	var line string
	for _, l := range strings.Split(e.log.String(), "\n") {
		if strings.Contains(l, "msg=request") && strings.Contains(l, "/manifests/v1") {
			line = l
		}
	}
	for _, want := range []string{`query="ns=` + e.up.host + `"`, "upstream=" + e.up.host, "repo=lib/app"} {
		if !strings.Contains(line, want) {
			t.Errorf("log line %q lacks %q", line, want)
		}
	}
}

// Made-up methods are one label value: they cannot make series without end.
func TestMetricLabelsAreBounded(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{})
	for i := range 300 {
		req, _ := http.NewRequest(fmt.Sprintf("M%dX", rand.IntN(1<<30)+i), e.url("/v2/lib/app/manifests/v1"), nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}
	series := 0
	for k := range scrape(t, e.url("/metrics")) {
		if strings.HasPrefix(k, "slipway_http_requests_total{") {
			series++
			if !strings.Contains(k, `method="other"`) && !strings.Contains(k, `method="GET"`) {
				t.Errorf("series %s", k)
			}
		}
	}
	if series > 5 {
		t.Errorf("%d request series after 300 made-up methods", series)
	}
}

// One prefetch call has a bounded body, a bounded image count and a
// bounded number of goroutines working on it.
func TestPrefetchIsBounded(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{})
	var images []string
	for i := range maxPrefetchImages + 1 {
		images = append(images, fmt.Sprintf("lib/app%d:v1", i))
	}
	code, _ := postPrefetchReq(t, e.url("/v2/_slipway/prefetch"), PrefetchRequest{Images: images})
	if code != http.StatusBadRequest {
		t.Errorf("%d images: %d, want 400", len(images), code)
	}
	big := bytes.Repeat([]byte(" "), 2<<20)
	if resp := send(t, "POST", e.url("/v2/_slipway/prefetch"), append(big, `{"images":["a:1"]}`...), nil); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("a 2 MiB body: %d, want 400", resp.StatusCode)
	}
	// 200 images whose manifests the upstream holds: at most a few
	// goroutines work at once.
	release := make(chan struct{})
	var inFlight, most atomic.Int32
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		<-release
		w.WriteHeader(http.StatusNotFound)
		return true
	})
	base := runtime.NumGoroutine()
	done := make(chan struct{})
	go func() {
		defer close(done)
		b, _ := json.Marshal(PrefetchRequest{Images: images[:200]})
		sendErr("POST", e.url("/v2/_slipway/prefetch"), b, nil)
	}()
	waitFor(t, "prefetch at work", func() bool { return inFlight.Load() > 0 })
	time.Sleep(50 * time.Millisecond)
	if g := runtime.NumGoroutine() - base; g > 60 {
		t.Errorf("a prefetch of 200 images runs %d more goroutines", g)
	}
	close(release)
	<-done
	if m := most.Load(); m > prefetchWorkers {
		t.Errorf("%d upstream requests of one prefetch at once, want at most %d", m, prefetchWorkers)
	}
}
