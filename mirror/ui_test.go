package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// newUIEnv is an opsEnv whose upstream is named "up" on the page.
func newUIEnv(t *testing.T, tweak func(*Config)) *opsEnv {
	t.Helper()
	e := newOpsEnv(t, func(c *Config) {
		c.Upstreams[0].Name = "up"
		if tweak != nil {
			tweak(c)
		}
	})
	t.Cleanup(e.s.Close) // before the fills and the store close
	return e
}

func getStatusBody(t *testing.T, e *opsEnv) statusBody {
	t.Helper()
	resp, b := getBody(t, e.url("/v2/_slipway/status"))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status: %s %s", resp.Status, b)
	}
	var st statusBody
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, b)
	}
	return st
}

// The live JSON follows an upstream from unused to healthy to failing,
// counts the stale answers it causes and the hits, and shows a fill in
// flight with its progress.
func TestStatusFollowsUpstreamHealthStaleAnswersAndFills(t *testing.T) {
	e := newUIEnv(t, nil)
	st := getStatusBody(t, e)
	if len(st.Upstreams) != 1 || st.Upstreams[0].Name != "up" || st.Upstreams[0].State != "idle" || !st.Upstreams[0].Default ||
		st.Upstreams[0].RateLimitRemaining != nil || st.HitRatio.FiveMinutes.Ratio != nil || len(st.Fills) != 0 {
		t.Fatalf("a fresh mirror: %+v", st)
	}

	img, _ := random.Image(1024, 1)
	e.up.pushImageTo(t, img, "team/app:v1")
	manifest := e.url("/v2/up/team/app/manifests/v1")
	for range 3 {
		if resp, b := getBody(t, manifest); resp.StatusCode != 200 {
			t.Fatalf("pull: %s %s", resp.Status, b)
		}
	}
	st = getStatusBody(t, e)
	u := st.Upstreams[0]
	if u.State != "ok" || u.LastSuccess.IsZero() || u.Requests == 0 || u.Stale != 0 {
		t.Errorf("after pulls: %+v", u)
	}
	if r := st.HitRatio.FiveMinutes; r.Total != 3 || r.Hits != 2 || st.HitRatio.Hour.Total != 3 {
		t.Errorf("hit ratio after a miss and two hits: %+v / %+v", r, st.HitRatio.Hour)
	}

	// The upstream goes away; past the tag's freshness the cached tag is
	// served stale, and the page says so.
	e.up.Close()
	e.clock.Advance(2 * testTagTTL)
	for range 2 {
		if resp, b := getBody(t, manifest); resp.StatusCode != 200 || resp.Header.Get("X-Slipway-Cache") != "stale" {
			t.Fatalf("pull with the upstream down: %s %s %s", resp.Status, resp.Header.Get("X-Slipway-Cache"), b)
		}
	}
	st = getStatusBody(t, e)
	u = st.Upstreams[0]
	if u.State != "failing" || u.Stale != 2 || u.LastError.Before(u.LastSuccess) || !strings.Contains(u.LastErrorText, "refused") {
		t.Errorf("with the upstream down: %+v", u)
	}
	if r := st.HitRatio.FiveMinutes; r.Total != 5 || r.Hits != 2 {
		t.Errorf("stale answers are not hits: %+v", r)
	}
}

