package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// fakeUpstream is an in-process registry that counts the requests it gets
// and lets a test take over any of them.
type fakeUpstream struct {
	*httptest.Server
	host string
	reg  http.Handler

	mu     sync.Mutex
	counts map[string]int // "METHOD /path"
	accept map[string]string
	hook   func(w http.ResponseWriter, r *http.Request) bool // true: handled
}

func newFakeUpstream(t testing.TB, opts ...registry.Option) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{reg: registry.New(append([]registry.Option{registry.Logger(discardLog())}, opts...)...), counts: map[string]int{}, accept: map[string]string{}}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.Close)
	u.host = strings.TrimPrefix(u.URL, "http://")
	return u
}

func (u *fakeUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.counts[r.Method+" "+r.URL.Path]++
	u.accept[r.Method+" "+r.URL.Path] = r.Header.Get("Accept")
	hook := u.hook
	u.mu.Unlock()
	if hook != nil && hook(w, r) {
		return
	}
	u.reg.ServeHTTP(w, r)
}

func (u *fakeUpstream) setHook(h func(w http.ResponseWriter, r *http.Request) bool) {
	u.mu.Lock()
	u.hook = h
	u.mu.Unlock()
}

func (u *fakeUpstream) count(method, path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[method+" "+path]
}

// countPrefix sums the requests with method whose path starts with prefix.
func (u *fakeUpstream) countPrefix(method, prefix string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for k, c := range u.counts {
		if strings.HasPrefix(k, method+" "+prefix) {
			n += c
		}
	}
	return n
}

func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }

// fakeClock is an injected clock for tag freshness.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// pullEnv is a mirror on loopback in front of a fakeUpstream.
type pullEnv struct {
	up    *fakeUpstream
	store *cache.Store
	fills *upstream.Filler
	clock *fakeClock
	srv   *httptest.Server
	host  string
	dir   string
}

const testTagTTL = time.Minute

// newPullEnv starts the mirror; fillOpts may change the Filler's options.
func newPullEnv(t testing.TB, dockerHub bool, fillOpts ...func(*upstream.FillerOptions)) *pullEnv {
	t.Helper()
	e := &pullEnv{up: newFakeUpstream(t), clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}, dir: t.TempDir()}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if os.Getenv("SLIPWAY_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	st, err := cache.Open(e.dir, cache.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: e.up.URL})
	if err != nil {
		t.Fatal(err)
	}
	fo := upstream.FillerOptions{Logger: log, IdleTimeout: 20 * time.Second}
	for _, o := range fillOpts {
		o(&fo)
	}
	e.fills = upstream.NewFiller(st, fo)
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{Logger: log, TagTTL: testTagTTL, Now: e.clock.Now})
	s, err := New(Config{Store: st, Upstreams: []Upstream{{Proxy: p, DockerHub: dockerHub}}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	e.host = strings.TrimPrefix(e.srv.URL, "http://")
	t.Cleanup(func() {
		e.srv.Close()
		e.fills.Close()
		st.Close()
	})
	return e
}

// pushImage puts img at the fake upstream under repo:tag.
func (e *pullEnv) pushImage(t testing.TB, img v1.Image, ref string) {
	t.Helper()
	if err := crane.Push(img, e.up.host+"/"+ref); err != nil {
		t.Fatal(err)
	}
}

// pushBlob puts b at the fake upstream under repo and returns its digest.
func (e *pullEnv) pushBlob(t testing.TB, repo string, b []byte) digest.Digest {
	t.Helper()
	r, err := name.NewRepository(e.up.host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(r, static.NewLayer(b, types.OCILayer)); err != nil {
		t.Fatal(err)
	}
	return digest.FromBytes(b)
}

func (e *pullEnv) url(path string) string { return e.srv.URL + path }

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// readImage pulls ref through the mirror the way a client does: manifest,
// config, every layer read to the end.
func readImage(t *testing.T, ref string) v1.Image {
	t.Helper()
	img, err := crane.Pull(ref)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	if _, err := img.RawConfigFile(); err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		// ggcr verifies the digest at EOF.
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatalf("read layer: %v", err)
		}
		rc.Close()
	}
	return img
}

