package mirror

import (
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// Benchmarks run the mirror in-process on loopback against the in-process
// upstream. Sizes can be changed with SLIPWAY_BENCH_BLOB (bytes); the
// defaults are the issue's: 1 GiB warm, 64 MiB cold.
//
//	go test -run '^$' -bench . -benchtime 3x ./mirror/

func benchSize(def int64) int64 {
	if s, err := strconv.ParseInt(os.Getenv("SLIPWAY_BENCH_BLOB"), 10, 64); err == nil && s > 0 {
		return s
	}
	return def
}

// benchClient keeps enough idle connections for the concurrency used here.
var benchClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128, DisableCompression: true}}

// storeRandomBlob writes size random bytes into the store, linked to repo.
func storeRandomBlob(b *testing.B, e *pullEnv, repo string, size int64) digest.Digest {
	b.Helper()
	w, err := e.store.NewBlobWriter(digest.SHA256)
	if err != nil {
		b.Fatal(err)
	}
	defer w.Cancel()
	h := digest.SHA256.Digester()
	buf := make([]byte, 4<<20)
	for left := size; left > 0; {
		n := int64(len(buf))
		if left < n {
			n = left
		}
		rand.Read(buf[:n])
		h.Hash().Write(buf[:n])
		if _, err := w.Write(buf[:n]); err != nil {
			b.Fatal(err)
		}
		left -= n
	}
	d := h.Digest()
	if err := w.Commit(d, size, cache.OriginPulled); err != nil {
		b.Fatal(err)
	}
	if err := e.store.Link(e.up.host, repo, d); err != nil {
		b.Fatal(err)
	}
	return d
}

func drain(url string, buf []byte) (int64, error) {
	resp, err := benchClient.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	return io.CopyBuffer(io.Discard, resp.Body, buf)
}

func BenchmarkWarmBlob(b *testing.B) {
	e := newPullEnv(b, false)
	size := benchSize(1 << 30)
	d := storeRandomBlob(b, e, "team/app", size)
	url := e.url("/v2/team/app/blobs/" + string(d))
	for _, clients := range []int{1, 8} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			b.SetBytes(size * int64(clients))
			bufs := make([][]byte, clients)
			for i := range bufs {
				bufs[i] = make([]byte, 256<<10)
			}
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i++ {
				var wg sync.WaitGroup
				for c := 0; c < clients; c++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						if n, err := drain(url, bufs[c]); err != nil || n != size {
							b.Errorf("read %d of %d: %v", n, size, err)
						}
					}()
				}
				wg.Wait()
			}
			secs := time.Since(start).Seconds()
			b.ReportMetric(float64(size)*float64(clients)*float64(b.N)/secs/(1<<30), "GiB/s")
		})
	}
}

// manifestAccept is the Accept header Docker, containerd and slipbench
// send for a manifest: each type on a line of its own.
var manifestAccept = []string{
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
}

// newManifestBenchEnv is a pull env wired as `slipway serve` wires it (a
// read-only push manager, so every unprefixed name is asked whether it is
// a local repository), logging at level: Info writes every access line,
// Warn none. It holds team/app:v1, pulled once.
func newManifestBenchEnv(b *testing.B, level slog.Level) (*pullEnv, *Server) {
	b.Helper()
	e := &pullEnv{up: newFakeUpstream(b), clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}, dir: b.TempDir()}
	log := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: level}))
	st, err := cache.Open(e.dir, cache.Options{Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: e.up.URL})
	if err != nil {
		b.Fatal(err)
	}
	e.fills = upstream.NewFiller(st, upstream.FillerOptions{Logger: log})
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{Logger: log, TagTTL: testTagTTL, Now: e.clock.Now})
	pm, err := push.New(push.Config{Store: st, Logger: log, ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{Store: st, Upstreams: []Upstream{{Proxy: p}}, Logger: log, Push: pm,
		StoreStats: func() StoreStats { return StoreStats{} }, Observer: NewObserver()})
	if err != nil {
		b.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	b.Cleanup(func() {
		e.srv.Close()
		e.fills.Close()
		pm.Close()
		st.Close()
	})
	img, _ := random.Image(1024, 2)
	e.pushImage(b, img, "team/app:v1")
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, manifestRequest(e.url("/v2/team/app/manifests/v1")))
	if rec.Code != http.StatusOK {
		b.Fatalf("first pull: %d %s", rec.Code, rec.Body)
	}
	return e, s
}

func manifestRequest(url string) *http.Request {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header["Accept"] = manifestAccept
	return req
}

