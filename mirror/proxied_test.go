package mirror

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// Every route of a proxied repository answers like a registry, with the
// upstream up or down (issue 13): tag lists and referrers are kept and
// served stale, paging is slipway's own, hostile input gets the spec's
// answers, the pull-through policy holds under every spelling of a name,
// and manifests never wait behind blob downloads.

// proxyEnv is a mirror in front of one fakeUpstream, on a fake clock.
type proxyEnv struct {
	up    *fakeUpstream
	store *cache.Store
	srv   *httptest.Server
	host  string
	clock *fakeClock
	log   *syncBuffer
	s     *Server
}

type proxyEnvOptions struct {
	referrersAPI  bool
	dockerHub     bool
	policy        *upstream.Policy
	maxConcurrent int
}

func newProxyEnv(t *testing.T, o proxyEnvOptions) *proxyEnv {
	t.Helper()
	var opts []registry.Option
	if o.referrersAPI {
		opts = append(opts, registry.WithReferrersSupport(true))
	}
	e := &proxyEnv{up: newFakeUpstream(t, opts...), clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}, log: &syncBuffer{}}
	log := slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	st, err := cache.Open(t.TempDir(), cache.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: e.up.URL, Retries: -1, MaxConcurrent: o.maxConcurrent})
	if err != nil {
		t.Fatal(err)
	}
	fills := upstream.NewFiller(st, upstream.FillerOptions{Logger: log, IdleTimeout: 20 * time.Second})
	p := upstream.NewProxy(c, st, fills, upstream.ProxyOptions{Logger: log, TagTTL: testTagTTL, Now: e.clock.Now})
	names := []string{"up"}
	if o.dockerHub {
		names = nil // the Docker Hub names come with DockerHub
	}
	e.s, err = New(Config{Store: st, Logger: log, Fills: fills,
		Upstreams: []Upstream{{Proxy: p, Names: names, DockerHub: o.dockerHub, Policy: o.policy}}})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(e.s.Handler())
	e.host = strings.TrimPrefix(e.srv.URL, "http://")
	t.Cleanup(func() {
		e.srv.Close()
		fills.Close()
		st.Close()
	})
	return e
}

func (e *proxyEnv) url(path string) string { return e.srv.URL + path }