func blobDigests(t *testing.T, img v1.Image) []string {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := []string{m.Config.Digest.String()}
	for _, l := range m.Layers {
		out = append(out, l.Digest.String())
	}
	return out
}

func TestPullImageOneUpstreamGETPerBlob(t *testing.T) {
	e := newPullEnv(t, false)
	img, err := random.Image(64<<10, 3)
	if err != nil {
		t.Fatal(err)
	}
	e.pushImage(t, img, "team/app:v1")
	heads := e.up.countPrefix("HEAD", "/v2/team/app/manifests/") // crane.Push asks too

	got := readImage(t, e.host+"/team/app:v1")
	want, _ := img.Digest()
	if d, _ := got.Digest(); d != want {
		t.Fatalf("digest through mirror %s, upstream %s", d, want)
	}
	for _, d := range blobDigests(t, img) {
		if n := e.up.count("GET", "/v2/team/app/blobs/"+d); n != 1 {
			t.Errorf("cold pull: %d upstream GETs of %s, want 1", n, d)
		}
	}
	manifestGets := e.up.countPrefix("GET", "/v2/team/app/manifests/")
	blobGets := e.up.countPrefix("GET", "/v2/team/app/blobs/")

	readImage(t, e.host+"/team/app:v1")
	if n := e.up.countPrefix("GET", "/v2/team/app/blobs/") - blobGets; n != 0 {
		t.Errorf("warm pull made %d upstream blob GETs, want 0", n)
	}
	if n := e.up.countPrefix("GET", "/v2/team/app/manifests/") - manifestGets; n != 0 {
		t.Errorf("warm pull inside the freshness window made %d upstream manifest GETs, want 0", n)
	}
	if n := e.up.countPrefix("HEAD", "/v2/team/app/manifests/") - heads; n != 0 {
		t.Errorf("warm pull inside the freshness window made %d upstream manifest HEADs, want 0", n)
	}
}

func TestPullMultiArchIndex(t *testing.T) {
	e := newPullEnv(t, false)
	idx, err := random.Index(32<<10, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(e.up.host + "/team/multi:v1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}

	pull := func() {
		mref, _ := name.ParseReference(e.host + "/team/multi:v1")
		got, err := remote.Index(mref)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := idx.Digest()
		if d, _ := got.Digest(); d != want {
			t.Fatalf("index digest %s, want %s", d, want)
		}
		im, err := got.IndexManifest()
		if err != nil {
			t.Fatal(err)
		}
		if len(im.Manifests) != 3 {
			t.Fatalf("index has %d manifests, want 3", len(im.Manifests))
		}
		for _, desc := range im.Manifests {
			readImage(t, e.host+"/team/multi@"+desc.Digest.String())
		}
	}
	pull()
	cold := e.up.countPrefix("GET", "/v2/team/multi/blobs/")
	if cold != 3*3 { // each child: config + 2 layers
		t.Errorf("cold pull of the index made %d upstream blob GETs, want 9", cold)
	}
	pull()
	if n := e.up.countPrefix("GET", "/v2/team/multi/blobs/") - cold; n != 0 {
		t.Errorf("warm pull made %d upstream blob GETs, want 0", n)
	}
}

func TestDockerHubNamesGetLibrary(t *testing.T) {
	e := newPullEnv(t, true)
	img, _ := random.Image(1024, 1)
	e.pushImage(t, img, "library/alpine:3")
	got := readImage(t, e.host+"/alpine:3")
	want, _ := img.Digest()
	if d, _ := got.Digest(); d != want {
		t.Fatalf("digest %s, want %s", d, want)
	}
	// Docker's daemon sends library/ itself; both names are one repository.
	readImage(t, e.host+"/library/alpine:3")
	if n := e.up.countPrefix("GET", "/v2/library/alpine/blobs/"); n != 2 {
		t.Errorf("%d upstream blob GETs for two pulls of one image under both names, want 2", n)
	}
}

// holdHook serves blob b for digest d itself: headers and the first half,
// then waits for release before sending the rest.
func holdHook(d digest.Digest, b []byte, release <-chan struct{}) func(http.ResponseWriter, *http.Request) bool {
	return func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+string(d)) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Header().Set("Docker-Content-Digest", string(d))
		w.WriteHeader(http.StatusOK)
		half := len(b) / 2
		w.Write(b[:half])
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return true
		}
		w.Write(b[half:])
		return true
	}
}

