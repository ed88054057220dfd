package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"golang.org/x/crypto/bcrypt"
)

// countingUpstream is a registry that counts blob GETs and can hold one
// blob's download halfway until released.
type countingUpstream struct {
	srv  *httptest.Server
	host string
	url  string

	mu      sync.Mutex
	gets    map[string]int // path -> GETs
	hold    string         // blob digest to hold
	release chan struct{}
}

func newCountingUpstream(t *testing.T) *countingUpstream {
	t.Helper()
	u := &countingUpstream{gets: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		if r.Method == http.MethodGet {
			u.gets[r.URL.Path]++
		}
		hold, release := u.hold, u.release
		u.mu.Unlock()
		if hold != "" && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+hold) {
			rec := httptest.NewRecorder()
			reg.ServeHTTP(rec, r)
			b := rec.Body.Bytes()
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Header().Set("Docker-Content-Digest", hold)
			w.WriteHeader(http.StatusOK)
			w.Write(b[:len(b)/2])
			w.(http.Flusher).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
				return
			case <-time.After(20 * time.Second):
			}
			w.Write(b[len(b)/2:])
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.srv.Close)
	u.url = u.srv.URL
	u.host = strings.TrimPrefix(u.url, "http://")
	return u
}

func (u *countingUpstream) blobGETs(repo string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for p, c := range u.gets {
		if strings.HasPrefix(p, "/v2/"+repo+"/blobs/") {
			n += c
		}
	}
	return n
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// SIGTERM while a pull is in flight: the pull completes with the right
// bytes, the listener stops taking new connections, the process exits 0.
// Also: /healthz, /readyz, /metrics on --metrics-listen, and the request
// log line's fields.
func TestGracefulShutdownFinishesPullInFlight(t *testing.T) {
	t.Parallel()
	up := newCountingUpstream(t)
	img, err := random.Image(1<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(img, up.host+"/team/app:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	up.mu.Lock()
	up.hold, up.release = ld.String(), make(chan struct{})
	up.mu.Unlock()

	addr, maddr := freeAddr(t), freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--metrics-listen", maddr, "--upstream", up.url,
		"--data-dir", t.TempDir(), "--shutdown-timeout", "20s")
	p.waitReady(t, addr)
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpGet(t, "http://"+addr+path); code != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, code, body)
		}
	}

	// Start the pull: it gets the first half, then waits on the upstream.
	resp, err := http.Get("http://" + addr + "/v2/team/app/blobs/" + ld.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Slipway-Cache") != "miss" {
		t.Fatalf("GET blob: %s, X-Slipway-Cache %q", resp.Status, resp.Header.Get("X-Slipway-Cache"))
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 1<<19); err != nil {
		t.Fatal(err)
	}

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.stderr.String(), "shutting down") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// New connections are refused while the pull is still in flight.
	refused := false
	for i := 0; i < 100 && !refused; i++ {
		c := &http.Client{Timeout: time.Second}
		if r, err := c.Get("http://" + addr + "/readyz"); err != nil {
			refused = true
		} else {
			r.Body.Close()
			time.Sleep(20 * time.Millisecond)
		}
	}
	if !refused {
		t.Error("the listener still accepts connections during shutdown")
	}
	close(up.release)
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("the pull in flight was cut by shutdown: %v", err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != ld.String() {
		t.Fatalf("the pull in flight got %s, want %s", got, ld)
	}
	p.waitExit(t, "SIGTERM", 15*time.Second)

	logs := p.stderr.String()
	for _, want := range []string{"route=blob", "cache=miss", "request_id=", "status=200", "bytes=", "dur="} {
		if !strings.Contains(logs, want) {
			t.Errorf("request log has no %q:\n%s", want, tail(logs, 20))
		}
	}
}

