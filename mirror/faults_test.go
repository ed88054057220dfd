package mirror

import (
	"bytes"
	"errors"
	"net/http"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// TestUpstreamFaults: for each way an upstream can misbehave on a blob
// download, no client gets a complete 200 with wrong bytes, nothing is
// cached, the fill ends (no hang), the next pull after the upstream recovers
// succeeds, and no goroutine is left behind.
func TestUpstreamFaults(t *testing.T) {
	b := bytes.Repeat([]byte("slipway!"), 32<<10) // 256 KiB
	d := digest.FromBytes(b)
	half := len(b) / 2
	faults := []struct {
		name   string
		status int // what the client sees first: 200 (then a cut) or an error status
		serve  func(w http.ResponseWriter, r *http.Request)
	}{
		{"reset mid-blob", 200, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Write(b[:half])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}},
		{"truncated with a correct Content-Length", 200, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Write(b[:len(b)-1])
			panic(http.ErrAbortHandler)
		}},
		{"wrong bytes", 200, func(w http.ResponseWriter, r *http.Request) {
			bad := bytes.Clone(b)
			bad[7] ^= 1
			w.Header().Set("Content-Length", strconv.Itoa(len(bad)))
			w.Write(bad)
		}},
		{"Content-Length too small", 200, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(b)-10))
			w.Write(b[:len(b)-10])
		}},
		{"no Content-Length, extra bytes", 200, func(w http.ResponseWriter, r *http.Request) {
			w.Write(append(bytes.Clone(b), "junk"...))
		}},
		{"stalls forever", 200, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Write(b[:half])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}},
		{"429", 429, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
		}},
		{"500", 503, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) }},
		{"502", 503, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(502) }},
		{"503", 503, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) }},
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			e := newPullEnv(t, false, func(o *upstream.FillerOptions) { o.IdleTimeout = 300 * time.Millisecond })
			e.pushBlob(t, "team/app", b)
			before := runtime.NumGoroutine()
			broken := true
			var mu = make(chan struct{}, 1)
			mu <- struct{}{}
			e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
				<-mu
				on := broken
				mu <- struct{}{}
				if !on || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, string(d)) {
					return false
				}
				f.serve(w, r)
				return true
			})
			start := time.Now()
			err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil)
			if err == nil {
				t.Fatal("a client got a complete, verified blob from a broken upstream")
			}
			if f.status != 200 && !strings.Contains(err.Error(), "status "+strconv.Itoa(f.status)) {
				t.Errorf("client saw %v, want status %d", err, f.status)
			}
			if time.Since(start) > 15*time.Second {
				t.Errorf("the failure took %s", time.Since(start))
			}
			if _, err := e.store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
				t.Fatalf("cached after a fault: %v", err)
			}
			waitFor(t, "temp files removed", func() bool { return countFiles(t, filepath.Join(e.dir, "tmp")) == 0 })
			waitFor(t, "fill ended", func() bool { return e.fills.InFlight() == 0 })

			<-mu
			broken = false
			mu <- struct{}{}
			if f.status == 429 {
				time.Sleep(1100 * time.Millisecond) // the upstream asked for a pause
			}
			if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
				t.Fatalf("after recovery: %v", err)
			}
			http.DefaultClient.CloseIdleConnections()
			deadline := time.Now().Add(5 * time.Second)
			for runtime.NumGoroutine() > before+5 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if n := runtime.NumGoroutine(); n > before+5 {
				t.Errorf("goroutines: %d before, %d after", before, n)
			}
		})
	}
}

// TestSlowTrickleIsServedCorrectly: an upstream sending 1 KiB/s is slow,
// not dead: the client gets every byte, verified.
func TestSlowTrickleIsServedCorrectly(t *testing.T) {
	e := newPullEnv(t, false, func(o *upstream.FillerOptions) { o.IdleTimeout = 2 * time.Second })
	b := bytes.Repeat([]byte("x"), 2048)
	d := e.pushBlob(t, "team/app", b)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, string(d)) {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		for i := 0; i < len(b); i += 256 {
			w.Write(b[i : i+256])
			w.(http.Flusher).Flush()
			time.Sleep(250 * time.Millisecond)
		}
		return true
	})
	if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
		t.Fatal(err)
	}
}

// TestFailingTokenServer: the upstream's token endpoint fails; the client
// gets a clear OCI error, and the pull works once it recovers.
func TestFailingTokenServer(t *testing.T) {
	e := newPullEnv(t, false)
	b := []byte("token test")
	d := e.pushBlob(t, "team/app", b)
	failing := make(chan bool, 1)
	failing <- true
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		f := <-failing
		failing <- f
		if r.URL.Path == "/token" {
			if f {
				w.WriteHeader(http.StatusInternalServerError)
				return true
			}
			w.Write([]byte(`{"token":"t"}`))
			return true
		}
		if r.Header.Get("Authorization") != "Bearer t" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+e.up.URL+`/token",service="x"`)
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	})
	resp := do(t, http.MethodGet, e.url("/v2/team/app/blobs/"+string(d)), nil)
	if resp.StatusCode < 500 {
		t.Errorf("token server down: status %d, want a 5xx", resp.StatusCode)
	}
	<-failing
	failing <- false
	if err := getAndVerify(e.url("/v2/team/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
		t.Fatalf("after the token server recovered: %v", err)
	}
}