// down makes the upstream answer every request with 503.
func (e *proxyEnv) down() {
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func pushTags(t *testing.T, up *fakeUpstream, repo string, tags ...string) v1.Image {
	t.Helper()
	img, err := random.Image(1<<10, 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range tags {
		up.pushImageTo(t, img, repo+":"+tag)
	}
	return img
}

type tagList struct {
	Name string   `json:"name"`
	Tags []string `json:"tags"`
}

func getTagList(t *testing.T, url string) (*http.Response, tagList) {
	t.Helper()
	resp := do(t, "GET", url, nil)
	var tl tagList
	if resp.StatusCode == http.StatusOK {
		if err := json.NewDecoder(resp.Body).Decode(&tl); err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
	}
	return resp, tl
}

// A proxied tag list is the upstream's whole list (followed page by page),
// paged by slipway whatever the upstream does with n and last, kept for
// the tag freshness window, and served stale, merged with the tags slipway
// cached since, when the upstream fails.
func TestProxiedTagList(t *testing.T) {
	for _, upstreamPages := range []bool{false, true} {
		t.Run(fmt.Sprintf("upstream pages %v", upstreamPages), func(t *testing.T) {
			e := newProxyEnv(t, proxyEnvOptions{})
			all := []string{"1.0", "2.0", "latest", "v1", "v2"}
			pushTags(t, e.up, "lib/app", all...)
			if upstreamPages {
				// Two tags a page, with Link headers, and n and last
				// honoured only through them.
				e.up.setHook(pagingTags(e.up, "lib/app", all, 2))
			} else {
				// distribution 2.8 as a proxy: n and last ignored.
				e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
					if r.URL.Path == "/v2/lib/app/tags/list" {
						r.URL.RawQuery = ""
					}
					return false
				})
			}
			_, tl := getTagList(t, e.url("/v2/lib/app/tags/list"))
			if !slices.Equal(tl.Tags, all) || tl.Name != "lib/app" {
				t.Fatalf("tags = %+v, want %v", tl, all)
			}
			asked := e.up.count("GET", "/v2/lib/app/tags/list")
			// Paging: n, last and the Link header, in lexical order.
			var got []string
			next := "/v2/lib/app/tags/list?n=2"
			for i := 0; next != "" && i < 10; i++ {
				resp, tl := getTagList(t, e.url(next))
				if len(tl.Tags) > 2 {
					t.Fatalf("page %d: %v", i, tl.Tags)
				}
				got = append(got, tl.Tags...)
				next = ""
				if l := resp.Header.Get("Link"); l != "" {
					next = strings.TrimSuffix(strings.TrimPrefix(strings.Split(l, ";")[0], "<"), ">")
				}
			}
			if !slices.Equal(got, all) {
				t.Errorf("pages gave %v, want %v", got, all)
			}
			if _, tl := getTagList(t, e.url("/v2/lib/app/tags/list?last=latest")); !slices.Equal(tl.Tags, []string{"v1", "v2"}) {
				t.Errorf("?last=latest gave %v", tl.Tags)
			}
			if _, tl := getTagList(t, e.url("/v2/lib/app/tags/list?n=0")); len(tl.Tags) != 0 {
				t.Errorf("?n=0 gave %v", tl.Tags)
			}
			if n := e.up.count("GET", "/v2/lib/app/tags/list"); n != asked {
				t.Errorf("%d more upstream tag list requests within the freshness window", n-asked)
			}
			// A tag pulled since, then the upstream goes down.
			e.up.setHook(nil)
			pushTags(t, e.up, "lib/app", "v3")
			if resp := do(t, "GET", e.url("/v2/lib/app/manifests/v3"), nil); resp.StatusCode != http.StatusOK {
				t.Fatalf("manifest v3: %d", resp.StatusCode)
			}
			e.clock.Advance(2 * testTagTTL)
			e.down()
			resp, tl := getTagList(t, e.url("/v2/lib/app/tags/list"))
			if want := append(slices.Clone(all), "v3"); resp.StatusCode != http.StatusOK || !slices.Equal(tl.Tags, want) {
				t.Fatalf("upstream down: %d %v, want the last list and v3: %v", resp.StatusCode, tl.Tags, want)
			}
			if src := resp.Header.Get("X-Slipway-Cache"); src != "stale" {
				t.Errorf("X-Slipway-Cache %q, want stale", src)
			}
			// Nothing known of a repository: the upstream's failure.
			expectError(t, "GET", e.url("/v2/lib/other/tags/list"), nil, http.StatusServiceUnavailable, "UNAVAILABLE")
		})
	}
}

// pagingTags serves repo's tag list per page of size, with Link headers.
func pagingTags(u *fakeUpstream, repo string, tags []string, size int) func(http.ResponseWriter, *http.Request) bool {
	return func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/"+repo+"/tags/list" {
			return false
		}
		last := r.URL.Query().Get("last")
		i := 0
		for i < len(tags) && last != "" && tags[i] <= last {
			i++
		}
		end := min(i+size, len(tags))
		if end < len(tags) {
			w.Header().Set("Link", fmt.Sprintf(`</v2/%s/tags/list?n=%d&last=%s>; rel="next"`, repo, size, tags[end-1]))
		}
		json.NewEncoder(w).Encode(tagList{Name: repo, Tags: tags[i:end]})
		return true
	}
}