// --metrics-listen serves /metrics on its own address, and the main
// listener has it too.
func TestMetricsListen(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 4<<10, 1)
	addr, maddr := freeAddr(t), freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--metrics-listen", maddr, "--upstream", up.url, "--data-dir", t.TempDir())
	p.waitReady(t, addr)
	pullAndCheck(t, addr, "team/app:v1", want)
	// The client has its last byte a moment before the server counts the
	// request and the fill leaves: poll briefly.
	for _, a := range []string{maddr, addr} {
		var missing []string
		for i := 0; i < 100; i++ {
			code, body := httpGet(t, "http://"+a+"/metrics")
			if code != http.StatusOK {
				t.Fatalf("GET %s/metrics: %d", a, code)
			}
			missing = nil
			for _, m := range []string{
				`slipway_cache_results_total{kind="blob",result="miss"} 2`,
				`slipway_http_requests_total{method="GET",route="manifest",status="200"} 1`,
				fmt.Sprintf(`slipway_upstream_requests_total{status="200",upstream=%q}`, up.host),
				"slipway_cache_disk_bytes ",
				"slipway_fills_in_flight 0",
				"process_resident_memory_bytes ",
			} {
				if !strings.Contains(body, m) {
					missing = append(missing, m)
				}
			}
			if len(missing) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if len(missing) > 0 {
			t.Errorf("%s/metrics has no %v", a, missing)
		}
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// --htpasswd with the config file's users section, end to end: /v2/ asks
// for a login, a limited user pushes only under its prefix, anonymous pulls
// follow --anonymous-pull.
func TestHtpasswdAndUsers(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	dir := t.TempDir()
	var b strings.Builder
	for _, u := range [][2]string{{"ci", "ci-pass"}, {"ops", "ops-pass"}} {
		h, err := bcrypt.GenerateFromPassword([]byte(u[1]), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s:%s\n", u[0], h)
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte(b.String()), 0o600)
	cfg := filepath.Join(dir, "slipway.yaml")
	os.WriteFile(cfg, []byte("htpasswd: "+htpasswd+"\nanonymous_pull: false\nusers:\n  ci: {push: [\"ci/\"]}\n"), 0o644)

	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(), "--config", cfg)
	waitStatus(t, p, "http://"+addr+"/healthz", http.StatusOK)
	if code, _ := httpGet(t, "http://"+addr+"/v2/"); code != http.StatusUnauthorized {
		t.Errorf("GET /v2/ without a login: %d, want 401", code)
	}
	img, _ := random.Image(2048, 1)
	ci := crane.WithAuth(&authn.Basic{Username: "ci", Password: "ci-pass"})
	if err := crane.Push(img, addr+"/ci/app:v1", crane.Insecure, ci); err != nil {
		t.Errorf("ci pushes to ci/app: %v", err)
	}
	if err := crane.Push(img, addr+"/other/app:v1", crane.Insecure, ci); err == nil {
		t.Error("ci pushed outside ci/")
	}
	if err := crane.Push(img, addr+"/other/app:v1", crane.Insecure,
		crane.WithAuth(&authn.Basic{Username: "ops", Password: "ops-pass"})); err != nil {
		t.Errorf("ops (not limited) pushes to other/app: %v", err)
	}
	if _, err := crane.Pull(addr+"/ci/app:v1", crane.Insecure); err == nil {
		t.Error("anonymous pull worked with anonymous_pull: false")
	}
	if _, err := crane.Pull(addr+"/ci/app:v1", crane.Insecure, ci); err != nil {
		t.Errorf("pull with a login: %v", err)
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// waitStatus polls url until it answers status (at most 10 s).
func waitStatus(t *testing.T, p *proc, url string, status int) {
	t.Helper()
	c := &http.Client{Timeout: time.Second}
	for i := 0; i < 200; i++ {
		select {
		case <-p.done:
			t.Fatalf("slipway exited: %v\n%s", p.err, p.stderr.String())
		default:
		}
		if r, err := c.Get(url); err == nil {
			r.Body.Close()
			if r.StatusCode == status {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not answer %d within 10 s", url, status)
}

func TestUploadSessionsGauge(t *testing.T) {
	up := newUpstream(t)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(),
		"--push-prefix", "local", "--log-level", "warn")
	p.waitReady(t, addr)
	gauge := func() float64 {
		t.Helper()
		m, err := serverMetrics(addr, "slipway_upload_sessions_open")
		if err != nil {
			t.Fatal(err)
		}
		v, ok := m["slipway_upload_sessions_open"]
		if !ok {
			t.Fatal("/metrics has no slipway_upload_sessions_open")
		}
		return v
	}
	if g := gauge(); g != 0 {
		t.Fatalf("no uploads yet, gauge %v", g)
	}
	var locs []string
	for i := 0; i < 3; i++ {
		resp, err := http.Post("http://"+addr+"/v2/local/app/blobs/uploads/", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("POST upload: %d", resp.StatusCode)
		}
		locs = append(locs, resp.Header.Get("Location"))
	}
	if g := gauge(); g != 3 {
		t.Errorf("3 uploads open, gauge %v", g)
	}
	req, _ := http.NewRequest(http.MethodDelete, "http://"+addr+locs[0], nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if g := gauge(); g != 2 {
		t.Errorf("after a cancel (%d), gauge %v, want 2", resp.StatusCode, g)
	}
}