func TestStatusShowsAFillInFlight(t *testing.T) {
	e := newUIEnv(t, nil)
	b := randomBytes(t, 2<<20)
	d := digest.FromBytes(b)
	release := make(chan struct{})
	e.up.setHook(holdHook(d, b, release))
	defer close(release)
	resp, err := http.Get(e.url("/v2/up/team/big/blobs/" + string(d)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var f fillStatus
	waitFor(t, "the fill to show half the blob", func() bool {
		st := getStatusBody(t, e)
		if len(st.Fills) == 1 {
			f = st.Fills[0]
		}
		return len(st.Fills) == 1 && f.Bytes > 0
	})
	if f.Digest != string(d) || f.Upstream != "up" || f.Repo != "team/big" || f.Size != int64(len(b)) ||
		f.Bytes >= f.Size || f.Waiters != 1 || f.Rate <= 0 {
		t.Errorf("fill %+v: want half of %d bytes of %s for up/team/big, one waiter", f, len(b), d)
	}
}

// An upstream's error text is shown as text: the page escapes it, the
// JSON carries it as a string.
func TestStatusPageEscapesWhatUpstreamsSay(t *testing.T) {
	const hostile = `<script>window.pwned=1</script><img src=x onerror="window.pwned=2">`
	e := newUIEnv(t, nil)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/v2/" {
			return false
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": "UNAVAILABLE", "message": hostile}}})
		return true
	})
	getBody(t, e.url("/v2/up/team/app/manifests/v1"))
	st := getStatusBody(t, e)
	if !strings.Contains(st.Upstreams[0].LastErrorText, hostile) {
		t.Fatalf("last error text %q: want the upstream's message", st.Upstreams[0].LastErrorText)
	}
	resp, page := getBody(t, e.url("/"))
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	if bytes.Contains(page, []byte("<script>window")) || bytes.Contains(page, []byte("<img src=x")) {
		t.Error("the page has the upstream's markup unescaped")
	}
	if !bytes.Contains(page, []byte("&lt;script&gt;window.pwned=1&lt;/script&gt;&lt;img src=x onerror=&#34;window.pwned=2&#34;&gt;")) {
		t.Errorf("the page does not show the upstream's text escaped:\n%s", page)
	}
}

// Every UI route sends a strict CSP and nosniff; the page loads only its
// own assets, which are served with their types and validators.
func TestStatusPageHeadersAndAssets(t *testing.T) {
	e := newUIEnv(t, nil)
	for _, p := range []string{"/", "/_slipway/ui", "/_slipway/ui/static/app.js", "/_slipway/ui/static/style.css",
		"/_slipway/ui/static/icon.svg", "/v2/_slipway/status", "/v2/_slipway/repos"} {
		resp, b := getBody(t, e.url(p))
		if resp.StatusCode != 200 {
			t.Errorf("GET %s: %s %s", p, resp.Status, b)
			continue
		}
		csp := resp.Header.Get("Content-Security-Policy")
		if !strings.Contains(csp, "default-src 'self'") || !strings.Contains(csp, "script-src 'self';") ||
			strings.Contains(csp, "unsafe") || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: CSP %q, X-Content-Type-Options %q", p, csp, resp.Header.Get("X-Content-Type-Options"))
		}
	}
	resp, page := getBody(t, e.url("/"))
	for _, want := range []string{`<meta name="viewport"`, `src="/_slipway/ui/static/app.js"`, `href="/_slipway/ui/static/style.css"`} {
		if !bytes.Contains(page, []byte(want)) {
			t.Errorf("the page lacks %s", want)
		}
	}
	// The upstream's URL is shown as text; no other URL is in the page.
	rest := bytes.ReplaceAll(page, []byte(e.up.URL), nil)
	if bytes.Contains(page, []byte("<script>")) || bytes.Contains(page, []byte(" style=")) ||
		bytes.Contains(rest, []byte("http://")) || bytes.Contains(rest, []byte("https://")) || bytes.Contains(rest, []byte(`="//`)) {
		t.Error("the page has inline script or style, or names another host")
	}
	if resp.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("the page's Cache-Control: %q", resp.Header.Get("Cache-Control"))
	}
	for name, ct := range map[string]string{"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8", "icon.svg": "image/svg+xml"} {
		resp, _ := getBody(t, e.url("/_slipway/ui/static/"+name))
		if resp.Header.Get("Content-Type") != ct || resp.Header.Get("ETag") == "" {
			t.Errorf("%s: Content-Type %q, ETag %q", name, resp.Header.Get("Content-Type"), resp.Header.Get("ETag"))
		}
		r, _ := http.NewRequest("GET", e.url("/_slipway/ui/static/"+name), nil)
		r.Header.Set("If-None-Match", resp.Header.Get("ETag"))
		if again, err := http.DefaultClient.Do(r); err != nil || again.StatusCode != http.StatusNotModified {
			t.Errorf("%s again with its ETag: %v %v", name, again.Status, err)
		} else {
			again.Body.Close()
		}
	}
	for _, p := range []string{"/_slipway/ui/static/", "/_slipway/ui/static/../ui.go", "/_slipway/ui/static/nope.js", "/_slipway/ui/static/index.html"} {
		if resp, _ := getBody(t, e.url(p)); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %s, want 404", p, resp.Status)
		}
	}
}

