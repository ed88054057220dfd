package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// pushEnv is a mirror on loopback that is a push target too, in front of a
// fakeUpstream (the default upstream, also named "upstream").
type pushEnv struct {
	t        *testing.T
	up       *fakeUpstream
	dir      string
	prefixes []string
	readOnly bool

	store *cache.Store
	fills *upstream.Filler
	push  *push.Manager
	srv   *httptest.Server
	host  string
}

func newPushEnv(t *testing.T, prefixes ...string) *pushEnv {
	t.Helper()
	e := &pushEnv{t: t, up: newFakeUpstream(t), dir: t.TempDir(), prefixes: prefixes}
	e.open()
	t.Cleanup(e.close)
	return e
}

// open starts store, manager and server on e.dir; close stops them. A
// close then open is a restart.
func (e *pushEnv) open() {
	t := e.t
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("SLIPWAY_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	st, err := cache.Open(e.dir, cache.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	c, err := upstream.New(upstream.Config{URL: e.up.URL})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	e.fills = upstream.NewFiller(st, upstream.FillerOptions{Logger: log, IdleTimeout: 20 * time.Second})
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{Logger: log})
	e.push, err = push.New(push.Config{Store: st, Logger: log, Prefixes: e.prefixes, ReadOnly: e.readOnly})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Store: st, Upstreams: []Upstream{{Proxy: p, Names: []string{"upstream"}}}, Logger: log, Push: e.push})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	e.host = strings.TrimPrefix(e.srv.URL, "http://")
}

func (e *pushEnv) close() {
	if e.srv == nil {
		return
	}
	e.srv.Close()
	e.fills.Close()
	e.push.Close()
	e.store.Close()
	e.srv = nil
}

func (e *pushEnv) url(path string) string { return e.srv.URL + path }

// send sends one request with a body and returns the response, body read.
func send(t *testing.T, method, url string, body []byte, h http.Header) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp
}

// sendErr is send for goroutines: it returns errors instead of failing.
func sendErr(method, url string, body []byte, h http.Header) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, r)
	if err != nil {
		return nil, err
	}
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp, err
}

func want(resp *http.Response, status int) error {
	if resp.StatusCode != status {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s %s: status %d, want %d: %s", resp.Request.Method, resp.Request.URL.Path, resp.StatusCode, status, b)
	}
	return nil
}

// The three ways to push a blob, as a client would do them.

