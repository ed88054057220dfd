package mirror

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// bearerAuth makes u demand Docker-style bearer tokens from its own /token.
func bearerAuth(u *fakeUpstream, tokens *atomic.Int32) {
	u.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/token" {
			tokens.Add(1)
			io.WriteString(w, `{"token":"good","expires_in":300}`)
			return true
		}
		if r.Header.Get("Authorization") == "Bearer good" {
			return false
		}
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="fake"`, u.URL))
		w.WriteHeader(http.StatusUnauthorized)
		return true
	})
}

// basicAuth makes u demand user:pass.
func basicAuth(u *fakeUpstream, user, pass string) {
	u.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if uu, pp, ok := r.BasicAuth(); ok && uu == user && pp == pass {
			return false
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
		w.WriteHeader(http.StatusUnauthorized)
		return true
	})
}

type routeEnv struct {
	hub, ghcr, quay *fakeUpstream
	store           *cache.Store
	srv             *httptest.Server
	hubTokens       atomic.Int32
}

// newRouteEnv: three upstreams as a user would configure them. "hub" is
// Docker Hub-like (bearer tokens, library/ names, default), "ghcr.io"
// wants basic credentials, "quay.io" is open.
func newRouteEnv(t *testing.T, ghcrPass string) *routeEnv {
	t.Helper()
	e := &routeEnv{hub: newFakeUpstream(t), ghcr: newFakeUpstream(t), quay: newFakeUpstream(t)}
	st, err := cache.Open(t.TempDir(), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	fills := upstream.NewFiller(st, upstream.FillerOptions{})
	log := slog.New(slog.DiscardHandler)
	mk := func(u *fakeUpstream, auth authn.Authenticator) *upstream.Proxy {
		c, err := upstream.New(upstream.Config{URL: u.URL, Auth: auth})
		if err != nil {
			t.Fatal(err)
		}
		return upstream.NewProxy(c, st, fills, upstream.ProxyOptions{Logger: log})
	}
	s, err := New(Config{Store: st, Logger: log, Default: 0, Upstreams: []Upstream{
		{Proxy: mk(e.hub, nil), Names: []string{"hub"}, DockerHub: true},
		{Proxy: mk(e.ghcr, &authn.Basic{Username: "ci", Password: ghcrPass}), Names: []string{"ghcr.io"}},
		{Proxy: mk(e.quay, nil), Names: []string{"quay.io"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	t.Cleanup(func() { e.srv.Close(); fills.Close(); st.Close() })
	return e
}

// seed pushes a random image to u before auth is switched on.
func seed(t *testing.T, u *fakeUpstream, ref string) v1.Image {
	t.Helper()
	img, _ := random.Image(2048, 2)
	if err := crane.Push(img, u.host+"/"+ref); err != nil {
		t.Fatal(err)
	}
	return img
}

// pullLike sends what a client sends for repo:tag under the mirror path
// prefix pre and query q: optionally a HEAD of the tag (containerd),
// the manifest, then config and layers by digest. It checks every digest.
func pullLike(t *testing.T, base, pre, repo, tag, q string, head bool, want v1.Image) {
	t.Helper()
	path := base + "/v2/" + pre + repo
	accept := http.Header{"Accept": {strings.Join(upstream.ManifestTypes, ", ")}}
	wantDigest, _ := want.Digest()
	ref := tag
	if head {
		resp := do(t, http.MethodHead, path+"/manifests/"+tag+q, accept)
		if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != wantDigest.String() {
			t.Fatalf("HEAD %s: %d %q", path+"/manifests/"+tag+q, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
		}
		ref = wantDigest.String()
	}
	resp := do(t, http.MethodGet, path+"/manifests/"+ref+q, accept)
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || digest.FromBytes(body).String() != wantDigest.String() {
		t.Fatalf("GET %s: %d, %s", path+"/manifests/"+ref+q, resp.StatusCode, body)
	}
	var m v1.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	for _, d := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		resp := do(t, http.MethodGet, path+"/blobs/"+d.Digest.String()+q, nil)
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || digest.FromBytes(b).String() != d.Digest.String() {
			t.Fatalf("GET blob %s: %d", d.Digest, resp.StatusCode)
		}
	}
}

func TestEveryClientShapeReachesItsUpstream(t *testing.T) {
	e := newRouteEnv(t, "secret")
	alpine := seed(t, e.hub, "library/alpine:3")
	tool := seed(t, e.ghcr, "org/tool:1")
	app := seed(t, e.quay, "team/app:1")
	bearerAuth(e.hub, &e.hubTokens)
	basicAuth(e.ghcr, "ci", "secret")
	base := e.srv.URL

	cases := []struct {
		name, pre, repo, tag, q string
		head                    bool
		img                     v1.Image
	}{
		// Docker's daemon.json "registry-mirrors": Docker Hub names, library/ included.
		{"docker daemon", "", "library/alpine", "3", "", false, alpine},
		// containerd hosts.toml (also kind, k3s): HEAD by tag, then by digest, with ?ns=.
		{"containerd docker.io", "", "library/alpine", "3", "?ns=docker.io", true, alpine},
		{"containerd ghcr.io", "", "org/tool", "1", "?ns=ghcr.io", true, tool},
		{"containerd quay.io", "", "team/app", "1", "?ns=quay.io", true, app},
		// podman/skopeo registries.conf mirror location "mirror:5000/docker.io".
		{"podman docker.io", "docker.io/", "library/alpine", "3", "", false, alpine},
		{"podman ghcr.io", "ghcr.io/", "org/tool", "1", "", false, tool},
		// crane/regctl with a prefix or an alias.
		{"crane alias", "hub/", "library/alpine", "3", "", false, alpine},
		{"crane quay.io", "quay.io/", "team/app", "1", "", false, app},
		// Docker Hub short names.
		{"one-word name", "", "alpine", "3", "", false, alpine},
		{"one-word with prefix", "docker.io/", "alpine", "3", "", false, alpine},
		// Unknown query parameters are ignored.
		{"extra query", "", "team/app", "1", "?ns=quay.io&foo=bar", false, app},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { pullLike(t, base, c.pre, c.repo, c.tag, c.q, c.head, c.img) })
	}
	// The real crane, through a prefix.
	got, err := crane.Pull(strings.TrimPrefix(base, "http://") + "/ghcr.io/org/tool:1")
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := got.Digest(); d.String() != mustDigest(tool) {
		t.Errorf("crane via prefix: %s", d)
	}
	// Each blob came from its own upstream once, whatever the shape.
	for _, d := range blobDigests(t, alpine) {
		if n := e.hub.count("GET", "/v2/library/alpine/blobs/"+d); n != 1 {
			t.Errorf("hub blob %s fetched %d times", d, n)
		}
	}
	if n := e.hubTokens.Load(); n < 1 || n > 2 {
		t.Errorf("%d token fetches for one repository", n)
	}
}

func mustDigest(img v1.Image) string {
	d, _ := img.Digest()
	return d.String()
}

func TestWrongUpstreamCredentialsAreAClearError(t *testing.T) {
	e := newRouteEnv(t, "wrong")
	seed(t, e.ghcr, "org/tool:1")
	basicAuth(e.ghcr, "ci", "secret")
	resp := expectError(t, http.MethodGet, e.srv.URL+"/v2/org/tool/manifests/1?ns=ghcr.io", nil, http.StatusForbidden, "DENIED")
	if b, _ := io.ReadAll(resp.Body); strings.Contains(string(b), "wrong") {
		t.Errorf("the error body shows the password: %s", b)
	}
}

func TestUnlistedUpstreamsAreNeverContacted(t *testing.T) {
	e := newRouteEnv(t, "secret")
	var conns atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			c.Close()
		}
	}()
	host := ln.Addr().String()
	base := e.srv.URL
	for _, q := range []string{host, "169.254.169.254", "localhost", "metadata.google.internal", "[::1]"} {
		expectError(t, http.MethodGet, base+"/v2/library/alpine/manifests/3?ns="+q, nil, http.StatusNotFound, "NAME_UNKNOWN")
		expectError(t, http.MethodGet, base+"/v2/library/alpine/blobs/"+string(digest.FromString("x"))+"?ns="+q, nil, http.StatusNotFound, "NAME_UNKNOWN")
	}
	// A host as a path prefix is not a valid repository component.
	expectError(t, http.MethodGet, base+"/v2/"+host+"/library/alpine/manifests/3", nil, http.StatusBadRequest, "NAME_INVALID")
	if n := conns.Load(); n != 0 {
		t.Errorf("an unlisted upstream got %d connections", n)
	}
}

func TestForeignTokenRealmRefused(t *testing.T) {
	e := newRouteEnv(t, "secret")
	var realmHits atomic.Int32
	realm := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		realmHits.Add(1)
		io.WriteString(w, `{"token":"stolen"}`)
	}))
	defer realm.Close()
	seed(t, e.quay, "team/app:1")
	e.quay.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="x"`, realm.URL))
		w.WriteHeader(http.StatusUnauthorized)
		return true
	})
	resp := do(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/app/manifests/1", nil)
	if resp.StatusCode < 400 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if n := realmHits.Load(); n != 0 {
		t.Errorf("a realm on another host got %d requests", n)
	}
}