func TestColdFillManyClientsOneUpstreamGET(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 8<<20)
	d := e.pushBlob(t, "team/big", b)
	const clients = 32
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- getAndVerify(e.url("/v2/team/big/blobs/"+string(d)), d, int64(len(b)), nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := e.up.count("GET", "/v2/team/big/blobs/"+string(d)); n != 1 {
		t.Errorf("%d clients made %d upstream GETs, want 1", clients, n)
	}
}

// getAndVerify GETs a blob, checks status, length and digest. firstByte, if
// not nil, is called once the first bytes arrived.
func getAndVerify(url string, d digest.Digest, size int64, firstByte func()) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	if resp.ContentLength != size {
		return fmt.Errorf("Content-Length %d, want %d", resp.ContentLength, size)
	}
	h := sha256.New()
	buf := make([]byte, 32<<10)
	n, err := resp.Body.Read(buf)
	if n == 0 && err != nil {
		return fmt.Errorf("first read: %w", err)
	}
	h.Write(buf[:n])
	if firstByte != nil {
		firstByte()
	}
	m, err := io.CopyBuffer(h, resp.Body, buf)
	if err != nil {
		return fmt.Errorf("after %d bytes: %w", int64(n)+m, err)
	}
	if got := digest.NewDigest(digest.SHA256, h); got != d {
		return fmt.Errorf("got %s, want %s", got, d)
	}
	return nil
}

func TestColdFillStreamsToEveryClientWhileItFills(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 64<<20)
	d := digest.FromBytes(b)
	release := make(chan struct{})
	e.up.setHook(holdHook(d, b, release))

	const clients = 32
	var started, done sync.WaitGroup
	started.Add(clients)
	errs := make(chan error, clients)
	for range clients {
		done.Add(1)
		go func() {
			defer done.Done()
			var once sync.Once
			mark := func() { once.Do(started.Done) }
			err := getAndVerify(e.url("/v2/team/big/blobs/"+string(d)), d, int64(len(b)), mark)
			mark() // a failed client must not hang the wait below
			errs <- err
		}()
	}
	allStarted := make(chan struct{})
	go func() { started.Wait(); close(allStarted) }()
	select {
	case <-allStarted:
	case <-time.After(30 * time.Second):
		t.Fatal("not every client received bytes while the upstream was held half way")
	}
	close(release)
	done.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := e.up.count("GET", "/v2/team/big/blobs/"+string(d)); n != 1 {
		t.Errorf("%d clients made %d upstream GETs, want 1", clients, n)
	}
	if _, err := e.store.StatBlob(d); err != nil {
		t.Errorf("blob not stored after the fill: %v", err)
	}
}

func TestWrongBytesFromUpstreamAreNeverServedComplete(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 1<<20)
	d := e.pushBlob(t, "team/app", b)
	bad := bytes.Clone(b)
	bad[len(bad)-1] ^= 0xff
	var corrupt sync.Mutex // held while the upstream lies
	lying := true
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		corrupt.Lock()
		defer corrupt.Unlock()
		if !lying || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, string(d)) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(bad)))
		w.Write(bad)
		return true
	})

	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil)
			if err == nil || strings.Contains(err.Error(), "got sha256:") {
				t.Errorf("a client got a complete response from a lying upstream (err=%v)", err)
			}
		}()
	}
	wg.Wait()
	if _, err := e.store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("wrong bytes were indexed: %v", err)
	}
	waitFor(t, "temp files removed", func() bool { return countFiles(t, filepath.Join(e.dir, "tmp")) == 0 })
	if n := countFiles(t, filepath.Join(e.dir, "blobs")); n != 0 {
		t.Fatalf("%d blob files stored from a lying upstream", n)
	}

	corrupt.Lock()
	lying = false
	corrupt.Unlock()
	if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
		t.Fatalf("pull after the upstream recovered: %v", err)
	}
}

