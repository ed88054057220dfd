package main

// The status page in a real browser: headless Chromium from Debian's
// chromium package (.ci/run installs it), driven through chromedp, against
// the slipway binary. axe-core (which .ci/run installs with npm) checks the
// page's accessibility. Screenshots go to $SLIPWAY_ARTIFACTS (else a
// temporary directory the test names).

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"golang.org/x/crypto/bcrypt"
)

// axeVersion is the axe-core .ci/run installs; keep the two in step.
const axeVersion = "4.14.1"

// needTool returns path if it exists; otherwise the test is skipped, or
// fails in CI, where .ci/run installs it.
func needTool(t *testing.T, what, path, install string) string {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if os.Getenv("CI") == "" {
		t.Skipf("%s is not at %s (%s)", what, path, install)
	}
	t.Fatalf("%s is not at %s; .ci/run installs it (%s)", what, path, install)
	return ""
}

// chromiumPath is Debian's Chromium, or $SLIPWAY_CHROMIUM.
func chromiumPath(t *testing.T) string {
	p := os.Getenv("SLIPWAY_CHROMIUM")
	if p == "" {
		p = "/usr/bin/chromium"
	}
	return needTool(t, "Chromium", p, "apt-get install chromium")
}

// axePath is axe-core's axe.min.js: $SLIPWAY_AXE_CORE, else where .ci/run
// keeps it.
func axePath(t *testing.T) string {
	p := os.Getenv("SLIPWAY_AXE_CORE")
	if p == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		p = filepath.Join(cache, "slipway-tools", "axe-core-"+axeVersion, "node_modules", "axe-core", "axe.min.js")
	}
	return needTool(t, "axe-core", p, "npm install --prefix DIR axe-core@"+axeVersion)
}

// artifactsDir is where screenshots go: $SLIPWAY_ARTIFACTS/<test>, else a
// temporary directory that outlives the test (its path is logged).
func artifactsDir(t *testing.T) string {
	dir := os.Getenv("SLIPWAY_ARTIFACTS")
	if dir == "" {
		d, err := os.MkdirTemp("", "slipway-artifacts-")
		if err != nil {
			t.Fatal(err)
		}
		dir = d
	}
	dir = filepath.Join(dir, t.Name())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots in %s", dir)
	return dir
}

// browser starts headless Chromium with the flags this machine needs (no
// background networking: nothing but the page may reach out) and a fresh
// profile, and records every request the page makes.
type browser struct {
	ctx      context.Context
	shots    string // where screenshots go
	mu       sync.Mutex
	requests []string
}

func newBrowser(t *testing.T, shots string) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	b := &browser{shots: shots}
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithListener(func(ev any) {
		if r, ok := ev.(*network.EventRequestWillBeSent); ok {
			b.mu.Lock()
			b.requests = append(b.requests, r.Request.URL)
			b.mu.Unlock()
		}
	}))
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*time.Minute)
	t.Cleanup(func() {
		cancelTimeout()
		cancel() // closes the browser, then waits for its process
		cancelAlloc()
	})
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start Chromium: %v", err)
	}
	b.ctx = ctx
	return b
}

func (b *browser) do(t *testing.T, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(b.ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// eval runs expression in the page and decodes its result.
func eval[T any](t *testing.T, b *browser, expression string) T {
	t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[T](expression, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatalf("evaluate %.80q: %v", expression, err)
	}
	return v
}

// waitFor polls a JavaScript condition in the page (at most within).
func (b *browser) waitFor(t *testing.T, what, condition string, within time.Duration) {
	t.Helper()
	_, err := chromedp.Run(b.ctx, chromedp.Poll[bool](condition,
		chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(within)))
	if err != nil {
		shot := filepath.Join(b.shots, "failed.png")
		if png, serr := chromedp.Run(b.ctx, chromedp.FullScreenshot(100)); serr == nil {
			os.WriteFile(shot, png, 0o644)
		}
		html, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector("main").innerText`))
		t.Fatalf("waiting for %s: %v\nthe page (screenshot %s):\n%s", what, err, shot, html)
	}
}

// screenshot saves the whole page, at the viewport's width, as name.png.
func (b *browser) screenshot(t *testing.T, name string) {
	t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(b.shots, name+".png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkAccessibility runs axe-core on the page as it is and fails on any
// violation (of every impact, not only serious and critical ones).
func (b *browser) checkAccessibility(t *testing.T, axe []byte, when string) {
	t.Helper()
	if !eval[bool](t, b, `typeof axe === "object"`) {
		eval[chromedp.Void](t, b, string(axe))
	}
	type violation struct {
		ID, Impact, Help string
		Nodes            []string
	}
	out := eval[string](t, b, `axe.run(document, {resultTypes: ["violations"]}).then(r => JSON.stringify(
		r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
			nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ") + ": " + n.failureSummary)}))))`)
	var vs []violation
	if err := json.Unmarshal([]byte(out), &vs); err != nil {
		t.Fatalf("axe's answer %q: %v", out, err)
	}
	for _, v := range vs {
		t.Errorf("accessibility (axe-core %s), %s: %s (%s): %s", axeVersion, when, v.ID, v.Impact, v.Help)
		for _, n := range v.Nodes {
			t.Logf("    %s", n)
		}
	}
	if eval[int](t, b, `axe.getRules().length`) < 50 {
		t.Error("axe-core knows fewer than 50 rules: not the real thing?")
	}
}

// uiUpstream is a registry that reports Docker Hub's rate limit header and
// can hold one blob's download halfway.
type uiUpstream struct {
	srv  *httptest.Server
	host string

	mu      sync.Mutex
	hold    string
	release chan struct{}
}

func newUIUpstream(t *testing.T) *uiUpstream {
	u := &uiUpstream{}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ratelimit-limit", "100;w=21600")
		w.Header().Set("ratelimit-remaining", "97;w=21600")
		u.mu.Lock()
		hold, release := u.hold, u.release
		u.mu.Unlock()
		if hold == "" || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+hold) {
			reg.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		reg.ServeHTTP(rec, r)
		b := rec.Body.Bytes()
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(http.StatusOK)
		w.Write(b[:len(b)/2])
		w.(http.Flusher).Flush()
		select {
		case <-release:
			w.Write(b[len(b)/2:])
		case <-r.Context().Done():
		case <-time.After(time.Minute):
		}
	}))
	t.Cleanup(u.srv.Close)
	u.host = strings.TrimPrefix(u.srv.URL, "http://")
	return u
}

// hostileText is what the hostile upstream says when it fails: markup
// that would run if the page put it in as HTML.
const hostileText = `<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">`

// newHostileUpstream answers the ping, and 503 with hostileText for the
// rest.
func newHostileUpstream(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": "UNAVAILABLE", "message": hostileText}}})
	}))
	t.Cleanup(srv.Close)
	return srv
}