func TestTwoRepositoriesShareABaseLayerFetchedOnce(t *testing.T) {
	e := newRouteEnv(t, "secret")
	base, _ := random.Image(256<<10, 1)
	extra1, _ := random.Layer(1024, "application/vnd.oci.image.layer.v1.tar+gzip")
	extra2, _ := random.Layer(1024, "application/vnd.oci.image.layer.v1.tar+gzip")
	img1, _ := mutate.AppendLayers(base, extra1)
	img2, _ := mutate.AppendLayers(base, extra2)
	for ref, img := range map[string]v1.Image{"team/a:1": img1, "team/b:1": img2} {
		if err := crane.Push(img, e.quay.host+"/"+ref); err != nil {
			t.Fatal(err)
		}
	}
	shared, _ := base.Layers()
	sd, _ := shared[0].Digest()
	var wg sync.WaitGroup
	for _, c := range []struct {
		repo string
		img  v1.Image
	}{{"team/a", img1}, {"team/b", img2}, {"team/a", img1}, {"team/b", img2}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pullLike(t, e.srv.URL, "quay.io/", c.repo, "1", "", false, c.img)
		}()
	}
	wg.Wait()
	gets := e.quay.count("GET", "/v2/team/a/blobs/"+sd.String()) + e.quay.count("GET", "/v2/team/b/blobs/"+sd.String())
	if gets != 1 {
		t.Errorf("the shared layer was fetched %d times, want 1", gets)
	}
}

