package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
)

// The seeded upstream: go-containerregistry's in-process registry on
// loopback, with its blobs in a map this process fills directly (a 1 GiB
// blob pushed over HTTP would only cost time), wrapped in a handler that
// counts every request it receives.
type seededUpstream struct {
	URL   string // http://127.0.0.1:port
	blobs *memBlobs
	srv   *http.Server

	mu     sync.Mutex
	counts map[string]int64 // "GET blob sha256:..." -> requests
	total  atomic.Int64

	link link // blob bodies share it when its rate is set
}

// link is the upstream's one network link: blob bodies, however many,
// share rate bytes per second, as they would share a site's internet
// connection. A rate of 0 is loopback speed.
type link struct {
	rate atomic.Int64
	mu   sync.Mutex
	next time.Time // when the link is free again
}

// wait books n bytes on the link and sleeps until they have passed.
func (l *link) wait(n int) {
	rate := l.rate.Load()
	if rate <= 0 {
		return
	}
	l.mu.Lock()
	// Sleeps overshoot: a link idle for a moment may catch up, so that
	// the rate is the rate over time, not per piece.
	if early := time.Now().Add(-20 * time.Millisecond); l.next.Before(early) {
		l.next = early
	}
	l.next = l.next.Add(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
	until := l.next
	l.mu.Unlock()
	time.Sleep(time.Until(until))
}

// throttled writes through the link in 256 KiB pieces.
type throttled struct {
	http.ResponseWriter
	l *link
}

func (t throttled) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), 256<<10)
		t.l.wait(n)
		m, err := t.ResponseWriter.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// The repositories and tag the scenarios use.
const (
	repoWarm = "bench/warm"
	repoCold = "bench/cold"
	repoPush = "bench/push"
	tagWarm  = "latest"
)

// memBlobs is a registry.BlobHandler (with Stat and Put) over a map.
type memBlobs struct {
	mu sync.RWMutex
	m  map[string][]byte
}

var errBlobUnknown = errors.New("blob unknown")

func (b *memBlobs) Get(_ context.Context, _ string, h v1.Hash) (io.ReadCloser, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	p, ok := b.m[h.String()]
	if !ok {
		return nil, errBlobUnknown
	}
	return io.NopCloser(bytes.NewReader(p)), nil
}

func (b *memBlobs) Stat(_ context.Context, _ string, h v1.Hash) (int64, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	p, ok := b.m[h.String()]
	if !ok {
		return 0, errBlobUnknown
	}
	return int64(len(p)), nil
}

func (b *memBlobs) Put(_ context.Context, _ string, h v1.Hash, rc io.ReadCloser) error {
	p, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	b.add(digest.Digest(h.String()), p)
	return nil
}

func (b *memBlobs) add(d digest.Digest, p []byte) {
	b.mu.Lock()
	b.m[string(d)] = p
	b.mu.Unlock()
}

// startUpstream listens on addr (127.0.0.1:0 picks a port) and serves.
func startUpstream(addr string) (*seededUpstream, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	u := &seededUpstream{
		URL:    "http://" + ln.Addr().String(),
		blobs:  &memBlobs{m: map[string][]byte{}},
		counts: map[string]int64{},
	}
	reg := registry.New(registry.WithBlobHandler(u.blobs), registry.Logger(discardLogger()))
	u.srv = &http.Server{Handler: u.counting(reg)}
	go u.srv.Serve(ln)
	return u, nil
}

func (u *seededUpstream) Close() { u.srv.Close() }

// counting records each request as "METHOD kind ref", kind being blob or
// manifest, so a scenario can ask how many GETs one blob drew.
func (u *seededUpstream) counting(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Method + " other"
		if i := strings.LastIndex(r.URL.Path, "/blobs/"); i >= 0 {
			key = r.Method + " blob " + r.URL.Path[i+len("/blobs/"):]
			if r.Method == http.MethodGet && u.link.rate.Load() > 0 {
				w = throttled{w, &u.link}
			}
		} else if i := strings.LastIndex(r.URL.Path, "/manifests/"); i >= 0 {
			key = r.Method + " manifest " + r.URL.Path[i+len("/manifests/"):]
		}
		u.total.Add(1)
		u.mu.Lock()
		u.counts[key]++
		u.mu.Unlock()
		next.ServeHTTP(w, r)
	})
}

// count is how many requests matched key so far ("GET blob sha256:...").
func (u *seededUpstream) count(key string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[key]
}

// randomBlob returns size bytes from a PRNG seeded with seed: the same
// seed gives the same blob, and random bytes keep compression and
// deduplication out of the measurement.
func randomBlob(size int64, seed uint64) []byte {
	p := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), byte(seed >> 24)})
	r.Read(p)
	return p
}

// seedImage stores layer as the only layer of an image in repo, under tag,
// and returns the layer's digest and the manifest.
func (u *seededUpstream) seedImage(repo, tag string, layer []byte) (digest.Digest, []byte, error) {
	ld := digest.FromBytes(layer)
	u.blobs.add(ld, layer)
	config := []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[%q]}}`, ld))
	cd := digest.FromBytes(config)
	u.blobs.add(cd, config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": len(layer)}},
	})
	if err != nil {
		return "", nil, err
	}
	req, _ := http.NewRequest(http.MethodPut, u.URL+"/v2/"+repo+"/manifests/"+tag, bytes.NewReader(manifest))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return "", nil, fmt.Errorf("seeding %s:%s: upstream answered %s", repo, tag, resp.Status)
	}
	return ld, manifest, nil
}