func TestFillOutlivesTheClientThatStartedIt(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 4<<20)
	d := digest.FromBytes(b)
	release := make(chan struct{})
	e.up.setHook(holdHook(d, b, release))

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.url("/v2/team/app/blobs/"+string(d)), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	cancel() // the only client leaves mid-fill
	resp.Body.Close()
	close(release)

	waitFor(t, "blob stored by the fill", func() bool {
		_, err := e.store.StatBlob(d)
		return err == nil
	})
	if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
		t.Fatal(err)
	}
	if n := e.up.count("GET", "/v2/team/app/blobs/"+string(d)); n != 1 {
		t.Errorf("%d upstream GETs, want 1", n)
	}
}

func TestUpstreamDownServesCachedAndFailsClearly(t *testing.T) {
	e := newPullEnv(t, false)
	img, _ := random.Image(1024, 2)
	e.pushImage(t, img, "team/app:v1")
	readImage(t, e.host+"/team/app:v1")
	e.up.Close()
	e.clock.Advance(2 * testTagTTL) // the tag needs revalidation now

	readImage(t, e.host+"/team/app:v1") // stale tag, cached blobs

	resp := do(t, http.MethodHead, e.url("/v2/team/app/manifests/v1"), nil)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("HEAD of a stale tag with the upstream down: %d", resp.StatusCode)
	}
	want, _ := img.Digest()
	if got := resp.Header.Get("Docker-Content-Digest"); got != want.String() {
		t.Errorf("HEAD of a stale tag: digest %q, want %s", got, want)
	}
	expectError(t, http.MethodGet, e.url("/v2/team/app/manifests/v2"), nil, http.StatusServiceUnavailable, "UNAVAILABLE")
	missing := digest.FromString("not cached")
	expectError(t, http.MethodGet, e.url("/v2/team/app/blobs/"+string(missing)), nil, http.StatusServiceUnavailable, "UNAVAILABLE")
}

func TestTagRevalidation(t *testing.T) {
	e := newPullEnv(t, false)
	img1, _ := random.Image(1024, 1)
	e.pushImage(t, img1, "team/app:v1")
	readImage(t, e.host+"/team/app:v1")
	gets := e.up.countPrefix("GET", "/v2/team/app/manifests/")
	heads := e.up.count("HEAD", "/v2/team/app/manifests/v1") // crane.Push asks too

	// Past the window, an unchanged tag costs one HEAD and no GET.
	e.clock.Advance(2 * testTagTTL)
	readImage(t, e.host+"/team/app:v1")
	if n := e.up.count("HEAD", "/v2/team/app/manifests/v1") - heads; n != 1 {
		t.Errorf("revalidation made %d upstream HEADs, want 1", n)
	}
	if n := e.up.countPrefix("GET", "/v2/team/app/manifests/") - gets; n != 0 {
		t.Errorf("revalidation of an unchanged tag made %d upstream GETs, want 0", n)
	}
	// Revalidated: fresh again, no upstream request.
	readImage(t, e.host+"/team/app:v1")
	if n := e.up.count("HEAD", "/v2/team/app/manifests/v1") - heads; n != 1 {
		t.Errorf("a revalidated tag was asked again: %d HEADs", n)
	}

	// The tag moves upstream: inside the window the old digest is served,
	// after it the new one.
	img2, _ := random.Image(1024, 1)
	e.pushImage(t, img2, "team/app:v1")
	d1, _ := img1.Digest()
	d2, _ := img2.Digest()
	if d, _ := readImage(t, e.host+"/team/app:v1").Digest(); d != d1 {
		t.Errorf("inside the window got %s, want the cached %s", d, d1)
	}
	e.clock.Advance(2 * testTagTTL)
	if d, _ := readImage(t, e.host+"/team/app:v1").Digest(); d != d2 {
		t.Errorf("after the window got %s, want the moved tag's %s", d, d2)
	}
}