// The status page in Chromium: a prefetch from its form fills the
// repository list, a fill in flight shows its progress, a hostile
// upstream's error text is shown as text and runs nothing, an upstream that
// stops shows as failing with its stale answers counted; the page passes
// axe-core at desktop and phone widths, and the browser asks no host but
// slipway.
func TestStatusPageInChromium(t *testing.T) {
	axe, err := os.ReadFile(axePath(t))
	if err != nil {
		t.Fatal(err)
	}
	chromiumPath(t)
	shots := artifactsDir(t)
	began := time.Now()

	good := newUIUpstream(t)
	evil := newHostileUpstream(t)
	if err := crane.Push(mustImage(t, 4<<10, 2), good.host+"/team/app:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}
	big := mustImage(t, 2<<20, 1)
	if err := crane.Push(big, good.host+"/team/big:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}
	layers, _ := big.Layers()
	bigLayer, _ := layers[0].Digest()

	dir := t.TempDir()
	hash, _ := bcrypt.GenerateFromPassword([]byte("ops-pass"), bcrypt.MinCost)
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("ops:"+string(hash)+"\n"), 0o600)
	cfg := filepath.Join(dir, "slipway.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`htpasswd: %s
anonymous_pull: false
max_size: 1GiB
upstreams:
  - name: primary
    url: %s
    tag_ttl: 1s
  - name: flaky.example
    url: %s
`, htpasswd, good.srv.URL, evil.URL)), 0o644)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--data-dir", t.TempDir(), "--config", cfg)
	waitStatus(t, p, "http://"+addr+"/healthz", http.StatusOK)
	base := "http://" + addr
	get := func(path string) *http.Response {
		t.Helper()
		r, _ := http.NewRequest(http.MethodGet, base+path, nil)
		r.SetBasicAuth("ops", "ops-pass")
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	if code, _ := httpGet(t, base+"/"); code != http.StatusUnauthorized {
		t.Fatalf("the page without a login: %d, want 401", code)
	}

	b := newBrowser(t, shots)
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("ops:ops-pass"))
	if _, err := chromedp.Call(b.ctx, network.SetExtraHTTPHeaders,
		network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": auth}}); err != nil {
		t.Fatal(err)
	}
	b.do(t, "open the page", chromedp.EmulateViewport(1280, 900), chromedp.Navigate(base+"/"))
	if title := eval[string](t, b, `document.title`); title != "slipway status" {
		t.Fatalf("title %q", title)
	}
	b.waitFor(t, "the script to poll", `document.getElementById("live").textContent.includes("live")`, 30*time.Second)

	// A prefetch from the form: its progress, then the repository in the list.
	b.do(t, "fill the prefetch form",
		chromedp.SendKeys(chromedp.ID("pf-images"), "team/app:v1"),
		chromedp.Click(chromedp.CSS(`#prefetch button`)))
	b.waitFor(t, "the prefetch to finish", `document.getElementById("pf-status").textContent.startsWith("Done: 1 of 1 images, 3 of 3 blobs")`, 30*time.Second)
	b.waitFor(t, "team/app in the repository list", `[...document.querySelectorAll("#repos tr")].some(tr =>
		tr.querySelector('[data-f="repo"]').textContent === "team/app" && tr.querySelector('[data-f="tag"]').textContent === "v1" &&
		tr.querySelector('[data-f="where"]').textContent === "primary")`, 30*time.Second)

	// A hostile upstream's error text: shown as text, run as nothing.
	get("/v2/flaky.example/team/app/manifests/v1").Body.Close()
	hostile := fmt.Sprintf(`[...document.querySelectorAll('#upstreams [data-f="last_error_text"]')].some(e => e.textContent.includes(%q))`, hostileText)
	b.waitFor(t, "the hostile error text on the page", hostile, 30*time.Second)

	// A fill in flight: the upstream sends half the layer and holds.
	good.mu.Lock()
	good.hold, good.release = bigLayer.String(), make(chan struct{})
	good.mu.Unlock()
	pull := get("/v2/team/big/blobs/" + bigLayer.String())
	defer pull.Body.Close()
	if _, err := io.ReadFull(pull.Body, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	b.waitFor(t, "the fill's progress", `[...document.querySelectorAll('#fills [data-f="bytes"]')].some(e =>
		+e.dataset.bytes > 0 && +e.dataset.bytes < +e.dataset.size) && document.querySelector('#fills [data-f="waiters"]').textContent === "1"`, 30*time.Second)
	if got := eval[string](t, b, `document.querySelector('#fills [data-f="repo"]').textContent`); got != "primary/team/big" {
		t.Errorf("the fill's repository: %q", got)
	}

	// The whole page again from the server, at desktop and phone widths.
	for _, vp := range []struct {
		name          string
		width, height int64
		opts          []chromedp.EmulateViewportOption
	}{
		{"desktop", 1280, 900, nil},
		{"phone", 390, 844, []chromedp.EmulateViewportOption{chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulatePortrait, chromedp.EmulateScale(2)}},
	} {
		b.do(t, "reload at "+vp.name+" width", chromedp.EmulateViewport(vp.width, vp.height, vp.opts...), chromedp.Navigate(base+"/"))
		b.waitFor(t, "the fill, rendered by the server", `document.querySelectorAll("#fills tr").length === 1`, 15*time.Second)
		if !eval[bool](t, b, hostile) {
			t.Errorf("%s: the server-rendered page lost the hostile text", vp.name)
		}
		if vp.opts != nil {
			if w := eval[int](t, b, `document.documentElement.scrollWidth`); w > int(vp.width) {
				t.Errorf("the phone page is %d px wide, wider than its %d px screen", w, vp.width)
			}
		}
		b.checkAccessibility(t, axe, vp.name)
		b.screenshot(t, "status-"+vp.name)
	}
	if v := eval[string](t, b, `String(window.__pwned)`); v != "undefined" {
		t.Errorf("the hostile upstream's script ran: window.__pwned = %s", v)
	}
	if n := eval[int](t, b, `document.querySelectorAll('img[src="x"], main script').length`); n != 0 {
		t.Errorf("the hostile upstream's markup made %d elements", n)
	}
	close(good.release)
	if _, err := io.Copy(io.Discard, pull.Body); err != nil {
		t.Fatalf("the held pull: %v", err)
	}

	// The upstream stops: a pull past the tag's freshness is answered
	// stale, and the page shows the upstream failing with it counted.
	good.srv.Close()
	time.Sleep(1100 * time.Millisecond) // tag_ttl: 1s
	resp := get("/v2/team/app/manifests/v1")
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Slipway-Cache") != "stale" {
		t.Fatalf("pull with the upstream stopped: %s, X-Slipway-Cache %q", resp.Status, resp.Header.Get("X-Slipway-Cache"))
	}
	b.do(t, "back to the desktop width", chromedp.EmulateViewport(1280, 900))
	b.waitFor(t, "primary failing with a stale answer", `[...document.querySelectorAll("#upstreams tr")].some(tr =>
		tr.querySelector('[data-f="name"]').textContent === "primary" &&
		tr.querySelector('[data-f="state"]').dataset.state === "failing" &&
		+tr.querySelector('[data-f="stale"]').textContent >= 1 &&
		tr.querySelector('[data-f="ratelimit"]').textContent === "97")`, 30*time.Second)
	b.screenshot(t, "status-upstream-down")

	// Every request the browser made went to slipway.
	b.mu.Lock()
	reqs := append([]string(nil), b.requests...)
	b.mu.Unlock()
	polls := 0
	for _, r := range reqs {
		u, err := url.Parse(r)
		if err != nil || u.Host != addr || u.Scheme != "http" {
			t.Errorf("the browser asked for %s: not the test server", r)
		}
		if strings.HasSuffix(r, "/v2/_slipway/status") {
			polls++
		}
	}
	if len(reqs) < 10 || polls < 2 {
		t.Errorf("the browser made %d requests (%d status polls): the recorder missed them", len(reqs), polls)
	}
	p.stop(t, syscall.SIGTERM, 30*time.Second)
	t.Logf("%d requests from the browser (%d status polls); %.1f s", len(reqs), polls, time.Since(began).Seconds())
}

func mustImage(t *testing.T, size, layers int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, layers)
	if err != nil {
		t.Fatal(err)
	}
	return img
}
