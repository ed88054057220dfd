package main

// Hostile-world tests of the slipway binary: a bounded load test (warm
// pulls, cold pulls and pushes on hundreds of keep-alive connections at
// once) and slow clients (headers trickled, "slowloris"; request bodies
// trickled). Loopback only; every loop is bounded in count and time.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/v1/random"
)

// TestLoad runs many clients, each on its own keep-alive connection, against
// the slipway binary for a bounded time: warm pulls (manifest by tag, then
// config and layers), cold pulls (images slipway has not cached yet; a new
// one every few milliseconds, so many clients ask for the same cold blob at
// once), and pushes (monolithic POST+PUT, chunked PATCH+PATCH+PUT, some of
// one shared digest at once, then a manifest by tag, each read back). Every
// answer is checked (status, and for every blob and manifest the digest of
// the bytes); any unexpected error fails the test. It reports requests/s and
// p50/p99/max latency per kind, and bounds the server's peak RSS and its
// goroutines (which must return near their baseline once clients leave).
// Latency is reported, never asserted: CI machines are busy.
//
// The flag -load.seconds, or SLIPWAY_LOAD_SECONDS, sets the duration
// (default 8; run longer by hand, e.g.
// go test -run TestLoad -v ./cmd/slipway/ -args -load.seconds 60).
// -load.conns or SLIPWAY_LOAD_CONNS sets the number of clients (default
// 500; 200 under -race: there 500 clients on CI's two cores reached
// 520 MiB, mostly the race detector's shadow memory, and p99 latencies of
// 2.5 s).
func TestLoad(t *testing.T) {
	secs := envInt(t, "SLIPWAY_LOAD_SECONDS", 8)
	if *loadSeconds > 0 {
		secs = *loadSeconds
	}
	conns := 500
	if raceEnabled() {
		conns = 200
	}
	conns = envInt(t, "SLIPWAY_LOAD_CONNS", conns)
	if *loadConns > 0 {
		conns = *loadConns
	}
	dur := time.Duration(secs) * time.Second

	up := newUpstream(t)
	// Warm images: pulled once before the load. Every fourth has a 1 MiB
	// layer, the others 128 KiB ones.
	var warm []loadImage
	for i := 0; i < 8; i++ {
		size := int64(128 << 10)
		if i%4 == 0 {
			size = 1 << 20
		}
		warm = append(warm, seedImage(t, up, fmt.Sprintf("load/warm%d", i), size, 2))
	}
	// Cold images: 16 per second of load, one 64 KiB layer each, so that
	// cold pulls keep happening to the end (a new one every 1/16 s).
	cold := make([]loadImage, 16*secs)
	var seedWG sync.WaitGroup
	seedErr := make(chan error, len(cold))
	for w := 0; w < 8; w++ {
		seedWG.Add(1)
		go func() {
			defer seedWG.Done()
			for i := w; i < len(cold); i += 8 {
				img, err := newLoadImage(up, fmt.Sprintf("load/cold%d", i), 64<<10, 1)
				if err != nil {
					seedErr <- err
					return
				}
				cold[i] = img
			}
		}()
	}
	seedWG.Wait()
	close(seedErr)
	if err := <-seedErr; err != nil {
		t.Fatal(err)
	}

	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(),
		"--push-prefix", "local", "--log-level", "warn")
	p.waitReady(t, addr)
	pid := p.cmd.Process.Pid
	for _, img := range warm {
		pullAndCheck(t, addr, img.repo+":v1", img.digest)
	}
	base := waitGoroutines(t, addr, 0, 0) // after the warm-up; its connections are idle
	hwmBefore := procStatusMiB(t, pid, "VmHWM")

	shared := randomBytes(96 << 10) // pushed by many clients at once
	workers := make([]*loadWorker, conns)
	for i := range workers {
		workers[i] = &loadWorker{
			id:   i,
			base: "http://" + addr,
			client: &http.Client{Transport: &http.Transport{
				MaxConnsPerHost:       1, // each worker is one connection
				MaxIdleConnsPerHost:   1,
				DisableCompression:    true,
				ResponseHeaderTimeout: 30 * time.Second,
			}},
			lat:    map[string][]time.Duration{},
			rng:    mrand.New(mrand.NewPCG(uint64(i), 1)),
			warm:   warm,
			cold:   cold,
			shared: shared,
		}
	}
	t0 := time.Now()
	end := t0.Add(dur)
	for _, w := range workers {
		w.t0, w.end, w.dur = t0, end, dur
	}

	// Sample the server's goroutines and RSS while the load runs.
	var peakG, samples int
	var peakRSS, peakHeap, peakStack float64
	sampleDone := make(chan struct{})
	go func() {
		defer close(sampleDone)
		for i := 0; i < 10*secs+50 && time.Now().Before(end); i++ {
			if m, err := serverMetrics(addr, "go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes"); err == nil {
				peakG = max(peakG, int(m["go_goroutines"]))
				peakHeap = max(peakHeap, m["go_memstats_heap_inuse_bytes"]/(1<<20))
				peakStack = max(peakStack, m["go_memstats_stack_inuse_bytes"]/(1<<20))
				samples++
			}
			if rss, err := readProcStatus(pid, "VmRSS"); err == nil {
				peakRSS = max(peakRSS, rss)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}()

	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run()
		}()
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(dur + 90*time.Second): // each request times out after 30 s
		t.Fatalf("clients still running %s after the load should have ended", 90*time.Second)
	}
	elapsed := time.Since(t0)
	<-sampleDone

	// Results.
	all := map[string][]time.Duration{}
	var errs []string
	nerr, total := 0, 0
	ops := map[string]int{}
	for _, w := range workers {
		for k, v := range w.lat {
			all[k] = append(all[k], v...)
			total += len(v)
		}
		for k, v := range w.ops {
			ops[k] += v
		}
		nerr += w.nerr
		if len(errs) < 10 {
			errs = append(errs, w.errs...)
		}
	}
	t.Logf("%d clients for %.1fs (race %v): %d requests, %.0f req/s; operations %v",
		conns, elapsed.Seconds(), raceEnabled(), total, float64(total)/elapsed.Seconds(), ops)
	kinds := make([]string, 0, len(all))
	for k := range all {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	for _, k := range kinds {
		l := all[k]
		slices.Sort(l)
		t.Logf("  %-14s %6d requests  p50 %7.1fms  p99 %7.1fms  max %7.1fms", k, len(l),
			ms(l[len(l)/2]), ms(l[len(l)*99/100]), ms(l[len(l)-1]))
	}
	if nerr > 0 {
		if len(errs) > 10 {
			errs = errs[:10]
		}
		t.Errorf("%d unexpected errors; the first ones:\n%s", nerr, strings.Join(errs, "\n"))
	}
	if ops["warm"] == 0 || ops["cold"] == 0 || ops["push"] == 0 {
		t.Errorf("operations %v: every kind must have run", ops)
	}
	// Cold pulls were cold: blob fills started (miss), and other clients
	// joined fills in flight.
	miss, joined := `slipway_cache_results_total{kind="blob",result="miss"}`, `slipway_cache_results_total{kind="blob",result="joined"}`
	if m, err := serverMetrics(addr, miss, joined); err != nil {
		t.Error(err)
	} else {
		t.Logf("blob fills from the upstream: %.0f, requests that joined one in flight: %.0f", m[miss], m[joined])
		if m[miss] < float64(len(cold)) || m[joined] == 0 {
			t.Errorf("blob misses %.0f (want at least %d, one per cold image), joined %.0f (want some)", m[miss], len(cold), m[joined])
		}
	}

	// Memory: VmHWM is the peak over the process's life. Measured on a
	// 2-core machine without -race (500 clients): 100-118 MiB for 8-30 s,
	// up to 171 MiB for 60 s. GODEBUG=gctrace=1 shows a live heap flat at
	// 41-48 MiB (badger's memtables and caches, the connections); the peak
	// is that plus the garbage GOGC=100 lets grow before a collection, and
	// a spike while badger flushes a memtable. With -race (200 clients):
	// about 320 MiB for 8 s. The limits leave room for a noisy run and a
	// longer one by hand, and still catch a blob buffered per request
	// (hundreds of clients at once reading layers of up to 1 MiB) or a
	// per-connection leak.
	hwm := procStatusMiB(t, pid, "VmHWM")
	limit := 200.0
	if raceEnabled() {
		limit = 500
	}
	t.Logf("server RSS: peak %.0f MiB (%.0f MiB before the load; sampled peaks: VmRSS %.0f MiB, Go heap in use %.0f MiB, stacks %.0f MiB), limit %.0f MiB",
		hwm, hwmBefore, peakRSS, peakHeap, peakStack, limit)
	if hwm > limit {
		t.Errorf("server peak RSS %.0f MiB, want at most %.0f MiB", hwm, limit)
	}

	// Goroutines: with every client's connection closed, the server's
	// connection goroutines end; what is left is near the baseline. The
	// server also keeps idle connections to the upstream (up to 64, two
	// goroutines each, until its 90 s idle timeout): the upstream closes
	// them, as a real one would in time.
	for _, w := range workers {
		w.client.CloseIdleConnections()
	}
	up.srv.CloseClientConnections()
	after := waitGoroutines(t, addr, base, 10*time.Second)
	t.Logf("server goroutines: %d before the load, peak %d while it ran (%d samples), %d after", base, peakG, samples, after)

	if s := p.stderr.String(); strings.Contains(s, "level=ERROR") {
		t.Errorf("the server logged errors:\n%s", tail(grepLines(s, "level=ERROR"), 20))
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

var (
	loadSeconds = flag.Int("load.seconds", 0, "TestLoad's duration in seconds (default 8)")
	loadConns   = flag.Int("load.conns", 0, "TestLoad's clients (default 500, 200 under -race)")
)

// envInt reads a positive integer from the environment variable name, or
// returns def if it is not set.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v, ok := os.LookupEnv(name)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// loadImage is an image in the upstream, with what a pull must get.
type loadImage struct {
	repo     string
	digest   string            // the manifest's
	manifest []byte            // its bytes
	blobs    map[string]string // config and layer digests -> "" (the set a pull reads)
}

func seedImage(t *testing.T, up *fakeUpstream, repo string, size, layers int64) loadImage {
	t.Helper()
	img, err := newLoadImage(up, repo, size, layers)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// newLoadImage pushes a random image to the upstream at repo:v1.
func newLoadImage(up *fakeUpstream, repo string, size, layers int64) (loadImage, error) {
	img, err := random.Image(size, layers)
	if err != nil {
		return loadImage{}, err
	}
	if err := crane.Push(img, up.host+"/"+repo+":v1", crane.Insecure); err != nil {
		return loadImage{}, fmt.Errorf("push %s to the upstream: %w", repo, err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		return loadImage{}, err
	}
	m, err := img.Manifest()
	if err != nil {
		return loadImage{}, err
	}
	li := loadImage{repo: repo, digest: sha256Digest(raw), manifest: raw, blobs: map[string]string{m.Config.Digest.String(): ""}}
	for _, l := range m.Layers {
		li.blobs[l.Digest.String()] = ""
	}
	return li, nil
}

func sha256Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// loadWorker is one client with its own connection.
type loadWorker struct {
	id         int
	base       string
	client     *http.Client
	rng        *mrand.Rand
	warm, cold []loadImage
	shared     []byte
	t0, end    time.Time
	dur        time.Duration
	lat        map[string][]time.Duration // by request kind
	ops        map[string]int
	errs       []string // the first few
	nerr       int
	pushes     int
}

// run loops over operations until the end of the load (at most 100000).
func (w *loadWorker) run() {
	w.ops = map[string]int{}
	for i := 0; i < 100000 && time.Now().Before(w.end); i++ {
		var kind string
		var err error
		switch r := w.rng.IntN(10); {
		case r < 5:
			kind, err = "warm", w.pull("warm", w.warm[w.rng.IntN(len(w.warm))])
		case r < 8:
			// The cold image of this moment: a new one every dur/len(cold).
			n := int(time.Since(w.t0) * time.Duration(len(w.cold)) / w.dur)
			if n >= len(w.cold) {
				n = len(w.cold) - 1
			}
			kind, err = "cold", w.pull("cold", w.cold[n])
		default:
			kind, err = "push", w.push()
		}
		w.ops[kind]++
		if err != nil {
			w.nerr++
			if len(w.errs) < 3 {
				w.errs = append(w.errs, fmt.Sprintf("client %d, %s: %v", w.id, kind, err))
			}
		}
	}
}

// pull gets img's manifest by tag and every blob it names.
func (w *loadWorker) pull(kind string, img loadImage) error {
	if err := w.get(kind+"-manifest", "/v2/"+img.repo+"/manifests/v1", img.digest); err != nil {
		return err
	}
	for d := range img.blobs {
		if err := w.get(kind+"-blob", "/v2/"+img.repo+"/blobs/"+d, d); err != nil {
			return err
		}
	}
	return nil
}

// push pushes a blob (monolithic or chunked), a manifest naming it by tag,
// and reads both back.
func (w *loadWorker) push() error {
	w.pushes++
	repo := fmt.Sprintf("local/p%d", w.id%50)
	blob := w.shared
	if w.rng.IntN(4) != 0 {
		blob = randomBytes(32<<10 + w.rng.IntN(96<<10))
	}
	d := sha256Digest(blob)
	if w.rng.IntN(2) == 0 {
		loc, err := w.startUpload(repo)
		if err != nil {
			return err
		}
		if _, err := w.send("push", http.MethodPut, loc+"?digest="+d, blob, nil, http.StatusCreated); err != nil {
			return fmt.Errorf("monolithic PUT: %w", err)
		}
	} else {
		loc, err := w.startUpload(repo)
		if err != nil {
			return err
		}
		half := len(blob) / 2
		for _, c := range [][2]int{{0, half}, {half, len(blob)}} {
			h := map[string]string{"Content-Range": fmt.Sprintf("%d-%d", c[0], c[1]-1)}
			resp, err := w.send("push", http.MethodPatch, loc, blob[c[0]:c[1]], h, http.StatusAccepted)
			if err != nil {
				return fmt.Errorf("PATCH %d-%d: %w", c[0], c[1]-1, err)
			}
			loc = resp.Header.Get("Location")
		}
		if _, err := w.send("push", http.MethodPut, loc+"?digest="+d, nil, nil, http.StatusCreated); err != nil {
			return fmt.Errorf("chunked PUT: %w", err)
		}
	}
	if err := w.get("push-get", "/v2/"+repo+"/blobs/"+d, d); err != nil {
		return fmt.Errorf("read back: %w", err)
	}
	man, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": len(blob)},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(blob)}},
		"annotations":   map[string]string{"worker": strconv.Itoa(w.id), "n": strconv.Itoa(w.pushes)},
	})
	tag := fmt.Sprintf("w%d", w.id)
	h := map[string]string{"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
	if _, err := w.send("push", http.MethodPut, "/v2/"+repo+"/manifests/"+tag, man, h, http.StatusCreated); err != nil {
		return fmt.Errorf("manifest PUT: %w", err)
	}
	// Only this worker writes this tag.
	if err := w.get("push-get", "/v2/"+repo+"/manifests/"+tag, sha256Digest(man)); err != nil {
		return fmt.Errorf("read back the manifest: %w", err)
	}
	return nil
}

func (w *loadWorker) startUpload(repo string) (string, error) {
	resp, err := w.send("push", http.MethodPost, "/v2/"+repo+"/blobs/uploads/", nil, nil, http.StatusAccepted)
	if err != nil {
		return "", fmt.Errorf("POST upload: %w", err)
	}
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "/v2/") {
		return "", fmt.Errorf("POST upload: Location %q", loc)
	}
	return loc, nil
}

// send does one request and wants status; the body is read and dropped.
func (w *loadWorker) send(kind, method, path string, body []byte, hdr map[string]string, status int) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, w.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if body == nil {
		req.Body, req.ContentLength = http.NoBody, 0
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	t := time.Now()
	resp, err := w.client.Do(req)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	w.lat[kind] = append(w.lat[kind], time.Since(t))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer: %w", method, path, err)
	}
	if resp.StatusCode != status {
		return nil, fmt.Errorf("%s %s: status %d, want %d: %.300s", method, path, resp.StatusCode, status, b)
	}
	return resp, nil
}

// get reads path to the end and wants 200 and bytes whose digest is want.
func (w *loadWorker) get(kind, path, want string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.base+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	t := time.Now()
	resp, err := w.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	w.lat[kind] = append(w.lat[kind], time.Since(t))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
	}
	if err != nil {
		return fmt.Errorf("GET %s: after %d bytes: %w", path, n, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("GET %s: %d bytes with digest %s, want %s", path, n, got, want)
	}
	if dh := resp.Header.Get("Docker-Content-Digest"); dh != want {
		return fmt.Errorf("GET %s: Docker-Content-Digest %q, want %s", path, dh, want)
	}
	return nil
}

// serverGoroutines reads go_goroutines from the server's /metrics.
func serverGoroutines(addr string) (int, error) {
	m, err := serverMetrics(addr, "go_goroutines")
	return int(m["go_goroutines"]), err
}

// serverMetrics reads the unlabelled metrics names from the server's
// /metrics.
func serverMetrics(addr string, names ...string) (map[string]float64, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && slices.Contains(names, k) {
			if m[k], err = strconv.ParseFloat(v, 64); err != nil {
				return nil, fmt.Errorf("/metrics: %s: %w", k, err)
			}
		}
	}
	for _, k := range names {
		if _, ok := m[k]; !ok {
			return nil, fmt.Errorf("/metrics has no %s", k)
		}
	}
	return m, sc.Err()
}