// containerd pulls with a HEAD by tag, then GETs by digest. The HEAD
// resolves the tag as a GET would: one upstream request for the pair, and
// the tag is cached, so the same pull works once the upstream is down.
func TestContainerdShapedPull(t *testing.T) {
	e := newPullEnv(t, false)
	img, _ := random.Image(1024, 1)
	e.pushImage(t, img, "team/app:v1")
	want, _ := img.Digest()
	raw, _ := img.RawManifest()
	accept := http.Header{"Accept": {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"}}
	heads := e.up.countPrefix("HEAD", "/v2/team/app/manifests/") // crane.Push asks too
	gets := e.up.countPrefix("GET", "/v2/team/app/manifests/")

	pull := func(when string) {
		t.Helper()
		resp := do(t, http.MethodHead, e.url("/v2/team/app/manifests/v1"), accept)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != want.String() || resp.ContentLength != int64(len(raw)) {
			t.Fatalf("%s: HEAD by tag: %d, digest %q, length %d", when, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), resp.ContentLength)
		}
		resp = do(t, http.MethodGet, e.url("/v2/team/app/manifests/"+want.String()), accept)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, raw) {
			t.Fatalf("%s: GET by digest: %d, %d bytes", when, resp.StatusCode, len(body))
		}
	}
	pull("first pull")
	if n := e.up.countPrefix("HEAD", "/v2/team/app/manifests/") - heads; n != 0 {
		t.Errorf("first pull: %d upstream HEADs, want 0 (the tag is fetched with a GET)", n)
	}
	if n := e.up.countPrefix("GET", "/v2/team/app/manifests/") - gets; n != 1 {
		t.Errorf("first pull: %d upstream manifest GETs, want 1", n)
	}
	pull("second pull, inside the tag's window")
	if n := e.up.countPrefix("GET", "/v2/team/app/manifests/") - gets; n != 1 {
		t.Errorf("a fresh tag was fetched again: %d GETs", n)
	}
	e.up.Close()
	e.clock.Advance(2 * testTagTTL)
	pull("upstream down, tag past its window")
}

func TestRateLimitedUpstreamServesStale(t *testing.T) {
	e := newPullEnv(t, false)
	img, _ := random.Image(1024, 1)
	e.pushImage(t, img, "team/app:v1")
	readImage(t, e.host+"/team/app:v1")
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
		return true
	})
	e.clock.Advance(2 * testTagTTL)
	want, _ := img.Digest()
	if d, _ := readImage(t, e.host+"/team/app:v1").Digest(); d != want {
		t.Fatalf("got %s, want the stale %s", d, want)
	}
	resp := expectError(t, http.MethodGet, e.url("/v2/team/app/manifests/other"), nil, http.StatusTooManyRequests, "TOOMANYREQUESTS")
	if resp.Header.Get("Retry-After") != "30" {
		t.Errorf("Retry-After %q, want the upstream's 30", resp.Header.Get("Retry-After"))
	}
}

func TestHeadUncachedBlobStoresNothing(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 100_000)
	d := e.pushBlob(t, "team/app", b)
	resp := do(t, http.MethodHead, e.url("/v2/team/app/blobs/"+string(d)), nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HEAD: %d", resp.StatusCode)
	}
	if resp.ContentLength != int64(len(b)) || resp.Header.Get("Docker-Content-Digest") != string(d) {
		t.Errorf("HEAD headers: length %d digest %q", resp.ContentLength, resp.Header.Get("Docker-Content-Digest"))
	}
	if n := e.up.count("GET", "/v2/team/app/blobs/"+string(d)); n != 0 {
		t.Errorf("HEAD made %d upstream GETs", n)
	}
	if _, err := e.store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("HEAD stored the blob: %v", err)
	}
	if n := countFiles(t, filepath.Join(e.dir, "tmp")); n != 0 {
		t.Errorf("HEAD left %d temp files", n)
	}
	expectError(t, http.MethodHead, e.url("/v2/team/app/blobs/"+string(digest.FromString("nope"))), nil, http.StatusNotFound, "")
}