// The page and its calls sit behind the same authentication as pulls:
// a browser without credentials gets the Basic challenge when anonymous
// pulls are off; starting a prefetch job is a pull, for any user.
func TestStatusPageAuth(t *testing.T) {
	for _, anon := range []bool{true, false} {
		t.Run(fmt.Sprintf("anonymous-pull=%v", anon), func(t *testing.T) {
			e := newAuthEnv(t, anon)
			denied := map[bool]int{true: 0, false: 401}[anon]
			job := `{"images":["up/team/none:v1"]}`
			for _, c := range []struct {
				name, method, path, user, pass, body string
				want                                 int // 0: not 401
			}{
				{"page", "GET", "/", "", "", "", denied},
				{"page by its other name", "GET", "/_slipway/ui?q=x", "", "", "", denied},
				{"assets", "GET", "/_slipway/ui/static/app.js", "", "", "", denied},
				{"status", "GET", "/v2/_slipway/status", "", "", "", denied},
				{"repos", "GET", "/v2/_slipway/repos", "", "", "", denied},
				{"start a job", "POST", "/v2/_slipway/prefetch/jobs", "", "", job, denied},
				{"a job", "GET", "/v2/_slipway/prefetch/jobs/0123", "", "", "", denied},
				{"page with a wrong password", "GET", "/", "reader", "nope", "", 401},
				{"page for a read-only user", "GET", "/", "reader", "r", "", 200},
				{"a job for a read-only user", "POST", "/v2/_slipway/prefetch/jobs", "reader", "r", job, 202},
				{"a job for a user limited to ci/", "POST", "/v2/_slipway/prefetch/jobs", "ci", "ci-secret", job, 202},
			} {
				r, _ := http.NewRequest(c.method, e.url(c.path), strings.NewReader(c.body))
				r.Header.Set("Content-Type", "application/json")
				if c.user != "" {
					r.SetBasicAuth(c.user, c.pass)
				}
				resp, err := http.DefaultClient.Do(r)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				switch {
				case c.want == 0 && resp.StatusCode == 401, c.want != 0 && resp.StatusCode != c.want:
					t.Errorf("%s: %s %s: %s %s, want %d", c.name, c.method, c.path, resp.Status, b, c.want)
				case resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") != `Basic realm="slipway"`:
					t.Errorf("%s: 401 with WWW-Authenticate %q", c.name, resp.Header.Get("WWW-Authenticate"))
				}
			}
		})
	}
}