func pushSinglePOST(base, repo string, d digest.Digest, b []byte) error {
	resp, err := sendErr("POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+string(d), b, http.Header{"Content-Type": {"application/octet-stream"}})
	if err != nil {
		return err
	}
	return want(resp, http.StatusCreated)
}

func startUpload(base, repo string) (string, error) {
	resp, err := sendErr("POST", base+"/v2/"+repo+"/blobs/uploads/", nil, nil)
	if err != nil {
		return "", err
	}
	if err := want(resp, http.StatusAccepted); err != nil {
		return "", err
	}
	loc := resp.Header.Get("Location")
	if loc == "" || resp.Header.Get("Docker-Upload-UUID") == "" || resp.Header.Get("Range") != "0-0" {
		return "", fmt.Errorf("POST: Location %q, Docker-Upload-UUID %q, Range %q", loc, resp.Header.Get("Docker-Upload-UUID"), resp.Header.Get("Range"))
	}
	return base + loc, nil
}

func withDigest(loc string, d digest.Digest) string {
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	return loc + sep + "digest=" + string(d)
}

func pushMonolithic(base, repo string, d digest.Digest, b []byte) error {
	loc, err := startUpload(base, repo)
	if err != nil {
		return err
	}
	resp, err := sendErr("PUT", withDigest(loc, d), b, http.Header{"Content-Type": {"application/octet-stream"}})
	if err != nil {
		return err
	}
	return want(resp, http.StatusCreated)
}

// pushChunked sends b in chunks PATCHes with Content-Range, then a PUT
// with no body.
func pushChunked(base, repo string, d digest.Digest, b []byte, chunks int) error {
	loc, err := startUpload(base, repo)
	if err != nil {
		return err
	}
	size := (len(b) + chunks - 1) / chunks
	for off := 0; off < len(b); off += size {
		end := min(off+size, len(b))
		resp, err := sendErr("PATCH", loc, b[off:end], http.Header{
			"Content-Type":  {"application/octet-stream"},
			"Content-Range": {fmt.Sprintf("%d-%d", off, end-1)},
		})
		if err != nil {
			return err
		}
		if err := want(resp, http.StatusAccepted); err != nil {
			return err
		}
		if r := resp.Header.Get("Range"); r != fmt.Sprintf("0-%d", end-1) {
			return fmt.Errorf("PATCH: Range %q after %d bytes", r, end)
		}
		loc = base + resp.Header.Get("Location")
	}
	resp, err := sendErr("PUT", withDigest(loc, d), nil, nil)
	if err != nil {
		return err
	}
	return want(resp, http.StatusCreated)
}

// The seed bug: 16 clients push one blob at once, by single POST,
// monolithic POST+PUT and chunked PATCHes, into four repositories, while a
// pull-through fill of the same digest runs. Every one succeeds, and the
// store holds one file and one index entry.
func TestConcurrentPushesOfOneBlob(t *testing.T) {
	e := newPushEnv(t)
	b := randomBytes(t, 3<<20)
	d := e.up.pushBlobTo(t, "up/base", b)

	const n = 16
	start := make(chan struct{})
	errs := make(chan error, n+1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			repo := fmt.Sprintf("ci/app%d", i%4)
			var err error
			switch i % 3 {
			case 0:
				err = pushSinglePOST(e.srv.URL, repo, d, b)
			case 1:
				err = pushMonolithic(e.srv.URL, repo, d, b)
			default:
				err = pushChunked(e.srv.URL, repo, d, b, 3)
			}
			errs <- err
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-start
		resp, err := sendErr("GET", e.url("/v2/up/base/blobs/"+string(d)), nil, nil)
		if err == nil {
			err = want(resp, http.StatusOK)
		}
		if err == nil {
			if got, _ := io.ReadAll(resp.Body); !bytes.Equal(got, b) {
				err = fmt.Errorf("fill: %d bytes, not the blob", len(got))
			}
		}
		errs <- err
	}()
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := countFiles(t, filepath.Join(e.dir, "blobs")); got != 1 {
		t.Errorf("%d files under blobs/, want 1", got)
	}
	if got := countFiles(t, filepath.Join(e.dir, "tmp")); got != 0 {
		t.Errorf("%d temp files left, want 0", got)
	}
	info, err := e.store.StatBlob(d)
	if err != nil || info.Size != int64(len(b)) || info.Origin != cache.OriginPushed {
		t.Errorf("index entry %+v, %v; want %d bytes, pushed", info, err, len(b))
	}
	for i := range 4 {
		resp := do(t, "GET", e.url(fmt.Sprintf("/v2/ci/app%d/blobs/%s", i, d)), nil)
		if got, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || !bytes.Equal(got, b) {
			t.Errorf("ci/app%d: status %d, %d bytes", i, resp.StatusCode, len(got))
		}
	}
}

// total is how many requests the upstream got.
func (u *fakeUpstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.counts {
		n += c
	}
	return n
}

// pushBlobTo is fakeUpstream's pushBlob for a pushEnv.
func (u *fakeUpstream) pushBlobTo(t *testing.T, repo string, b []byte) digest.Digest {
	t.Helper()
	e := &pullEnv{up: u}
	return e.pushBlob(t, repo, b)
}

// BuildKit's way: the small config blob by a single POST, layers chunked,
// then the manifest; the whole image then pulls back. Pushing it again
// (crane) is no error.
func TestSinglePOSTConfigThenPullImage(t *testing.T) {
	e := newPushEnv(t)
	img, err := random.Image(200<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, _ := img.RawConfigFile()
	cfgDigest, _ := img.ConfigName()
	if err := pushSinglePOST(e.srv.URL, "ci/build", digest.Digest(cfgDigest.String()), cfg); err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		rc, _ := l.Compressed()
		b, _ := io.ReadAll(rc)
		rc.Close()
		ld, _ := l.Digest()
		if err := pushChunked(e.srv.URL, "ci/build", digest.Digest(ld.String()), b, 4); err != nil {
			t.Fatal(err)
		}
	}
	raw, _ := img.RawManifest()
	resp := send(t, "PUT", e.url("/v2/ci/build/manifests/v1"), raw, http.Header{"Content-Type": {string(types.OCIManifestSchema1)}})
	if err := want(resp, http.StatusCreated); err != nil {
		t.Fatal(err)
	}
	wantDigest, _ := img.Digest()
	if resp.Header.Get("Docker-Content-Digest") != wantDigest.String() ||
		resp.Header.Get("Location") != "/v2/ci/build/manifests/"+wantDigest.String() {
		t.Errorf("manifest PUT: Docker-Content-Digest %q, Location %q", resp.Header.Get("Docker-Content-Digest"), resp.Header.Get("Location"))
	}
	got := readImage(t, e.host+"/ci/build:v1")
	if d, _ := got.Digest(); d != wantDigest {
		t.Fatalf("pulled %s, pushed %s", d, wantDigest)
	}
	for range 2 {
		if err := crane.Push(img, e.host+"/ci/build:v1"); err != nil {
			t.Fatalf("pushing the same image again: %v", err)
		}
	}
	if e.up.total() != 0 {
		t.Errorf("the upstream was asked about a local repository")
	}
}

// Real clients: crane push and copy (from the upstream, and from a name
// proxied by the mirror into a local one), pulled back by digest. The push
// prefix makes ci/* local before anything is pushed there: without it, the
// client's first HEADs for a new name go to the default upstream, and the
// fake upstream (go-containerregistry's registry) has one blob store for
// all repositories, so it would say it has the blobs.
func TestCranePushAndCopy(t *testing.T) {
	e := newPushEnv(t, "ci")
	img, _ := random.Image(64<<10, 3)
	if err := crane.Push(img, e.host+"/ci/crane:v1"); err != nil {
		t.Fatal(err)
	}
	wantDigest, _ := img.Digest()
	if got := readImage(t, e.host+"/ci/crane:v1"); digestOf(got) != wantDigest {
		t.Errorf("crane push: pulled %s, pushed %s", digestOf(got), wantDigest)
	}

	idx, _ := random.Index(16<<10, 2, 2)
	ref, _ := name.ParseReference(e.up.host + "/team/multi:v1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	// Through the mirror's proxied name into a local one: the blobs come
	// by pull-through, then push (or mount).
	if err := crane.Copy(e.host+"/team/multi:v1", e.host+"/ci/multi:v1"); err != nil {
		t.Fatalf("crane copy proxied -> local: %v", err)
	}
	// Straight from the upstream.
	if err := crane.Copy(e.up.host+"/team/multi:v1", e.host+"/ci/multi2:v1"); err != nil {
		t.Fatalf("crane copy upstream -> local: %v", err)
	}
	wantIdx, _ := idx.Digest()
	for _, repo := range []string{"ci/multi", "ci/multi2"} {
		got, err := crane.Digest(e.host + "/" + repo + ":v1")
		if err != nil || got != wantIdx.String() {
			t.Errorf("%s: digest %s (%v), want %s", repo, got, err, wantIdx)
		}
		mref, _ := name.ParseReference(e.host + "/" + repo + ":v1")
		ri, err := remote.Index(mref)
		if err != nil {
			t.Fatal(err)
		}
		im, _ := ri.IndexManifest()
		for _, desc := range im.Manifests {
			readImage(t, e.host+"/"+repo+"@"+desc.Digest.String())
		}
	}
	// Local to local: mounts.
	if err := crane.Copy(e.host+"/ci/crane:v1", e.host+"/ci/crane-copy:v1"); err != nil {
		t.Fatal(err)
	}
	if got, _ := crane.Digest(e.host + "/ci/crane-copy:v1"); got != wantDigest.String() {
		t.Errorf("local copy: %s, want %s", got, wantDigest)
	}
}

func digestOf(img v1.Image) v1.Hash {
	d, _ := img.Digest()
	return d
}

// skopeo copy from an OCI layout into the mirror, and back out.
func TestSkopeoCopy(t *testing.T) {
	skopeo, err := exec.LookPath("skopeo")
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skip("skopeo is not installed (CI installs it)")
		}
		t.Fatal("skopeo is not installed; .ci/run installs it")
	}
	e := newPushEnv(t)
	img, _ := random.Image(32<<10, 2)
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	dir := t.TempDir()
	p, err := layout.Write(filepath.Join(dir, "src"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, skopeo, args...)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("skopeo %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("copy", "--preserve-digests", "--dest-tls-verify=false", "oci:"+filepath.Join(dir, "src")+":v1", "docker://"+e.host+"/ci/skopeo:v1")
	wantDigest, _ := img.Digest()
	if got, err := crane.Digest(e.host + "/ci/skopeo:v1"); err != nil || got != wantDigest.String() {
		t.Fatalf("after skopeo copy: %s (%v), want %s", got, err, wantDigest)
	}
	run("copy", "--preserve-digests", "--src-tls-verify=false", "docker://"+e.host+"/ci/skopeo:v1", "dir:"+filepath.Join(dir, "back"))
	raw, err := os.ReadFile(filepath.Join(dir, "back", "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if got := digest.FromBytes(raw); got.String() != wantDigest.String() {
		t.Errorf("skopeo pulled %s, want %s", got, wantDigest)
	}
}

// Bad input: each gets the spec's status and code, and nothing is stored.
func TestPushBadInput(t *testing.T) {
	e := newPushEnv(t)
	good := randomBytes(t, 4096)
	gd := digest.FromBytes(good)
	other := digest.FromBytes([]byte("something else"))
	octet := http.Header{"Content-Type": {"application/octet-stream"}}

	t.Run("single POST, wrong digest", func(t *testing.T) {
		expectErrorBody(t, "POST", e.url("/v2/ci/bad/blobs/uploads/?digest="+string(other)), good, octet, 400, "DIGEST_INVALID")
	})
	t.Run("POST+PUT, wrong digest", func(t *testing.T) {
		loc, err := startUpload(e.srv.URL, "ci/bad")
		if err != nil {
			t.Fatal(err)
		}
		expectErrorBody(t, "PUT", withDigest(loc, other), good, octet, 400, "DIGEST_INVALID")
		// The session is over: nothing half-stored to finish.
		expectErrorBody(t, "PUT", withDigest(loc, gd), nil, nil, 404, "BLOB_UPLOAD_UNKNOWN")
	})
	t.Run("sha512, wrong digest", func(t *testing.T) {
		d := digest.SHA512.FromBytes([]byte("x"))
		expectErrorBody(t, "POST", e.url("/v2/ci/bad/blobs/uploads/?digest="+string(d)), good, octet, 400, "DIGEST_INVALID")
	})
	t.Run("PUT without digest", func(t *testing.T) {
		loc, _ := startUpload(e.srv.URL, "ci/bad")
		expectErrorBody(t, "PUT", loc, good, octet, 400, "DIGEST_INVALID")
		if err := want(send(t, "DELETE", loc, nil, nil), 204); err != nil {
			t.Error(err)
		}
	})
	t.Run("Content-Range gap and overlap", func(t *testing.T) {
		loc, err := startUpload(e.srv.URL, "ci/bad")
		if err != nil {
			t.Fatal(err)
		}
		patch := func(from, to int) *http.Response {
			return send(t, "PATCH", loc, good[from:to], http.Header{"Content-Range": {fmt.Sprintf("%d-%d", from, to-1)}})
		}
		if err := want(patch(0, 1000), 202); err != nil {
			t.Fatal(err)
		}
		for _, c := range [][2]int{{1500, 2000}, {500, 1500}, {0, 1000}} {
			resp := expectErrorBody(t, "PATCH", loc, good[c[0]:c[1]], http.Header{"Content-Range": {fmt.Sprintf("%d-%d", c[0], c[1]-1)}}, 416, "BLOB_UPLOAD_INVALID")
			if resp.Header.Get("Range") != "0-999" || resp.Header.Get("Location") == "" {
				t.Errorf("416: Range %q, Location %q; want 0-999 and the upload", resp.Header.Get("Range"), resp.Header.Get("Location"))
			}
		}
		// A range that disagrees with the body's length.
		expectErrorBody(t, "PATCH", loc, good[1000:1100], http.Header{"Content-Range": {"1000-1999"}}, 416, "BLOB_UPLOAD_INVALID")
		expectErrorBody(t, "PATCH", loc, good[1000:1100], http.Header{"Content-Range": {"garbage"}}, 400, "BLOB_UPLOAD_INVALID")
		// Status is unchanged; the upload goes on.
		st := do(t, "GET", loc, nil)
		if st.StatusCode != 204 || st.Header.Get("Range") != "0-999" {
			t.Errorf("status after bad chunks: %d %q", st.StatusCode, st.Header.Get("Range"))
		}
		if err := want(patch(1000, len(good)), 202); err != nil {
			t.Fatal(err)
		}
		if err := want(send(t, "PUT", withDigest(loc, gd), nil, nil), 201); err != nil {
			t.Fatal(err)
		}
		// Finishing twice.
		expectErrorBody(t, "PUT", withDigest(loc, gd), nil, nil, 404, "BLOB_UPLOAD_UNKNOWN")
	})
	t.Run("unknown upload", func(t *testing.T) {
		u := e.url("/v2/ci/bad/blobs/uploads/0123456789abcdef")
		for _, m := range []string{"GET", "PATCH", "PUT", "DELETE"} {
			url := u
			if m == "PUT" {
				url = withDigest(u, gd)
			}
			expectErrorBody(t, m, url, nil, nil, 404, "BLOB_UPLOAD_UNKNOWN")
		}
		// Another repository's upload is unknown here.
		loc, _ := startUpload(e.srv.URL, "ci/bad")
		id := loc[strings.LastIndex(loc, "/")+1:]
		expectErrorBody(t, "GET", e.url("/v2/ci/other/blobs/uploads/"+id), nil, nil, 404, "BLOB_UPLOAD_UNKNOWN")
		if err := want(send(t, "DELETE", loc, nil, nil), 204); err != nil {
			t.Error(err)
		}
		expectErrorBody(t, "DELETE", loc, nil, nil, 404, "BLOB_UPLOAD_UNKNOWN")
	})

	cfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	cd := digest.FromBytes(cfg)
	if err := pushSinglePOST(e.srv.URL, "ci/bad", cd, cfg); err != nil {
		t.Fatal(err)
	}
	missing := digest.FromBytes([]byte("not pushed"))
	elsewhere := []byte("pushed to another repository")
	if err := pushSinglePOST(e.srv.URL, "ci/other", digest.FromBytes(elsewhere), elsewhere); err != nil {
		t.Fatal(err)
	}
	manifest := func(layer digest.Digest) []byte {
		return []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"%s","digest":"%s","size":%d},"layers":[{"mediaType":"%s","digest":"%s","size":10}]}`,
			types.OCIManifestSchema1, types.OCIConfigJSON, cd, len(cfg), types.OCILayer, layer))
	}
	oci := http.Header{"Content-Type": {string(types.OCIManifestSchema1)}}
	manifests := []struct {
		name   string
		ref    string
		body   []byte
		h      http.Header
		status int
		code   string
	}{
		{"missing layer", "v1", manifest(missing), oci, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"layer of another repository", "v1", manifest(digest.FromBytes(elsewhere)), oci, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"invalid JSON", "v1", []byte(`{"schemaVersion":2,`), oci, 400, "MANIFEST_INVALID"},
		{"not a manifest", "v1", []byte(`{"schemaVersion":2}`), oci, 400, "MANIFEST_INVALID"},
		{"bad descriptor digest", "v1", bytes.Replace(manifest(missing), []byte(missing.String()), []byte("sha256:abc"), 1), oci, 400, "MANIFEST_INVALID"},
		{"media type mismatch", "v1", manifest(missing), http.Header{"Content-Type": {string(types.OCIImageIndex)}}, 400, "MANIFEST_INVALID"},
		{"unsupported media type", "v1", []byte(`{"schemaVersion":2}`), http.Header{"Content-Type": {"text/plain"}}, 400, "MANIFEST_INVALID"},
		{"index of unknown manifests", "v1", []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"%s","manifests":[{"mediaType":"%s","digest":"%s","size":5}]}`, types.OCIImageIndex, types.OCIManifestSchema1, missing)), nil, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"digest mismatch", string(missing), manifest(missing), oci, 400, "DIGEST_INVALID"},
		{"oversize", "v1", bytes.Repeat([]byte(" "), push.MaxManifestSize+1), oci, 413, "SIZE_INVALID"},
		{"bad ?tag=", "sha256:" + strings.Repeat("a", 64) + "?tag=bad!tag", manifest(missing), oci, 400, "TAG_INVALID"},
	}
	for _, c := range manifests {
		t.Run("manifest "+c.name, func(t *testing.T) {
			expectErrorBody(t, "PUT", e.url("/v2/ci/bad/manifests/"+c.ref), c.body, c.h, c.status, c.code)
		})
	}
	expectError(t, "GET", e.url("/v2/ci/bad/manifests/v1"), nil, 404, "MANIFEST_UNKNOWN")
	expectError(t, "GET", e.url("/v2/ci/bad/blobs/"+string(missing)), nil, 404, "BLOB_UNKNOWN")

	// Nothing of the above is stored: the good blob, the config, the blob
	// of ci/other, and no temp files.
	if got := countFiles(t, filepath.Join(e.dir, "blobs")); got != 3 {
		t.Errorf("%d blob files, want 3 (the good blob, the config, ci/other's)", got)
	}
	if got := countFiles(t, filepath.Join(e.dir, "tmp")); got != 0 {
		t.Errorf("%d temp files left", got)
	}
	for _, d := range []digest.Digest{other, missing} {
		if _, err := e.store.StatBlob(d); err == nil {
			t.Errorf("%s is stored", d)
		}
	}
	if tags, _ := e.push.Tags("ci/bad", "", -1); len(tags) != 0 {
		t.Errorf("tags %v after only failed manifest pushes", tags)
	}
}