func TestCachedBlobRangeAndConditional(t *testing.T) {
	e := newPullEnv(t, false)
	b := randomBytes(t, 100_000)
	d := e.pushBlob(t, "team/app", b)
	if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
		t.Fatal(err)
	}
	// The client has all bytes once they verify; the fill commits after.
	waitFor(t, "blob stored", func() bool { _, err := e.store.StatBlob(d); return err == nil })
	resp := do(t, http.MethodGet, e.url("/v2/team/app/blobs/"+string(d)), http.Header{"Range": {"bytes=10-19"}})
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, b[10:20]) {
		t.Errorf("Range: status %d, %d bytes", resp.StatusCode, len(body))
	}
	resp = do(t, http.MethodGet, e.url("/v2/team/app/blobs/"+string(d)), http.Header{"If-None-Match": {`"` + string(d) + `"`}})
	if resp.StatusCode != http.StatusNotModified {
		t.Errorf("If-None-Match: status %d, want 304", resp.StatusCode)
	}
	resp = do(t, http.MethodHead, e.url("/v2/team/app/blobs/"+string(d)), nil)
	if resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(b)) {
		t.Errorf("HEAD of a cached blob: %d, length %d", resp.StatusCode, resp.ContentLength)
	}
}

func TestManifestAcceptPassedThrough(t *testing.T) {
	e := newPullEnv(t, false)
	img, _ := random.Image(1024, 1)
	e.pushImage(t, img, "team/app:v1")
	accept := "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
	resp := do(t, http.MethodGet, e.url("/v2/team/app/manifests/v1"), http.Header{"Accept": {accept}})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %d", resp.StatusCode)
	}
	e.up.mu.Lock()
	got := e.up.accept["GET /v2/team/app/manifests/v1"]
	e.up.mu.Unlock()
	if got != accept {
		t.Errorf("upstream got Accept %q, want the client's %q", got, accept)
	}
	want, _ := img.Digest()
	for k, v := range map[string]string{
		"Docker-Content-Digest": want.String(),
		"Content-Type":          string(types.DockerManifestSchema2),
	} {
		if resp.Header.Get(k) != v {
			t.Errorf("%s: %q, want %q", k, resp.Header.Get(k), v)
		}
	}
}

func TestBadInput(t *testing.T) {
	e := newPullEnv(t, false)
	img, _ := random.Image(1024, 1)
	e.pushImage(t, img, "team/app:v1")
	huge := bytes.Repeat([]byte(" "), upstream.MaxManifestSize+1)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/v2/team/huge/manifests/") {
			return false
		}
		w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
		w.Write(huge)
		return true
	})
	sha512 := "sha512:" + strings.Repeat("ab", 64)
	cases := []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/Team/App/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/team/../app/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/team/./app/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/team//app/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/-team/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/" + strings.Repeat("a", 256) + "/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/manifests/bad!tag", 400, "TAG_INVALID"},
		{"GET", "/v2/team/app/manifests/" + strings.Repeat("t", 129), 400, "TAG_INVALID"},
		{"GET", "/v2/team/app/manifests/sha256:xyz", 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/sha256:" + strings.Repeat("A", 64), 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/sha384:" + strings.Repeat("a", 96), 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/../../etc/passwd", 404, "NOT_FOUND"},
		{"GET", "/v2/team/app/blobs/" + sha512, 404, "BLOB_UNKNOWN"},
		{"GET", "/v2/team/app/manifests/missing", 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/team/app/manifests/" + sha512, 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/team/app/nothing/here", 404, "NOT_FOUND"},
		{"GET", "/v2/team/app/blobs/uploads/../x", 404, "NOT_FOUND"},
		{"GET", "/v3/", 404, "NOT_FOUND"},
		{"GET", "/index.html", 404, "NOT_FOUND"}, // "/" is the status page
		{"GET", "/v2/team/app/manifests/v1?ns=evil.example.com", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/team/huge/manifests/v1", 502, "UNAVAILABLE"},
		{"POST", "/v2/team/app/manifests/v1", 405, "UNSUPPORTED"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			expectError(t, c.method, e.url(c.path), nil, c.status, c.code)
		})
	}
	// Unknown query parameters are ignored.
	resp := do(t, http.MethodGet, e.url("/v2/team/app/manifests/v1?foo=bar&ns="), nil)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("unknown query parameters: %d", resp.StatusCode)
	}
}