// Bad input to the page and its calls is a clear 4xx, never a 500.
func TestStatusPageBadInput(t *testing.T) {
	e := newUIEnv(t, nil)
	long := strings.Repeat("x", maxSearch+1)
	for _, c := range []struct {
		method, path, ctype, body string
		want                      int
		code                      string
	}{
		{"GET", "/v2/_slipway/repos?cursor=!!", "", "", 400, "UNSUPPORTED"},
		{"GET", "/v2/_slipway/repos?cursor=" + strings.Repeat("A", 5000), "", "", 400, "UNSUPPORTED"},
		{"GET", "/v2/_slipway/repos?n=0", "", "", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/_slipway/repos?n=-5", "", "", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/_slipway/repos?n=abc", "", "", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/_slipway/repos?n=99999999999999999999", "", "", 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/_slipway/repos?q=" + long, "", "", 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "text/plain", `{"images":["a:1"]}`, 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/x-www-form-urlencoded", "images=a", 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":`, 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":[]}`, 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":["a"],"platform":"x/y/z/w"}`, 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":[` + strings.Repeat(`"a",`, maxPrefetchImages) + `"a"]}`, 400, "UNSUPPORTED"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":["alpine:3.20","Bad/Name:1"]}`, 400, "NAME_INVALID"},
		{"POST", "/v2/_slipway/prefetch/jobs", "application/json", `{"images":["alpine@sha256:nothex"]}`, 400, "DIGEST_INVALID"},
		{"GET", "/v2/_slipway/prefetch/jobs/nope", "", "", 404, "UNSUPPORTED"},
		{"GET", "/v2/_slipway/prefetch/jobs/" + strings.Repeat("0", 32), "", "", 404, "UNSUPPORTED"},
		{"GET", "/v2/_slipway/prefetch/jobs/%2e%2e%2f%2e%2e", "", "", 404, "UNSUPPORTED"},
	} {
		r, _ := http.NewRequest(c.method, e.url(c.path), strings.NewReader(c.body))
		if c.ctype != "" {
			r.Header.Set("Content-Type", c.ctype)
		}
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			Errors []struct{ Code, Message string }
		}
		json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != c.want || len(body.Errors) == 0 || body.Errors[0].Code != c.code {
			t.Errorf("%s %s: %s %+v, want %d %s", c.method, c.path[:min(len(c.path), 60)], resp.Status, body, c.want, c.code)
		}
	}

	// The page itself answers a bad cursor with the page and the reason.
	resp, page := getBody(t, e.url("/_slipway/ui?q=%3Cb%3E&cursor=%3Cscript%3E"))
	if resp.StatusCode != 400 || !bytes.Contains(page, []byte("cursor: not one this server gave")) ||
		!bytes.Contains(page, []byte(`value="&lt;b&gt;"`)) || bytes.Contains(page, []byte("<script>")) {
		t.Errorf("a bad cursor on the page: %s\n%s", resp.Status, page)
	}
	// Search strings are only strings.
	for _, q := range []string{"%00", "%25", ".%2A", "%27%20OR%201%3D1", "%3Cscript%3E"} {
		resp, b := getBody(t, e.url("/v2/_slipway/repos?q="+q))
		if resp.StatusCode != 200 || !bytes.Contains(b, []byte(`"rows":[]`)) {
			t.Errorf("search %s: %s %s", q, resp.Status, b)
		}
	}
}