// A push never goes to a proxied name.
func TestPushToProxiedNameIsDenied(t *testing.T) {
	e := newPushEnv(t)
	img, _ := random.Image(1024, 1)
	(&pullEnv{up: e.up}).pushImage(t, img, "team/app:v1")
	readImage(t, e.host+"/team/app:v1") // pulled through: team/app is proxied now
	b := []byte("payload")
	d := digest.FromBytes(b)
	octet := http.Header{"Content-Type": {"application/octet-stream"}}
	for _, path := range []string{
		"/v2/team/app/blobs/uploads/?digest=" + string(d),          // pulled through
		"/v2/upstream/team/new/blobs/uploads/?digest=" + string(d), // names the upstream
		"/v2/ci/app/blobs/uploads/?ns=" + e.up.host + "&digest=" + string(d),
	} {
		expectErrorBody(t, "POST", e.url(path), b, octet, 403, "DENIED")
	}
	raw, _ := img.RawManifest()
	expectErrorBody(t, "PUT", e.url("/v2/team/app/manifests/v1"), raw, http.Header{"Content-Type": {string(types.DockerManifestSchema2)}}, 403, "DENIED")
	wantDigest, _ := img.Digest()
	expectErrorBody(t, "DELETE", e.url("/v2/team/app/manifests/"+wantDigest.String()), nil, nil, 403, "DENIED")
	if _, err := e.store.StatBlob(d); err == nil {
		t.Error("a denied push was stored")
	}
	if got := readImage(t, e.host+"/team/app:v1"); digestOf(got) != wantDigest {
		t.Error("the proxied image changed")
	}

	// With push prefixes, only they may be pushed to, and they are local.
	p := newPushEnv(t, "ci", "team-b/")
	expectErrorBody(t, "POST", p.url("/v2/other/app/blobs/uploads/?digest="+string(d)), b, octet, 403, "DENIED")
	expectErrorBody(t, "POST", p.url("/v2/cix/app/blobs/uploads/?digest="+string(d)), b, octet, 403, "DENIED")
	for _, repo := range []string{"ci", "ci/app", "team-b/x"} {
		if err := pushSinglePOST(p.srv.URL, repo, d, b); err != nil {
			t.Error(err)
		}
	}
	// A claimed name is local even before anything was pushed: the
	// upstream is never asked.
	before := p.up.total()
	expectError(t, "GET", p.url("/v2/ci/nothing/manifests/v1"), nil, 404, "MANIFEST_UNKNOWN")
	expectError(t, "GET", p.url("/v2/ci/nothing/tags/list"), nil, 404, "NAME_UNKNOWN")
	if p.up.total() != before {
		t.Error("a read of a push-prefix name went to the upstream")
	}

	// Pushes disabled: 405.
	off := newPullEnv(t, false)
	expectErrorBody(t, "POST", off.url("/v2/ci/app/blobs/uploads/"), nil, nil, 405, "UNSUPPORTED")

	// Read only (slipway serve --push=false): what was pushed before is
	// still served, nothing new is taken.
	p.close()
	p.readOnly = true
	p.open()
	expectErrorBody(t, "POST", p.url("/v2/ci/app/blobs/uploads/"), nil, nil, 405, "UNSUPPORTED")
	expectErrorBody(t, "DELETE", p.url("/v2/ci/app/blobs/"+string(d)), nil, nil, 405, "UNSUPPORTED")
	if resp := do(t, "GET", p.url("/v2/ci/app/blobs/"+string(d)), nil); resp.StatusCode != 200 {
		t.Errorf("read-only: GET of a pushed blob: %d", resp.StatusCode)
	}
}

