package mirror

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// lifeEnv is a mirror and push target whose store takes test options (a
// clock, a budget, a failing disk).
type lifeEnv struct {
	up    *fakeUpstream
	dir   string
	store *cache.Store
	srv   *httptest.Server
	clock *fakeClock
}

func newLifeEnv(t *testing.T, o cache.Options, tweaks ...func(*Config)) *lifeEnv {
	t.Helper()
	e := &lifeEnv{up: newFakeUpstream(t), dir: t.TempDir(), clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}}
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("SLIPWAY_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	// Passes run when the test asks, on the test's clock, unless it says
	// otherwise.
	o.Logger = log
	if o.Now == nil {
		o.Now = e.clock.Now
	}
	if o.MaintenanceInterval == 0 {
		o.MaintenanceInterval = time.Hour
	}
	if o.GCEvery == 0 {
		o.GCEvery = -1
	}
	st, err := cache.Open(e.dir, o)
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: e.up.URL})
	if err != nil {
		t.Fatal(err)
	}
	fills := upstream.NewFiller(st, upstream.FillerOptions{Logger: log, IdleTimeout: 20 * time.Second})
	p := upstream.NewProxy(c, st, fills, upstream.ProxyOptions{Logger: log})
	pm, err := push.New(push.Config{Store: st, Logger: log, Prefixes: []string{"local"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Store: st, Upstreams: []Upstream{{Proxy: p}}, Logger: log, Push: pm}
	for _, tw := range tweaks {
		tw(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		e.srv.Close()
		fills.Close()
		pm.Close()
		st.Close()
	})
	return e
}

func (e *lifeEnv) get(t *testing.T, path string) (*http.Response, []byte, error) {
	t.Helper()
	resp, err := http.Get(e.srv.URL + path)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func (e *lifeEnv) pullBlob(t *testing.T, repo string, d digest.Digest, want []byte) {
	t.Helper()
	resp, b, err := e.get(t, "/v2/"+repo+"/blobs/"+string(d))
	if err != nil || resp.StatusCode != 200 || !bytes.Equal(b, want) {
		t.Fatalf("pull %s: %v, status %v, %d bytes", d, err, resp, len(b))
	}
}

// waitStored waits for a fill that delivered its last byte to be indexed.
func (e *lifeEnv) waitStored(t *testing.T, d digest.Digest) {
	t.Helper()
	for range 500 {
		if _, err := e.store.StatBlob(d); err == nil {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("%s never stored", d)
}

type switchableDisk struct {
	w    io.Writer
	mu   *sync.Mutex
	full *bool
}

func (d switchableDisk) Write(p []byte) (int, error) {
	d.mu.Lock()
	full := *d.full
	d.mu.Unlock()
	if full {
		return 0, &os.PathError{Op: "write", Path: "blob", Err: syscall.ENOSPC}
	}
	return d.w.Write(p)
}

// A full disk during a fill and a push: the fill's client is cut (it had
// its headers), later requests get a clear 507 OCI error, nothing partial is
// stored, cached blobs are still served, and once there is room the same
// requests succeed.
func TestNoSpaceFillAndPush(t *testing.T) {
	var mu sync.Mutex
	full := false
	e := newLifeEnv(t, cache.Options{WrapWrite: func(w io.Writer) io.Writer { return switchableDisk{w, &mu, &full} }})
	cached := randomBytes(t, 3000)
	cd := e.up.pushBlobTo(t, "lib/app", cached)
	e.pullBlob(t, "lib/app", cd, cached)
	e.waitStored(t, cd)

	other := randomBytes(t, 5000)
	od := e.up.pushBlobTo(t, "lib/app", other)
	mu.Lock()
	full = true
	mu.Unlock()
	if resp, b, err := e.get(t, "/v2/lib/app/blobs/"+string(od)); err == nil && resp.StatusCode == 200 && bytes.Equal(b, other) {
		t.Fatal("a fill on a full disk delivered the whole blob")
	}
	expectErrorBody(t, "GET", e.srv.URL+"/v2/lib/app/blobs/"+string(od), nil, nil, http.StatusInsufficientStorage, "UNAVAILABLE")
	e.pullBlob(t, "lib/app", cd, cached) // still serving what it has
	pd := digest.FromBytes(other)
	e.clock.Advance(time.Minute)
	if err := pushMonolithic(e.srv.URL, "local/app", pd, other); err == nil {
		t.Fatal("push on a full disk succeeded")
	}
	if _, err := e.store.StatBlob(od); err == nil {
		t.Fatal("indexed after a failed write")
	}
	if ents, _ := os.ReadDir(filepath.Join(e.dir, "tmp")); len(ents) > 1 { // at most the push session's file
		t.Fatalf("temp files left: %d", len(ents))
	}
	mu.Lock()
	full = false
	mu.Unlock()
	e.clock.Advance(time.Minute)
	e.pullBlob(t, "lib/app", od, other)
	if err := pushMonolithic(e.srv.URL, "local/app", pd, other); err != nil {
		t.Fatal(err)
	}
}

// A flipped byte: verify over HTTP finds it and removes the blob, and the
// next pull fills it from the upstream again.
func TestCorruptionRefilledAfterVerify(t *testing.T) {
	e := newLifeEnv(t, cache.Options{}, func(c *Config) { c.OpenAdmin = true })
	b := randomBytes(t, 10000)
	d := e.up.pushBlobTo(t, "lib/app", b)
	e.pullBlob(t, "lib/app", d, b)
	e.waitStored(t, d)
	path := filepath.Join(e.dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded())
	raw, _ := os.ReadFile(path)
	raw[5000] ^= 1
	os.WriteFile(path, raw, 0o644)

	resp, err := http.Post(e.srv.URL+"/v2/_slipway/verify", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		OK       bool
		Blobs    int
		Problems []cache.Problem
	}
	json.NewDecoder(resp.Body).Decode(&r)
	resp.Body.Close()
	if resp.StatusCode != 200 || r.OK || len(r.Problems) != 1 || r.Problems[0].Digest != d {
		t.Fatalf("verify: %d %+v", resp.StatusCode, r)
	}
	before := e.up.count("GET", "/v2/lib/app/blobs/"+string(d))
	e.pullBlob(t, "lib/app", d, b)
	if got := e.up.count("GET", "/v2/lib/app/blobs/"+string(d)); got != before+1 {
		t.Fatalf("upstream GETs %d -> %d, want one refill", before, got)
	}
}

// Pulls over a budget: stats say what eviction would do, the pass brings the
// cache under the low mark, pushed content stays, and an evicted blob is
// pulled again.
func TestEvictionUnderPullsAndStats(t *testing.T) {
	e := newLifeEnv(t, cache.Options{MaxSize: 20000, LowWatermark: 0.5, HighWatermark: 0.8})
	pushed := randomBytes(t, 4000)
	pd := digest.FromBytes(pushed)
	if err := pushMonolithic(e.srv.URL, "local/app", pd, pushed); err != nil {
		t.Fatal(err)
	}
	var blobs [][]byte
	var ds []digest.Digest
	for range 5 {
		e.clock.Advance(time.Minute)
		b := randomBytes(t, 3000)
		d := e.up.pushBlobTo(t, "lib/app", b)
		e.pullBlob(t, "lib/app", d, b)
		e.waitStored(t, d)
		blobs, ds = append(blobs, b), append(ds, d)
	}
	// Past the high mark (16000 of 19000): the maintenance loop was
	// asked for a pass, down to the low mark (10000).
	for i := 0; e.store.Stats().Bytes > 10000; i++ {
		if i > 500 {
			t.Fatalf("%d bytes: no eviction", e.store.Stats().Bytes)
		}
		time.Sleep(2 * time.Millisecond)
	}
	e.pullBlob(t, "lib/app", ds[4], blobs[4]) // a hit
	resp, body, err := e.get(t, "/v2/_slipway/stats")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("stats: %v %v", resp, err)
	}
	var st struct {
		Blobs    int64   `json:"blobs"`
		Bytes    int64   `json:"bytes"`
		Evicted  int64   `json:"evicted_blobs"`
		HitRatio float64 `json:"blob_hit_ratio"`
		Eviction *struct {
			Blobs int `json:"blobs"`
		} `json:"eviction"`
	}
	json.Unmarshal(body, &st)
	if st.Blobs != 3 || st.Bytes != 10000 || st.Evicted != 3 || st.HitRatio != 1.0/6 || st.Eviction == nil || st.Eviction.Blobs != 0 {
		t.Fatalf("stats: %s", body)
	}
	if _, err := e.store.StatBlob(pd); err != nil {
		t.Fatal("pushed blob evicted")
	}
	for i, d := range ds {
		_, err := e.store.StatBlob(d)
		if (err == nil) != (i >= 3) {
			t.Errorf("blob %d present %v", i, err == nil)
		}
	}
	e.pullBlob(t, "lib/app", ds[0], blobs[0])
}