// BenchmarkWarmManifestByTag: 64 connections on loopback pull one cached,
// fresh manifest by tag, as slipbench's warm-manifest scenario does. The
// client's work is in ns/op and allocs/op too; BenchmarkWarmManifestHandler
// has the server's alone.
func BenchmarkWarmManifestByTag(b *testing.B) {
	for _, level := range []slog.Level{slog.LevelWarn, slog.LevelInfo} {
		b.Run("log="+strings.ToLower(level.String()), func(b *testing.B) {
			e, _ := newManifestBenchEnv(b, level)
			url := e.url("/v2/team/app/manifests/v1")
			before := e.up.countPrefix("", "")
			const conns = 64
			b.ResetTimer()
			lat := make([][]time.Duration, conns)
			start := time.Now()
			var wg sync.WaitGroup
			for c := 0; c < conns; c++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 64<<10)
					for i := c; i < b.N; i += conns {
						t0 := time.Now()
						if err := drainManifest(url, buf); err != nil {
							b.Error(err)
							return
						}
						lat[c] = append(lat[c], time.Since(t0))
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			var all []time.Duration
			for _, l := range lat {
				all = append(all, l...)
			}
			sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
			if len(all) > 0 {
				b.ReportMetric(float64(len(all))/elapsed.Seconds(), "req/s")
				b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "p50-ms")
				b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
			}
			b.ReportMetric(float64(e.up.countPrefix("", "")-before), "upstream-reqs")
		})
	}
}

func drainManifest(url string, buf []byte) error {
	resp, err := benchClient.Do(manifestRequest(url))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	_, err = io.CopyBuffer(io.Discard, resp.Body, buf)
	return err
}

// BenchmarkWarmManifestHandler is the server's own work for a warm pull
// by tag: the handler chain (middleware, routing, the tag and manifest
// from the cache, headers, metrics, the access line) without net/http or
// a client. Its allocs/op are the server's per request.
func BenchmarkWarmManifestHandler(b *testing.B) {
	for _, level := range []slog.Level{slog.LevelWarn, slog.LevelInfo} {
		b.Run("log="+strings.ToLower(level.String()), func(b *testing.B) {
			e, s := newManifestBenchEnv(b, level)
			h := s.Handler()
			url := e.url("/v2/team/app/manifests/v1")
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				req := manifestRequest(url)
				w := &benchWriter{h: http.Header{}}
				for pb.Next() {
					clear(w.h)
					w.status = 0
					h.ServeHTTP(w, req)
					if w.status != http.StatusOK {
						b.Errorf("status %d", w.status)
						return
					}
				}
			})
		})
	}
}

// benchWriter is the least a ResponseWriter can be.
type benchWriter struct {
	h      http.Header
	status int
}

func (w *benchWriter) Header() http.Header { return w.h }
func (w *benchWriter) WriteHeader(s int) {
	if w.status == 0 {
		w.status = s
	}
}
func (w *benchWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(p), nil
}

// BenchmarkColdFill: one client's cold time on one blob, then 32 clients
// at once on another of the same size. Reports upstream GETs of the shared
// blob and slowest ÷ single.
func BenchmarkColdFill(b *testing.B) {
	size := benchSize(64 << 20)
	const clients = 32
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		e := newPullEnv(b, false)
		solo := randomBytes(b, int(size))
		shared := randomBytes(b, int(size))
		dSolo := e.pushBlob(b, "team/cold", solo)
		dShared := e.pushBlob(b, "team/cold", shared)
		b.StartTimer()

		buf := make([]byte, 256<<10)
		t0 := time.Now()
		if _, err := drain(e.url("/v2/team/cold/blobs/"+string(dSolo)), buf); err != nil {
			b.Fatal(err)
		}
		single := time.Since(t0)

		times := make([]time.Duration, clients)
		firsts := make([]time.Duration, clients)
		var wg sync.WaitGroup
		start := time.Now()
		for c := 0; c < clients; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := benchClient.Get(e.url("/v2/team/cold/blobs/" + string(dShared)))
				if err != nil {
					b.Error(err)
					return
				}
				defer resp.Body.Close()
				one := make([]byte, 1)
				if _, err := io.ReadFull(resp.Body, one); err != nil {
					b.Error(err)
					return
				}
				firsts[c] = time.Since(start)
				io.CopyBuffer(io.Discard, resp.Body, make([]byte, 256<<10))
				times[c] = time.Since(start)
			}()
		}
		wg.Wait()
		b.StopTimer()
		sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
		sort.Slice(firsts, func(i, j int) bool { return firsts[i] < firsts[j] })
		b.ReportMetric(float64(e.up.count("GET", "/v2/team/cold/blobs/"+string(dShared))), "upstream-GETs")
		b.ReportMetric(times[clients-1].Seconds()/single.Seconds(), "slowest/single")
		b.ReportMetric(float64(single.Milliseconds()), "single-ms")
		b.ReportMetric(float64((firsts[clients-1] - firsts[0]).Milliseconds()), "first-byte-spread-ms")
		e.srv.Close()
		e.fills.Close()
		e.store.Close()
		b.StartTimer()
	}
}