// A chunked upload goes on after a restart: the store is closed and opened
// again with a new Manager, and the upload finishes with the right digest.
func TestChunkedUploadSurvivesRestart(t *testing.T) {
	e := newPushEnv(t)
	b := randomBytes(t, 1<<20)
	d := digest.FromBytes(b)
	loc, err := startUpload(e.srv.URL, "ci/resume")
	if err != nil {
		t.Fatal(err)
	}
	path := strings.TrimPrefix(loc, e.srv.URL)
	if err := want(send(t, "PATCH", loc, b[:400<<10], http.Header{"Content-Range": {fmt.Sprintf("0-%d", 400<<10-1)}}), 202); err != nil {
		t.Fatal(err)
	}

	e.close()
	e.open()

	loc = e.url(path)
	st := do(t, "GET", loc, nil)
	if st.StatusCode != 204 || st.Header.Get("Range") != fmt.Sprintf("0-%d", 400<<10-1) {
		t.Fatalf("after restart: status %d, Range %q", st.StatusCode, st.Header.Get("Range"))
	}
	// A streamed chunk (no Content-Range), then the last one with the PUT.
	if err := want(send(t, "PATCH", loc, b[400<<10:800<<10], nil), 202); err != nil {
		t.Fatal(err)
	}
	resp := send(t, "PUT", withDigest(loc, d), b[800<<10:], http.Header{"Content-Range": {fmt.Sprintf("%d-%d", 800<<10, len(b)-1)}})
	if err := want(resp, 201); err != nil {
		t.Fatal(err)
	}
	got := do(t, "GET", e.url("/v2/ci/resume/blobs/"+string(d)), nil)
	if body, _ := io.ReadAll(got.Body); !bytes.Equal(body, b) {
		t.Fatalf("resumed blob: %d bytes, not the pushed ones", len(body))
	}
}