// pushArtifact puts an artifact of artifactType whose subject is subject
// into repo at the upstream; tagSchema also writes the referrers tag an
// upstream without the referrers API needs.
func pushArtifact(t *testing.T, up *fakeUpstream, repo string, subject v1.Image, artifactType string, annotations map[string]string) v1.Descriptor {
	t.Helper()
	sd, err := partial.Descriptor(subject)
	if err != nil {
		t.Fatal(err)
	}
	art, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	art = mutate.MediaType(art, types.OCIManifestSchema1)
	art = mutate.ConfigMediaType(art, types.MediaType(artifactType))
	art = mutate.Annotations(art, annotations).(v1.Image)
	art = mutate.Subject(art, *sd).(v1.Image)
	d, err := art.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(art, up.host+"/"+repo+"@"+d.String()); err != nil {
		t.Fatal(err)
	}
	desc, err := partial.Descriptor(art)
	if err != nil {
		t.Fatal(err)
	}
	desc.ArtifactType, desc.Annotations = artifactType, annotations
	return *desc
}

// writeReferrersTag writes the referrers tag schema's index for subject,
// as a client does for a registry without the referrers API.
func writeReferrersTag(t *testing.T, up *fakeUpstream, repo string, subject v1.Image, descs ...v1.Descriptor) {
	t.Helper()
	sd, _ := subject.Digest()
	ref, err := name.ParseReference(up.host + "/" + repo + ":" + strings.Replace(sd.String(), ":", "-", 1))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: descs})
	if err := remote.Put(ref, rawIndex{b}); err != nil {
		t.Fatal(err)
	}
}

type rawIndex struct{ b []byte }

func (r rawIndex) RawManifest() ([]byte, error)        { return r.b, nil }
func (r rawIndex) MediaType() (types.MediaType, error) { return types.OCIImageIndex, nil }

func referrersOf(t *testing.T, url string) v1.IndexManifest {
	t.Helper()
	return decodeIndex(t, do(t, "GET", url, nil))
}