func TestBaseEndpoint(t *testing.T) {
	e := newPullEnv(t, false)
	for _, p := range []string{"/v2/", "/v2"} {
		resp := do(t, http.MethodGet, e.url(p), nil)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
			t.Errorf("GET %s: %d %q", p, resp.StatusCode, resp.Header.Get("Docker-Distribution-API-Version"))
		}
	}
}

// do sends one request without a body (see send) and returns the response
// with its body read.
func do(t *testing.T, method, url string, h http.Header) *http.Response {
	t.Helper()
	return send(t, method, url, nil, h)
}

// expectError checks status and the OCI error body's first code (HEAD: no
// body at all).
func expectError(t *testing.T, method, url string, h http.Header, status int, code string) *http.Response {
	t.Helper()
	return expectErrorBody(t, method, url, nil, h, status, code)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 1000 && time.Now().Before(deadline); i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for: %s", what)
}

func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			n++
		}
		return nil
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return n
}

// A Range GET of a blob not cached yet waits for the fill to store it and
// answers 206 from the stored file. The fill's last bytes reach its reader
// before the fill has left the fills in flight, so "open it again" must
// wait for that, not join the ending fill and give up (the fleet's
// conformance run got 503 "being fetched again" so).
func TestRangeOfAnUncachedBlobIsServedOnceStored(t *testing.T) {
	e := newPullEnv(t, false)
	for i := range 40 {
		b := randomBytes(t, 64<<10+i)
		d := e.pushBlob(t, "team/app", b)
		resp := do(t, http.MethodGet, e.url("/v2/team/app/blobs/"+string(d)), http.Header{"Range": {"bytes=10-19"}})
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, b[10:20]) {
			t.Fatalf("blob %d: Range of an uncached blob: %d %s", i, resp.StatusCode, body)
		}
	}
}

// The client's Accept lines become the manifest types slipway knows, each
// once, in the client's order; ranges stand for every type they cover.
func TestAcceptsKnownTypesOnce(t *testing.T) {
	const (
		oci   = "application/vnd.oci.image.manifest.v1+json"
		index = "application/vnd.oci.image.index.v1+json"
		d2    = "application/vnd.docker.distribution.manifest.v2+json"
	)
	for _, c := range []struct {
		lines []string
		want  []string
	}{
		{nil, nil},
		{[]string{""}, nil},
		{[]string{"text/html"}, nil},
		{[]string{oci, index}, []string{oci, index}},
		{[]string{oci + ", " + d2 + ";q=0.5", oci}, []string{oci, d2}},
		{[]string{",," + strings.ToUpper(index) + ",garbage/,"}, []string{index}},
		{[]string{d2, "application/*"}, append([]string{d2}, slices.DeleteFunc(slices.Clone(upstream.AcceptedTypes), func(s string) bool { return s == d2 })...)},
		{[]string{"*/*"}, upstream.AcceptedTypes},
	} {
		r := httptest.NewRequest(http.MethodGet, "/v2/a/manifests/v1", nil)
		r.Header["Accept"] = c.lines
		if got := accepts(r); !slices.Equal(got, c.want) {
			t.Errorf("Accept %q: %q, want %q", c.lines, got, c.want)
		}
	}
}
