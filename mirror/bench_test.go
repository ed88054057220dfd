package mirror

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
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

func BenchmarkWarmManifestByTag(b *testing.B) {
	e := newPullEnv(b, false)
	img, _ := random.Image(1024, 2)
	e.pushImage(b, img, "team/app:v1")
	url := e.url("/v2/team/app/manifests/v1")
	if _, err := drain(url, make([]byte, 64<<10)); err != nil {
		b.Fatal(err)
	}
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
				if _, err := drain(url, buf); err != nil {
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