// waitGoroutines polls the server's goroutine count for up to within until
// it is at most base plus a margin (for scrape, timer and maintenance
// goroutines that come and go), and returns it. within 0: read it once.
func waitGoroutines(t *testing.T, addr string, base int, within time.Duration) int {
	t.Helper()
	const margin = 25
	deadline := time.Now().Add(within)
	for i := 0; ; i++ {
		g, err := serverGoroutines(addr)
		if err != nil {
			t.Fatal(err)
		}
		if within == 0 || g <= base+margin {
			return g
		}
		if i >= 100 || time.Now().After(deadline) {
			t.Errorf("server goroutines: %d %s after the clients left, want at most %d (baseline %d)", g, within, base+margin, base)
			return g
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// readProcStatus reads a "kB" field of /proc/pid/status (VmHWM, VmRSS), in
// MiB. (bench_test.go's vmHWM does the same for a *testing.B.)
func readProcStatus(pid int, field string) (float64, error) {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

func procStatusMiB(t *testing.T, pid int, field string) float64 {
	t.Helper()
	v, err := readProcStatus(pid, field)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestSlowloris holds hundreds of connections that trickle their request
// headers a byte at a time and never finish them, reconnecting when the
// server drops them, as a slowloris attacker does. Meanwhile ordinary
// clients must be served as usual; the server must drop each slow
// connection once --read-header-timeout has passed, and its goroutines
// must return to the baseline. Then request bodies trickled after complete
// headers (a push at a few bytes a second) are cut off after
// --body-stall-timeout, while a slow but steady push succeeds.
func TestSlowloris(t *testing.T) {
	const (
		headerTimeout = time.Second
		stallTimeout  = time.Second
		slowConns     = 300
		attack        = 4 * time.Second
		grace         = 5 * time.Second // how late after a timeout a close may come
	)
	// No header timeout is not an option: it is what stops this attack.
	for _, v := range []string{"0", "-1s"} {
		if code, _, stderr := runOnce(t, nil, "serve", "--read-header-timeout", v); code != 2 || !strings.Contains(stderr, "read-header-timeout") {
			t.Errorf("slipway serve --read-header-timeout %s: exit %d, want 2 and a message: %s", v, code, stderr)
		}
	}

	up := newUpstream(t)
	img := seedImage(t, up, "team/app", 256<<10, 1)
	addr := freeAddr(t)
	// The stall timeout through its environment twin, the header timeout
	// as a flag.
	p := start(t, []string{"SLIPWAY_BODY_STALL_TIMEOUT=" + stallTimeout.String()},
		"serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(),
		"--push-prefix", "local", "--log-level", "warn", "--read-header-timeout", headerTimeout.String())
	p.waitReady(t, addr)
	pullAndCheck(t, addr, img.repo+":v1", img.digest)
	base := waitGoroutines(t, addr, 0, 0)

	t.Run("headers", func(t *testing.T) {
		var (
			mu      sync.Mutex
			errs    []string
			closes  []time.Duration // how long each slow connection lived
			opened  atomic.Int32
			holding atomic.Int32
		)
		fail := func(format string, a ...any) {
			mu.Lock()
			defer mu.Unlock()
			if len(errs) < 10 {
				errs = append(errs, fmt.Sprintf(format, a...))
			}
		}
		end := time.Now().Add(attack)
		var wg sync.WaitGroup
		for i := 0; i < slowConns; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Half trickle from the first byte of the request line,
				// half send it whole and trickle a header that never ends.
				prefix := ""
				if i%2 == 1 {
					prefix = "GET /v2/ HTTP/1.1\r\nHost: " + addr + "\r\n"
				}
				for n := 0; n < 20 && time.Now().Before(end); n++ {
					lived, err := slowHeaders(addr, prefix, headerTimeout+grace, &holding)
					opened.Add(1)
					if err != nil {
						fail("slow connection %d: %v", i, err)
						return
					}
					mu.Lock()
					closes = append(closes, lived)
					mu.Unlock()
				}
			}()
		}

		// Ordinary clients while the slow ones are held.
		time.Sleep(300 * time.Millisecond)
		client := &http.Client{Timeout: 5 * time.Second}
		var served []time.Duration
		var peakG, peakHeld int
		blob := ""
		for d := range img.blobs {
			blob = d
		}
		for i := 0; i < 200 && time.Now().Before(end); i++ {
			peakHeld = max(peakHeld, int(holding.Load()))
			t0 := time.Now()
			for _, path := range []string{"/v2/", "/v2/" + img.repo + "/blobs/" + blob} {
				resp, err := client.Get("http://" + addr + path)
				if err != nil {
					t.Errorf("GET %s while %d slow connections are held: %v", path, holding.Load(), err)
					continue
				}
				h := sha256.New()
				_, err = io.Copy(h, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Errorf("GET %s while slow connections are held: status %d, %v", path, resp.StatusCode, err)
				}
				if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); path != "/v2/" && got != blob {
					t.Errorf("GET %s: digest %s", path, got)
				}
			}
			served = append(served, time.Since(t0))
			if g, err := serverGoroutines(addr); err == nil {
				peakG = max(peakG, g)
			}
			time.Sleep(100 * time.Millisecond)
		}
		wg.Wait()
		for _, e := range errs {
			t.Error(e)
		}
		if len(closes) == 0 || len(served) == 0 {
			t.Fatalf("%d slow connections closed, %d ordinary pulls served", len(closes), len(served))
		}
		slices.Sort(closes)
		slices.Sort(served)
		t.Logf("%d slow connections opened (up to %d held at once), closed by the server after %.0f-%.0fms (header timeout %s); "+
			"%d ordinary /v2/+blob pulls meanwhile: p50 %.1fms, max %.1fms; server goroutines %d before, peak %d",
			opened.Load(), peakHeld, ms(closes[0]), ms(closes[len(closes)-1]), headerTimeout,
			len(served), ms(served[len(served)/2]), ms(served[len(served)-1]), base, peakG)
		after := waitGoroutines(t, addr, base, 10*time.Second)
		t.Logf("server goroutines %d after the attack", after)
	})

	t.Run("bodies", func(t *testing.T) {
		client := &http.Client{Timeout: 10 * time.Second}
		upload := func(repo string) string {
			resp, err := client.Post("http://"+addr+"/v2/"+repo+"/blobs/uploads/", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("POST upload: status %d", resp.StatusCode)
			}
			return resp.Header.Get("Location")
		}
		d := sha256Digest(randomBytes(100))
		for _, tc := range []struct{ name, method, path string }{
			{"PATCH", "PATCH", upload("local/slow")},
			{"PUT", "PUT", upload("local/slow") + "?digest=" + d},
			{"single POST", "POST", "/v2/local/slow/blobs/uploads/?digest=" + d},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				status, lived, err := slowBody(addr, tc.method, tc.path, stallTimeout+grace)
				if err != nil {
					t.Fatal(err)
				}
				if status != "" && strings.HasPrefix(status, "2") {
					t.Errorf("%s with a body trickled at 10 bytes/s: status %s, want an error", tc.method, status)
				}
				t.Logf("%s trickled at 10 bytes/s: answered %q and closed after %.0fms (stall timeout %s)",
					tc.method, status, ms(lived), stallTimeout)
			})
		}
		// A push that is slow but steady (20 KiB/s, 60 KiB in 3 s: well
		// over 4 KiB in every second) is not cut off.
		t.Run("slow but steady", func(t *testing.T) {
			t.Parallel()
			blob := randomBytes(60 << 10)
			loc := upload("local/steady")
			pr, pw := io.Pipe()
			go func() {
				for off := 0; off < len(blob); off += 1 << 10 {
					time.Sleep(50 * time.Millisecond)
					if _, err := pw.Write(blob[off : off+1<<10]); err != nil {
						return
					}
				}
				pw.Close()
			}()
			req, _ := http.NewRequest(http.MethodPatch, "http://"+addr+loc, pr)
			req.ContentLength = int64(len(blob))
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("PATCH at 20 KiB/s: status %d, want 202", resp.StatusCode)
			}
			bd := sha256Digest(blob)
			req, _ = http.NewRequest(http.MethodPut, "http://"+addr+resp.Header.Get("Location")+"?digest="+bd, nil)
			if resp, err = client.Do(req); err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusCreated {
				t.Fatalf("PUT: status %d, want 201", resp.StatusCode)
			}
			if resp, err = client.Get("http://" + addr + "/v2/local/steady/blobs/" + bd); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("GET the pushed blob: status %d, %d bytes, %v", resp.StatusCode, len(got), err)
			}
		})
	})
	waitGoroutines(t, addr, base, 10*time.Second)
}