func postJob(t *testing.T, e *opsEnv, images ...string) (int, jobBody) {
	t.Helper()
	b, _ := json.Marshal(PrefetchRequest{Images: images})
	resp, err := http.Post(e.url("/v2/_slipway/prefetch/jobs"), "application/json; charset=utf-8", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var j jobBody
	json.NewDecoder(resp.Body).Decode(&j)
	if resp.StatusCode == http.StatusAccepted && resp.Header.Get("Location") != "/v2/_slipway/prefetch/jobs/"+j.ID {
		t.Errorf("Location %q for job %q", resp.Header.Get("Location"), j.ID)
	}
	return resp.StatusCode, j
}

func getJob(t *testing.T, e *opsEnv, id string) jobBody {
	t.Helper()
	resp, b := getBody(t, e.url("/v2/_slipway/prefetch/jobs/"+url.PathEscape(id)))
	if resp.StatusCode != 200 {
		t.Fatalf("job %s: %s %s", id, resp.Status, b)
	}
	var j jobBody
	if err := json.Unmarshal(b, &j); err != nil {
		t.Fatal(err)
	}
	return j
}

// A job prefetches as the synchronous call does, while its progress can be
// read; the image it stored then shows among the repositories.
func TestPrefetchJobProgressAndResult(t *testing.T) {
	e := newUIEnv(t, nil)
	img, _ := random.Image(1<<20, 2)
	e.up.pushImageTo(t, img, "team/app:v1")
	layers, _ := img.Layers()
	held, _ := layers[1].Digest()
	hb, _ := layers[1].Compressed()
	heldBytes, _ := io.ReadAll(hb)
	release := make(chan struct{})
	e.up.setHook(holdHook(digest.Digest(held.String()), heldBytes, release))

	status, j := postJob(t, e, "up/team/app:v1", "up/team/missing:v1")
	if status != http.StatusAccepted || len(j.ID) != 32 || j.State != "running" || j.ImagesTotal != 2 {
		t.Fatalf("start: %d %+v", status, j)
	}
	waitFor(t, "the held layer half fetched", func() bool {
		j = getJob(t, e, j.ID)
		return j.Bytes >= int64(len(heldBytes)/2) && j.ImagesDone == 1
	})
	if j.State != "running" || j.BlobsTotal != 3 || j.BlobsDone >= 3 || j.Images[0].State != "running" ||
		j.Images[1].State != "failed" || j.Images[1].Error == "" {
		t.Errorf("in flight: %+v", j)
	}
	close(release)
	waitFor(t, "the job to end", func() bool { j = getJob(t, e, j.ID); return j.State != "running" })
	im := j.Images[0]
	if j.State != "failed" || j.ImagesDone != 2 || j.ImagesFailed != 1 || j.Finished.IsZero() ||
		im.State != "done" || im.BlobsDone != 3 || im.BlobsTotal != 3 || im.Fetched != 4 || im.Bytes < int64(len(heldBytes)) {
		t.Errorf("ended: %+v", j)
	}

	resp, b := getBody(t, e.url("/v2/_slipway/repos?q=team/app"))
	var repos reposBody
	json.Unmarshal(b, &repos)
	if resp.StatusCode != 200 || len(repos.Rows) != 1 || repos.Rows[0].Upstream != "up" || repos.Rows[0].Repo != "team/app" ||
		repos.Rows[0].Tag != "v1" || repos.Rows[0].Size < 2<<20 || !repos.Rows[0].Stored {
		t.Errorf("repos after the job: %s %s", resp.Status, b)
	}
	if _, page := getBody(t, e.url("/?q=team")); !bytes.Contains(page, []byte("team/app")) {
		t.Error("the page does not list team/app after the job")
	}
}

// At most maxRunningJobs run at once; finished jobs are forgotten after
// jobTTL, and at most maxKeptJobs are kept.
func TestPrefetchJobsAreBounded(t *testing.T) {
	e := newUIEnv(t, nil)
	b := randomBytes(t, 1<<20)
	d := digest.FromBytes(b)
	release := make(chan struct{})
	e.up.setHook(holdHook(d, b, release))
	defer close(release)
	img, _ := random.Image(1024, 1)
	e.up.pushImageTo(t, img, "team/app:v1")

	js := e.s.jobs
	now := time.Now()
	running := make([]*prefetchJob, maxRunningJobs)
	for i := range running {
		running[i] = &prefetchJob{id: fmt.Sprint("run", i), started: now}
		if err := js.add(running[i], now); err != nil {
			t.Fatal(err)
		}
		defer js.wg.Done() // add counted it; this test runs nothing
	}
	if status, _ := postJob(t, e, "up/team/app:v1"); status != http.StatusTooManyRequests {
		t.Errorf("a job past %d running: %d, want 429", maxRunningJobs, status)
	}
	for _, j := range running {
		j.finished = now
	}
	later := now.Add(jobTTL - time.Minute)
	for i := range maxKeptJobs {
		j := &prefetchJob{id: fmt.Sprint("done", i), finished: now.Add(time.Duration(i) * time.Second)}
		if err := js.add(j, later); err != nil {
			t.Fatal(err)
		}
		j.finished = j.finished.Add(time.Nanosecond)
		js.wg.Done()
	}
	if len(js.jobs) != maxKeptJobs {
		t.Errorf("%d jobs kept, want at most %d", len(js.jobs), maxKeptJobs)
	}
	if _, ok := js.get("run0", later); ok {
		t.Error("the job that ended first was kept past the bound")
	}
	if _, ok := js.get(fmt.Sprint("done", maxKeptJobs-1), now.Add(jobTTL)); !ok {
		t.Error("a job that ended within the hour was forgotten")
	}
	if _, ok := js.get(fmt.Sprint("done", maxKeptJobs-1), now.Add(2*jobTTL)); ok {
		t.Error("a job that ended over an hour ago is still there")
	}
	if status, _ := postJob(t, e, "up/team/app:v1"); status != http.StatusAccepted {
		t.Errorf("a job with none running: %d", status)
	}
}

// The repository list pages by cursor on the page (plain links, no
// script needed) and in the JSON, and searches.
func TestStatusPageRepositoryPages(t *testing.T) {
	e := newUIEnv(t, nil)
	img, _ := random.Image(512, 1)
	raw, _ := img.RawManifest()
	mt, _ := img.MediaType()
	tags := []string{}
	for i := range 60 {
		tags = append(tags, fmt.Sprintf("v%02d", i))
	}
	d := digest.FromBytes(raw)
	if err := e.store.PutManifest(cache.ManifestPut{NS: e.up.host, Repo: "team/app", Tags: tags,
		Manifest: cache.Manifest{Digest: d, MediaType: string(mt), Bytes: raw, Origin: cache.OriginPulled}}); err != nil {
		t.Fatal(err)
	}

	resp, page := getBody(t, e.url("/"))
	if resp.StatusCode != 200 || bytes.Count(page, []byte(`<td data-label="Tag" data-f="tag">v`)) != cache.DefaultTagPage {
		t.Fatalf("first page: %s, want %d rows", resp.Status, cache.DefaultTagPage)
	}
	next := regexp.MustCompile(`<a href="(/_slipway/ui\?q=&amp;cursor=[A-Za-z0-9_-]+#repos-h)">Next page</a>`).FindSubmatch(page)
	if next == nil {
		t.Fatalf("no Next page link on the first page")
	}
	resp, page = getBody(t, e.url(html.UnescapeString(string(next[1]))))
	if resp.StatusCode != 200 || bytes.Count(page, []byte(`<td data-label="Tag" data-f="tag">v`)) != 10 ||
		!bytes.Contains(page, []byte(">v59<")) || bytes.Contains(page, []byte("Next page")) || !bytes.Contains(page, []byte("First page")) {
		t.Errorf("second page: %s\n%s", resp.Status, page)
	}

	var got []string
	cursor := ""
	for range 10 {
		resp, b := getBody(t, e.url("/v2/_slipway/repos?n=25&cursor="+url.QueryEscape(cursor)))
		var rb reposBody
		if err := json.Unmarshal(b, &rb); err != nil || resp.StatusCode != 200 {
			t.Fatalf("repos: %s %s", resp.Status, b)
		}
		for _, r := range rb.Rows {
			if r.Upstream != "up" || r.Repo != "team/app" || r.Digest != string(d) || r.Pushed {
				t.Fatalf("row %+v", r)
			}
			got = append(got, r.Tag)
		}
		if cursor = rb.Next; cursor == "" {
			break
		}
	}
	if len(got) != 60 || got[0] != "v00" || got[59] != "v59" {
		t.Errorf("pages of 25 gave %d tags: %v", len(got), got)
	}
	_, page = getBody(t, e.url("/?q=APP:V5"))
	if n := bytes.Count(page, []byte(`<td data-label="Tag" data-f="tag">v5`)); n != 10 || !bytes.Contains(page, []byte(`value="APP:V5"`)) {
		t.Errorf("a search for APP:V5 shows %d rows, want 10", n)
	}
}