func decodeIndex(t *testing.T, resp *http.Response) v1.IndexManifest {
	t.Helper()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != string(types.OCIImageIndex) {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("referrers: %d, Content-Type %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	var idx v1.IndexManifest
	if err := json.NewDecoder(resp.Body).Decode(&idx); err != nil || idx.SchemaVersion != 2 || idx.MediaType != types.OCIImageIndex || idx.Manifests == nil {
		t.Fatalf("referrers: not an OCI index (%v): %+v", err, idx)
	}
	return idx
}

func digestsOf(descs []v1.Descriptor) []string {
	var out []string
	for _, d := range descs {
		out = append(out, d.Digest.String())
	}
	slices.Sort(out)
	return out
}

// The referrers API of a proxied repository: what the upstream's referrers
// API says, or, without one, the referrers tag schema; filtered by
// artifactType with OCI-Filters-Applied; an empty index (never a 404) when
// nothing refers to the digest; kept, and served stale when the upstream
// fails.
func TestProxiedReferrers(t *testing.T) {
	for _, api := range []bool{true, false} {
		t.Run(fmt.Sprintf("upstream referrers API %v", api), func(t *testing.T) {
			e := newProxyEnv(t, proxyEnvOptions{referrersAPI: api})
			subject := pushTags(t, e.up, "lib/app", "v1")
			sd, _ := subject.Digest()
			sbom := pushArtifact(t, e.up, "lib/app", subject, "application/vnd.example.sbom", map[string]string{"org.example": "sbom"})
			sig := pushArtifact(t, e.up, "lib/app", subject, "application/vnd.example.signature", nil)
			if !api {
				writeReferrersTag(t, e.up, "lib/app", subject, sbom, sig)
			}
			path := "/v2/lib/app/referrers/" + sd.String()
			idx := referrersOf(t, e.url(path))
			if got, want := digestsOf(idx.Manifests), digestsOf([]v1.Descriptor{sbom, sig}); !slices.Equal(got, want) {
				t.Fatalf("referrers %v, want %v", got, want)
			}
			for _, d := range idx.Manifests {
				if d.Digest == sbom.Digest && (d.ArtifactType != sbom.ArtifactType || d.Size != sbom.Size || d.MediaType != sbom.MediaType) {
					t.Errorf("the SBOM's descriptor: %+v, want %+v", d, sbom)
				}
			}
			resp := do(t, "GET", e.url(path+"?artifactType=application/vnd.example.signature"), nil)
			if resp.Header.Get("OCI-Filters-Applied") != "artifactType" {
				t.Errorf("OCI-Filters-Applied %q", resp.Header.Get("OCI-Filters-Applied"))
			}
			if got := decodeIndex(t, resp); !slices.Equal(digestsOf(got.Manifests), digestsOf([]v1.Descriptor{sig})) {
				t.Errorf("filtered: %v, want the signature", digestsOf(got.Manifests))
			}
			unknown := "/v2/lib/app/referrers/sha256:" + strings.Repeat("0", 64)
			if got := referrersOf(t, e.url(unknown)); len(got.Manifests) != 0 {
				t.Errorf("an unknown subject has referrers %v", got.Manifests)
			}
			asked := e.up.total()
			referrersOf(t, e.url(path))
			if n := e.up.total() - asked; n != 0 {
				t.Errorf("%d upstream requests for fresh referrers", n)
			}
			e.clock.Advance(2 * testTagTTL)
			e.down()
			resp = do(t, "GET", e.url(path), nil)
			if got := decodeIndex(t, resp); len(got.Manifests) != 2 || resp.Header.Get("X-Slipway-Cache") != "stale" {
				t.Errorf("upstream down: %v (%s), want both, stale", digestsOf(got.Manifests), resp.Header.Get("X-Slipway-Cache"))
			}
			if got := referrersOf(t, e.url("/v2/lib/app/referrers/sha256:"+strings.Repeat("1", 64))); len(got.Manifests) != 0 {
				t.Errorf("upstream down, unknown subject: %v", got.Manifests)
			}
		})
	}
}

// With the upstream stopped, what was pulled once is still served on
// every route: manifests by tag, tag lists, referrers; and skopeo inspect,
// which lists tags, succeeds.
func TestEveryRouteServedStaleWithTheUpstreamStopped(t *testing.T) {
	skopeo, err := exec.LookPath("skopeo")
	if err != nil {
		t.Skip("skopeo is not installed (.ci/run installs it)")
	}
	e := newProxyEnv(t, proxyEnvOptions{referrersAPI: true})
	img := pushTags(t, e.up, "lib/app", "v1", "v2")
	d, _ := img.Digest()
	pushArtifact(t, e.up, "lib/app", img, "application/vnd.example.sbom", nil)
	inspect := func() ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, skopeo, "inspect", "--tls-verify=false", "docker://"+e.host+"/lib/app:v1").CombinedOutput()
	}
	if out, err := inspect(); err != nil {
		t.Fatalf("skopeo inspect, upstream up: %v\n%s", err, out)
	}
	referrersOf(t, e.url("/v2/lib/app/referrers/"+d.String()))
	e.clock.Advance(2 * testTagTTL)
	e.up.Close()
	out, err := inspect()
	if err != nil {
		t.Fatalf("skopeo inspect, upstream stopped: %v\n%s", err, out)
	}
	var info struct {
		Digest   string
		RepoTags []string
	}
	if err := json.Unmarshal(out, &info); err != nil || info.Digest != d.String() || !slices.Equal(info.RepoTags, []string{"v1", "v2"}) {
		t.Errorf("skopeo inspect: %v %+v", err, info)
	}
	if got := referrersOf(t, e.url("/v2/lib/app/referrers/"+d.String())); len(got.Manifests) != 1 {
		t.Errorf("referrers, upstream stopped: %v", got.Manifests)
	}
	for _, p := range []string{"/v2/lib/app/manifests/v1", "/v2/lib/app/manifests/" + d.String(), "/v2/lib/app/tags/list"} {
		if resp := do(t, "GET", e.url(p), nil); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s, upstream stopped: %d", p, resp.StatusCode)
		}
	}
}

