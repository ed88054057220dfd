package mirror

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// Store integrity seen through the HTTP API: each test here was written
// against a way slipway lost, mixed up or exposed content (issue 12), and
// failed before the fix.

// imageManifest is an OCI image manifest of config and layers.
func imageManifest(config []byte, layers ...[]byte) []byte {
	var ls []string
	for _, l := range layers {
		ls = append(ls, fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":%d}`, digest.FromBytes(l), len(l)))
	}
	return []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[%s]}`,
		digest.FromBytes(config), len(config), strings.Join(ls, ",")))
}

func putManifest(base, repo, ref string, body []byte) (*http.Response, error) {
	return sendErr("PUT", base+"/v2/"+repo+"/manifests/"+ref, body,
		http.Header{"Content-Type": {"application/vnd.oci.image.manifest.v1+json"}})
}

var pushShapes = []struct {
	name string
	push func(base, repo string, d digest.Digest, b []byte) error
}{
	{"single POST", pushSinglePOST},
	{"monolithic", pushMonolithic},
	{"chunked", func(base, repo string, d digest.Digest, b []byte) error { return pushChunked(base, repo, d, b, 3) }},
}

// Item 2: pushing a blob that is already stored renews its grace, so the
// manifest that follows finds it even if the first push of those bytes is
// older than the grace.
func TestRepushRenewsTheGrace(t *testing.T) {
	for _, shape := range pushShapes {
		t.Run(shape.name, func(t *testing.T) {
			e := newLifeEnv(t, cache.Options{GCGrace: 24 * time.Hour})
			config, layer := randomBytes(t, 1000), randomBytes(t, 100<<10)
			for _, b := range [][]byte{config, layer} {
				if err := shape.push(e.srv.URL, "local/app", digest.FromBytes(b), b); err != nil {
					t.Fatal(err)
				}
			}
			e.clock.Advance(23 * time.Hour)
			for _, b := range [][]byte{config, layer} { // a CI job pushes the same layers again
				if err := shape.push(e.srv.URL, "local/app", digest.FromBytes(b), b); err != nil {
					t.Fatal(err)
				}
			}
			e.clock.Advance(2 * time.Hour)
			if _, err := e.store.GC(cache.GCOptions{}); err != nil {
				t.Fatal(err)
			}
			resp, err := putManifest(e.srv.URL, "local/app", "v1", imageManifest(config, layer))
			if err != nil {
				t.Fatal(err)
			}
			if err := want(resp, http.StatusCreated); err != nil {
				t.Fatalf("the manifest after a re-push two hours ago: %v", err)
			}
		})
	}
}

// Item 3: once GC removed a pushed blob, its repository no longer holds
// it, even when the same bytes come back through an upstream pull: HEAD
// says 404 and a manifest naming it is MANIFEST_BLOB_UNKNOWN, so the client
// uploads it again and it is pushed content (never evicted) once more.
func TestCollectedPushedBlobIsNotHeldAfterAPullRefillsIt(t *testing.T) {
	e := newLifeEnv(t, cache.Options{GCGrace: time.Hour})
	config, layer := randomBytes(t, 1000), randomBytes(t, 64<<10)
	d := digest.FromBytes(layer)
	for _, b := range [][]byte{config, layer} {
		if err := pushMonolithic(e.srv.URL, "local/app", digest.FromBytes(b), b); err != nil {
			t.Fatal(err)
		}
	}
	e.clock.Advance(2 * time.Hour)
	if _, err := e.store.GC(cache.GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.StatBlob(d); err == nil {
		t.Fatal("GC kept a pushed blob no manifest referenced, past its grace")
	}
	// The same bytes arrive as pulled content.
	e.up.pushBlobTo(t, "lib/base", layer)
	e.pullBlob(t, "lib/base", d, layer)
	e.waitStored(t, d)

	expectError(t, "HEAD", e.srv.URL+"/v2/local/app/blobs/"+string(d), nil, http.StatusNotFound, "")
	if err := pushMonolithic(e.srv.URL, "local/app", digest.FromBytes(config), config); err != nil {
		t.Fatal(err)
	}
	man := imageManifest(config, layer)
	expectErrorBody(t, "PUT", e.srv.URL+"/v2/local/app/manifests/v1", man,
		http.Header{"Content-Type": {"application/vnd.oci.image.manifest.v1+json"}}, http.StatusBadRequest, "MANIFEST_BLOB_UNKNOWN")
	// The client uploads it again: pushed, and so never evicted.
	if err := pushMonolithic(e.srv.URL, "local/app", d, layer); err != nil {
		t.Fatal(err)
	}
	resp, err := putManifest(e.srv.URL, "local/app", "v1", man)
	if err != nil {
		t.Fatal(err)
	}
	if err := want(resp, http.StatusCreated); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Evict(0, false); err != nil {
		t.Fatal(err)
	}
	e.pullBlob(t, "local/app", d, layer)
}

// Item 8: the admin calls that remove content are refused without
// authentication unless the operator opened them, and GC's grace has a
// floor (Options.MinGCGrace, --gc-min-grace).
func TestAdminGCNeedsOptInWithoutAuth(t *testing.T) {
	e := newLifeEnv(t, cache.Options{})
	for _, path := range []string{"/v2/_slipway/gc", "/v2/_slipway/gc?grace=1s", "/v2/_slipway/gc?grace=48h", "/v2/_slipway/verify"} {
		expectError(t, "POST", e.srv.URL+path, nil, http.StatusForbidden, "DENIED")
	}
	if resp := do(t, "GET", e.srv.URL+"/v2/_slipway/stats", nil); resp.StatusCode != http.StatusOK {
		t.Errorf("stats without auth: %d", resp.StatusCode)
	}

	open := newLifeEnv(t, cache.Options{}, func(c *Config) { c.OpenAdmin = true })
	for _, g := range []string{"1s", "59m"} {
		expectError(t, "POST", open.srv.URL+"/v2/_slipway/gc?grace="+g, nil, http.StatusBadRequest, "UNSUPPORTED")
	}
	for _, path := range []string{"/v2/_slipway/gc", "/v2/_slipway/gc?grace=1h", "/v2/_slipway/verify"} {
		if resp := do(t, "POST", open.srv.URL+path, nil); resp.StatusCode != http.StatusOK {
			t.Errorf("POST %s, opened: %d", path, resp.StatusCode)
		}
	}

	authed := newLifeEnv(t, cache.Options{}, func(c *Config) {
		a, err := NewAuth(AuthConfig{Htpasswd: strings.NewReader(htpasswd(t, map[string]string{"admin": "pw"}))})
		if err != nil {
			t.Fatal(err)
		}
		c.Auth = a
	})
	if resp := req(t, "POST", authed.srv.URL+"/v2/_slipway/gc", "admin", "pw"); resp.StatusCode != http.StatusOK {
		t.Errorf("POST gc as a user: %d", resp.StatusCode)
	}
	if resp := req(t, "POST", authed.srv.URL+"/v2/_slipway/gc", "", ""); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST gc without credentials: %d", resp.StatusCode)
	}
}

// Item 9: a manifest's subject and its non-distributable layers are not
// content its repository holds: they are not linked, so an upstream
// repository cannot name a digest stored for someone else and have it
// served.
func TestSubjectAndForeignLayersAreNotLinked(t *testing.T) {
	e := newPushEnv(t, "local")
	secretA, secretB := randomBytes(t, 1000), randomBytes(t, 2000)
	for _, b := range [][]byte{secretA, secretB} {
		if err := pushMonolithic(e.srv.URL, "local/secret", digest.FromBytes(b), b); err != nil {
			t.Fatal(err)
		}
	}
	config := randomBytes(t, 100)
	cd := e.up.pushBlobTo(t, "evil/app", config)
	man := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},`+
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":%q,"size":%d,"urls":["https://example.com/x"]}],`+
		`"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":%q,"size":%d}}`,
		cd, len(config), digest.FromBytes(secretA), len(secretA), digest.FromBytes(secretB), len(secretB)))
	md := digest.FromBytes(man)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/evil/app/manifests/latest" && r.URL.Path != "/v2/evil/app/manifests/"+string(md) {
			return false
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", string(md))
		w.Header().Set("Content-Length", fmt.Sprint(len(man)))
		if r.Method == http.MethodGet {
			w.Write(man)
		}
		return true
	})
	resp := do(t, "GET", e.url("/v2/evil/app/manifests/latest"), nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest: %d", resp.StatusCode)
	}
	for _, b := range [][]byte{secretA, secretB} {
		d := digest.FromBytes(b)
		resp := do(t, "GET", e.url("/v2/evil/app/blobs/"+string(d)), nil)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s under the upstream repository that named it: %d, want 404", d, resp.StatusCode)
		}
		if ok, _ := e.store.Linked(e.up.host, "evil/app", d); ok {
			t.Errorf("%s is linked into the upstream repository", d)
		}
	}
}