func TestMissingImageStormAsksTheUpstreamOnce(t *testing.T) {
	e := newRouteEnv(t, "secret")
	for i := 0; i < 10; i++ {
		expectError(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/missing/manifests/1", nil, http.StatusNotFound, "MANIFEST_UNKNOWN")
	}
	if n := e.quay.count("GET", "/v2/team/missing/manifests/1"); n != 1 {
		t.Errorf("10 pulls of a missing tag made %d upstream GETs, want 1", n)
	}
}

func TestTagsListOfAProxiedRepository(t *testing.T) {
	e := newRouteEnv(t, "secret")
	for _, tag := range []string{"a", "b", "c"} {
		seed(t, e.quay, "team/app:"+tag)
	}
	var list struct {
		Name string
		Tags []string
	}
	resp := do(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/app/tags/list", nil)
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %v", resp.StatusCode, err)
	}
	if strings.Join(list.Tags, ",") != "a,b,c" || list.Name != "quay.io/team/app" {
		t.Errorf("tags %+v", list)
	}
	resp = do(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/app/tags/list?n=2", nil)
	json.NewDecoder(resp.Body).Decode(&list)
	if strings.Join(list.Tags, ",") != "a,b" || !strings.Contains(resp.Header.Get("Link"), "last=b") {
		t.Errorf("page 1: %v, Link %q", list.Tags, resp.Header.Get("Link"))
	}
	resp = do(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/app/tags/list?n=2&last=b", nil)
	json.NewDecoder(resp.Body).Decode(&list)
	if strings.Join(list.Tags, ",") != "c" || resp.Header.Get("Link") != "" {
		t.Errorf("page 2: %v, Link %q", list.Tags, resp.Header.Get("Link"))
	}
	expectError(t, http.MethodGet, e.srv.URL+"/v2/quay.io/team/none/tags/list", nil, http.StatusNotFound, "NAME_UNKNOWN")
}