// Hostile requests get the answers the spec and distribution give, each
// with an OCI error body, and none reaches the upstream.
func TestHostileRequestsOfIssue13(t *testing.T) {
	e := newProxyEnv(t, proxyEnvOptions{})
	img := pushTags(t, e.up, "lib/app", "v1")
	m, _ := img.Manifest()
	blob := m.Layers[0].Digest.String()
	if resp := do(t, "GET", e.url("/v2/lib/app/blobs/"+blob), nil); resp.StatusCode != http.StatusOK {
		t.Fatal("seeding the cache")
	}
	waitFor(t, "the blob stored", func() bool { _, err := e.store.StatBlob(digest.Digest(blob)); return err == nil })
	for _, c := range []struct {
		name, method, path string
		header             http.Header
		status             int
		code               string
	}{
		{"n=-1 on tags", "GET", "/v2/lib/app/tags/list?n=-1", nil, 400, "PAGINATION_NUMBER_INVALID"},
		{"n=abc on tags", "GET", "/v2/lib/app/tags/list?n=abc", nil, 400, "PAGINATION_NUMBER_INVALID"},
		{"n=-1 on the catalog", "GET", "/v2/_catalog?n=-1", nil, 400, "PAGINATION_NUMBER_INVALID"},
		{"n=abc on the catalog", "GET", "/v2/_catalog?n=abc", nil, 400, "PAGINATION_NUMBER_INVALID"},
		{"DELETE /v2/", "DELETE", "/v2/", nil, 405, "UNSUPPORTED"},
		{"POST /v2/", "POST", "/v2/", nil, 405, "UNSUPPORTED"},
		{"TRACE /v2/", "TRACE", "/v2/", nil, 405, "UNSUPPORTED"},
		{"PUT /v2", "PUT", "/v2", nil, 405, "UNSUPPORTED"},
		{"inverted Range", "GET", "/v2/lib/app/blobs/" + blob, http.Header{"Range": {"bytes=100-10"}}, 416, "UNSUPPORTED"},
		{"garbage Range", "GET", "/v2/lib/app/blobs/" + blob, http.Header{"Range": {"bytes=x-y"}}, 416, "UNSUPPORTED"},
		{"Range past the end", "GET", "/v2/lib/app/blobs/" + blob, http.Header{"Range": {"bytes=99999999-"}}, 416, "UNSUPPORTED"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := e.up.total()
			resp := expectError(t, c.method, e.url(c.path), c.header, c.status, c.code)
			if c.status == 416 && !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes */") {
				t.Errorf("416 without Content-Range: %q", resp.Header.Get("Content-Range"))
			}
			if n := e.up.total() - before; n != 0 {
				t.Errorf("%d upstream requests", n)
			}
		})
	}
	// A 64 KiB Accept header: only the manifest types slipway knows reach
	// the upstream, and the pull works.
	var seen []string
	var mu sync.Mutex
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		seen = append(seen, r.Header.Get("Accept"))
		mu.Unlock()
		return false
	})
	long := "application/vnd.oci.image.manifest.v1+json, " + strings.Repeat("text/x-junk-"+strings.Repeat("j", 100)+", ", 500) + "*/*;q=0.1"
	if resp := do(t, "GET", e.url("/v2/lib/app/manifests/v1"), http.Header{"Accept": {long}}); resp.StatusCode != http.StatusOK {
		t.Fatalf("a pull with a %d-byte Accept: %d", len(long), resp.StatusCode)
	}
	mu.Lock()
	for _, a := range seen {
		for _, mt := range strings.Split(a, ",") {
			if !slices.Contains(upstream.AcceptedTypes, strings.TrimSpace(mt)) {
				t.Errorf("the upstream was sent Accept %q", mt[:min(len(mt), 80)])
			}
		}
	}
	mu.Unlock()
	// A chunked body with a malformed chunk size: the client's mistake, on
	// every route that reads a body.
	p := newPushEnv(t, "local")
	for _, head := range []string{
		"PUT /v2/local/app/manifests/x",
		"POST /v2/local/app/blobs/uploads/?digest=sha256:" + strings.Repeat("a", 64),
	} {
		conn, err := net.Dial("tcp", p.host)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "%s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", head, p.host)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		conn.Close()
		checkOCIError(t, resp, body, http.StatusBadRequest, map[bool]string{true: "MANIFEST_INVALID", false: "BLOB_UPLOAD_INVALID"}[strings.Contains(head, "manifests")])
	}
}