// Item 10: an HTTP/1.0 client cannot tell a cut from the end of a body
// without a Content-Length, so it is never streamed an unverified blob
// of unknown length: it gets the verified blob with its length, or an
// error.
func TestHTTP10ClientNeverGetsAnUnverifiedBodyOfUnknownLength(t *testing.T) {
	for _, wrong := range []bool{true, false} {
		t.Run(fmt.Sprintf("wrong bytes %v", wrong), func(t *testing.T) {
			e := newPullEnv(t, false)
			b := randomBytes(t, 256<<10)
			d := digest.FromBytes(b)
			e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path != "/v2/lib/app/blobs/"+string(d) {
					return false
				}
				if r.Method == http.MethodHead {
					w.WriteHeader(http.StatusOK)
					return true
				}
				body := b
				if wrong {
					body = randomBytes(t, len(b))
				}
				w.Header().Set("Content-Type", "application/octet-stream")
				w.WriteHeader(http.StatusOK) // no Content-Length: chunked
				for off := 0; off < len(body); off += 32 << 10 {
					w.Write(body[off : off+32<<10])
					w.(http.Flusher).Flush()
					time.Sleep(5 * time.Millisecond)
				}
				return true
			})
			c, err := net.DialTimeout("tcp", e.host, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			fmt.Fprintf(c, "GET /v2/lib/app/blobs/%s HTTP/1.0\r\nHost: %s\r\n\r\n", d, e.host)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			got, readErr := io.ReadAll(resp.Body)
			if resp.StatusCode == http.StatusOK && readErr == nil && digest.FromBytes(got) != d {
				t.Fatalf("an HTTP/1.0 client got a complete-looking 200 (Content-Length %q) with %d wrong bytes", resp.Header.Get("Content-Length"), len(got))
			}
			if !wrong && (resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Length") != fmt.Sprint(len(b)) || readErr != nil) {
				t.Fatalf("right bytes: status %d, Content-Length %q, read %v", resp.StatusCode, resp.Header.Get("Content-Length"), readErr)
			}
		})
	}
}

// Item 5: a media type that is too long or not a media type is refused
// where it enters: from an upstream's Content-Type it is a bad response
// (nothing stored), from a push a MANIFEST_INVALID.
func TestOverlongMediaTypesAreRefusedWhereTheyEnter(t *testing.T) {
	e := newPushEnv(t, "local")
	config := randomBytes(t, 100)
	e.up.pushBlobTo(t, "lib/app", config)
	man := imageManifest(config)
	md := digest.FromBytes(man)
	long := "application/vnd.oci.image.manifest.v1+json" + strings.Repeat("x", 64<<10)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/lib/app/manifests/v1" {
			return false
		}
		w.Header().Set("Content-Type", long)
		w.Header().Set("Docker-Content-Digest", string(md))
		w.Header().Set("Content-Length", fmt.Sprint(len(man)))
		if r.Method == http.MethodGet {
			w.Write(man)
		}
		return true
	})
	resp := do(t, "GET", e.url("/v2/lib/app/manifests/v1"), nil)
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("a manifest with a %d-byte Content-Type from the upstream: %d, want 502", len(long), resp.StatusCode)
	}
	if _, err := e.store.GetManifest(md); err == nil {
		t.Error("the manifest with the overlong media type was stored")
	}
}