// Tags, catalog and referrers list what was pushed, page by page; deletes
// remove tags, manifests and blobs.
func TestListingsAndDeletes(t *testing.T) {
	e := newPushEnv(t)
	img, _ := random.Image(1024, 1)
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	for _, tag := range []string{"a", "b", "c", "d", "e"} {
		if err := crane.Push(img, e.host+"/ci/list:"+tag); err != nil {
			t.Fatal(err)
		}
	}
	for _, repo := range []string{"ci/x", "ci/y"} {
		if err := crane.Push(img, e.host+"/"+repo+":v1"); err != nil {
			t.Fatal(err)
		}
	}
	var all []string
	next := "/v2/ci/list/tags/list?n=2"
	for i := 0; next != "" && i < 10; i++ {
		resp := do(t, "GET", e.url(next), nil)
		var tl struct {
			Name string
			Tags []string
		}
		if err := json.NewDecoder(resp.Body).Decode(&tl); err != nil || tl.Name != "ci/list" || len(tl.Tags) > 2 {
			t.Fatalf("tags page %s: %+v %v", next, tl, err)
		}
		all = append(all, tl.Tags...)
		next = ""
		if l := resp.Header.Get("Link"); l != "" {
			next = strings.TrimSuffix(strings.TrimPrefix(l, "<"), `>; rel="next"`)
		}
	}
	if strings.Join(all, ",") != "a,b,c,d,e" {
		t.Errorf("paged tags %v", all)
	}
	resp := do(t, "GET", e.url("/v2/_catalog?n=2"), nil)
	var cat struct{ Repositories []string }
	json.NewDecoder(resp.Body).Decode(&cat)
	if strings.Join(cat.Repositories, ",") != "ci/list,ci/x" || !strings.Contains(resp.Header.Get("Link"), "last=ci%2Fx") {
		t.Errorf("catalog page: %v, Link %q", cat.Repositories, resp.Header.Get("Link"))
	}

	// Referrers: an artifact whose subject is the image.
	subject, _ := img.Digest()
	raw, _ := img.RawManifest()
	sdesc := v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: subject, Size: int64(len(raw))}
	emptyCfg := []byte("{}")
	if err := pushSinglePOST(e.srv.URL, "ci/list", digest.FromBytes(emptyCfg), emptyCfg); err != nil {
		t.Fatal(err)
	}
	art := fmt.Sprintf(`{"schemaVersion":2,"mediaType":"%s","artifactType":"application/vnd.example.sig","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"%s","size":2},"layers":[],"subject":{"mediaType":"%s","digest":"%s","size":%d},"annotations":{"k":"v"}}`,
		types.OCIManifestSchema1, digest.FromBytes(emptyCfg), sdesc.MediaType, sdesc.Digest, sdesc.Size)
	put := send(t, "PUT", e.url("/v2/ci/list/manifests/sig"), []byte(art), http.Header{"Content-Type": {string(types.OCIManifestSchema1)}})
	if err := want(put, 201); err != nil || put.Header.Get("OCI-Subject") != subject.String() {
		t.Fatalf("artifact PUT: %v, OCI-Subject %q", err, put.Header.Get("OCI-Subject"))
	}
	artDigest := digest.FromString(art)
	for _, c := range []struct {
		query string
		n     int
	}{{"", 1}, {"?artifactType=application/vnd.example.sig", 1}, {"?artifactType=application/other", 0}} {
		resp := do(t, "GET", e.url("/v2/ci/list/referrers/"+subject.String()+c.query), nil)
		var idx v1.IndexManifest
		if err := json.NewDecoder(resp.Body).Decode(&idx); err != nil || resp.StatusCode != 200 {
			t.Fatalf("referrers%s: %d %v", c.query, resp.StatusCode, err)
		}
		if resp.Header.Get("Content-Type") != string(types.OCIImageIndex) || len(idx.Manifests) != c.n {
			t.Errorf("referrers%s: Content-Type %q, %d manifests, want %d", c.query, resp.Header.Get("Content-Type"), len(idx.Manifests), c.n)
		}
		if c.n == 1 && (idx.Manifests[0].Digest.String() != artDigest.String() || idx.Manifests[0].ArtifactType != "application/vnd.example.sig" || idx.Manifests[0].Annotations["k"] != "v") {
			t.Errorf("referrer %+v", idx.Manifests[0])
		}
		if (c.query != "") != (resp.Header.Get("OCI-Filters-Applied") == "artifactType") {
			t.Errorf("referrers%s: OCI-Filters-Applied %q", c.query, resp.Header.Get("OCI-Filters-Applied"))
		}
	}
	// An unknown subject has an empty list, not a 404.
	resp = do(t, "GET", e.url("/v2/ci/list/referrers/"+string(digest.FromString("nothing"))), nil)
	if resp.StatusCode != 200 {
		t.Errorf("referrers of an unknown subject: %d", resp.StatusCode)
	}

	// Deletes.
	if err := want(send(t, "DELETE", e.url("/v2/ci/list/manifests/a"), nil, nil), 202); err != nil {
		t.Error(err)
	}
	expectError(t, "GET", e.url("/v2/ci/list/manifests/a"), nil, 404, "MANIFEST_UNKNOWN")
	if err := want(send(t, "DELETE", e.url("/v2/ci/list/manifests/"+string(artDigest)), nil, nil), 202); err != nil {
		t.Error(err)
	}
	expectError(t, "HEAD", e.url("/v2/ci/list/manifests/sig"), nil, 404, "")
	resp = do(t, "GET", e.url("/v2/ci/list/referrers/"+subject.String()), nil)
	var idx v1.IndexManifest
	json.NewDecoder(resp.Body).Decode(&idx)
	if len(idx.Manifests) != 0 {
		t.Errorf("referrers after deleting the referrer: %v", idx.Manifests)
	}
	if err := want(send(t, "DELETE", e.url("/v2/ci/list/blobs/"+string(digest.FromBytes(emptyCfg))), nil, nil), 202); err != nil {
		t.Error(err)
	}
	expectError(t, "HEAD", e.url("/v2/ci/list/blobs/"+string(digest.FromBytes(emptyCfg))), nil, 404, "")
	expectErrorBody(t, "DELETE", e.url("/v2/ci/list/blobs/"+string(digest.FromBytes(emptyCfg))), nil, nil, 404, "BLOB_UNKNOWN")
	expectErrorBody(t, "DELETE", e.url("/v2/ci/list/manifests/nope"), nil, nil, 404, "MANIFEST_UNKNOWN")
	// Other repositories keep what they share.
	if got, err := crane.Digest(e.host + "/ci/x:v1"); err != nil || got != subject.String() {
		t.Errorf("ci/x after deletes in ci/list: %s %v", got, err)
	}
}

// expectErrorBody is expectError for a request with a body.
func expectErrorBody(t *testing.T, method, url string, body []byte, h http.Header, status int, code string) *http.Response {
	t.Helper()
	resp := send(t, method, url, body, h)
	b, _ := io.ReadAll(resp.Body)
	resp.Body = io.NopCloser(bytes.NewReader(b))
	if resp.StatusCode != status {
		t.Errorf("%s %s: status %d, want %d (body %s)", method, url, resp.StatusCode, status, b)
	}
	if method == http.MethodHead {
		if len(b) != 0 {
			t.Errorf("HEAD %s: error with a body", url)
		}
		return resp
	}
	var eb struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(b, &eb); err != nil || len(eb.Errors) == 0 {
		t.Errorf("%s %s: not an OCI error body: %q", method, url, b)
		return resp
	}
	if eb.Errors[0].Code != code || eb.Errors[0].Message == "" {
		t.Errorf("%s %s: code %q (%q), want %q", method, url, eb.Errors[0].Code, eb.Errors[0].Message, code)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("%s %s: error Content-Type %q", method, url, ct)
	}
	return resp
}