// slowHeaders opens a connection to addr, sends prefix, then trickles
// header bytes, one every 200 ms, until the server closes the connection.
// It returns how long the connection lived, or an error if the server kept
// it open for longer than within. holding counts connections open now.
func slowHeaders(addr, prefix string, within time.Duration, holding *atomic.Int32) (time.Duration, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	holding.Add(1)
	defer holding.Add(-1)
	t0 := time.Now()
	if prefix != "" {
		if _, err := io.WriteString(conn, prefix); err != nil {
			return 0, err
		}
	}
	trickle := "GET /v2/ HTTP/1.1\r\nHost: " + addr + "\r\nX-Slow: "
	if prefix != "" {
		trickle = "X-Slow: "
	}
	buf := make([]byte, 512)
	for i := 0; i < 1000; i++ {
		b := byte('a')
		if i < len(trickle) {
			b = trickle[i]
		}
		if _, err := conn.Write([]byte{b}); err != nil {
			return time.Since(t0), nil // closed (EPIPE, reset)
		}
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := conn.Read(buf); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return time.Since(t0), nil // EOF or reset: closed
		}
		if time.Since(t0) > within {
			return 0, fmt.Errorf("still open %s after it was opened (%d bytes trickled)", time.Since(t0).Round(time.Millisecond), i+1)
		}
	}
	return 0, errors.New("still open after 1000 bytes")
}

// slowBody sends a request with complete headers (Content-Length 100000)
// to addr and then trickles its body at 10 bytes a second. It returns the
// status code of the answer, if one came, and how long the connection
// lived, or an error if the server kept it open longer than within.
func slowBody(addr, method, path string, within time.Duration) (status string, lived time.Duration, err error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", 0, err
	}
	defer conn.Close()
	t0 := time.Now()
	fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n", method, path, addr)
	var got []byte
	buf := make([]byte, 4096)
	for i := 0; i < 1000; i++ {
		if _, err := conn.Write([]byte{'x'}); err != nil {
			break // closed
		}
		conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := conn.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			break // EOF or reset: closed
		}
		if time.Since(t0) > within {
			return "", 0, fmt.Errorf("%s %s: still open %s after the headers (got %q)", method, path, time.Since(t0).Round(time.Millisecond), got)
		}
	}
	lived = time.Since(t0)
	if s, ok := strings.CutPrefix(string(got), "HTTP/1.1 "); ok && len(s) >= 3 {
		status = s[:3]
	}
	return status, lived, nil
}
