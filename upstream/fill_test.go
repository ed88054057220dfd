package upstream

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// stallingUpstream serves blob b for d: the first half, then nothing until
// the request ends or release is closed.
func stallingUpstream(t *testing.T, d digest.Digest, b []byte, release chan struct{}) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var gets atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/blobs/"+string(d)) {
			if r.URL.Path != "/v2/" {
				w.WriteHeader(http.StatusNotFound)
			}
			return
		}
		if r.Method == http.MethodGet {
			gets.Add(1)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		if r.Method == http.MethodHead {
			return
		}
		w.Write(b[:len(b)/2])
		w.(http.Flusher).Flush()
		select {
		case <-release:
			w.Write(b[len(b)/2:])
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &gets
}

func newTestStore(t *testing.T) *cache.Store {
	t.Helper()
	s, err := cache.Open(t.TempDir(), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func randBlob(t *testing.T, n int) ([]byte, digest.Digest) {
	b := make([]byte, n)
	rand.Read(b)
	return b, digest.FromBytes(b)
}

func TestCloseCancelsFillsAndStoresNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	b, d := randBlob(t, 1<<20)
	srv, _ := stallingUpstream(t, d, b, make(chan struct{}))
	store := newTestStore(t)
	c, _ := New(Config{URL: srv.URL})
	f := NewFiller(store, FillerOptions{})
	p := NewProxy(c, store, f, ProxyOptions{})

	blob, err := p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1024)
	if _, err := io.ReadFull(blob.Reader, got); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { f.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return with a fill stalled")
	}
	if _, err := io.ReadAll(blob.Reader); err == nil {
		t.Error("a waiter read to a clean EOF from a canceled fill")
	}
	blob.Close()
	if _, err := store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("canceled fill stored the blob: %v", err)
	}
	if _, err := p.Blob(context.Background(), "team/app", d); !errors.Is(err, ErrUnavailable) {
		t.Errorf("fetch after Close: %v, want ErrUnavailable", err)
	}
	srv.CloseClientConnections()
	c.rt.(*hostGuard).inner.(*http.Transport).CloseIdleConnections()
	store.Close() // badger's own goroutines
	waitGoroutines(t, before)
}

func TestIdleUpstreamTimesOutAndNextFetchRetries(t *testing.T) {
	b, d := randBlob(t, 256<<10)
	release := make(chan struct{})
	srv, gets := stallingUpstream(t, d, b, release)
	store := newTestStore(t)
	c, _ := New(Config{URL: srv.URL})
	f := NewFiller(store, FillerOptions{IdleTimeout: time.Second})
	defer f.Close()
	p := NewProxy(c, store, f, ProxyOptions{})

	blob, err := p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(blob.Reader)
	blob.Close()
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("stalled upstream: %v, want ErrUnavailable", err)
	}
	if n := countTemp(t, store); n != 0 {
		t.Errorf("%d temp files left by a failed fill", n)
	}

	close(release) // the upstream recovers: the failure poisoned nothing
	blob, err = p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(blob.Reader)
	blob.Close()
	if err != nil || digest.FromBytes(all) != d {
		t.Fatalf("retry: %v, %d bytes", err, len(all))
	}
	if n := gets.Load(); n != 2 {
		t.Errorf("%d upstream GETs, want 2 (the failed one and the retry)", n)
	}
}

func TestJoiningAFillFromAnotherRepositoryNeedsTheUpstreamsWord(t *testing.T) {
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v2/team/private/") {
			w.WriteHeader(http.StatusNotFound) // this repository has no such blob
			return
		}
		inner.ServeHTTP(w, r)
	}))
	defer reg.Close()
	b, d := randBlob(t, 64<<10)
	repo, _ := name.NewRepository(strings.TrimPrefix(reg.URL, "http://") + "/team/a")
	if err := remote.WriteLayer(repo, static.NewLayer(b, types.OCILayer)); err != nil {
		t.Fatal(err)
	}
	store := newTestStore(t)
	c, _ := New(Config{URL: reg.URL})
	f := NewFiller(store, FillerOptions{})
	defer f.Close()
	p := NewProxy(c, store, f, ProxyOptions{})

	blob, err := p.Blob(context.Background(), "team/a", d)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, blob.Reader)
	blob.Close()
	waitStored(t, store, d)

	// The in-process registry shares blobs across repositories, so it
	// confirms team/b too; a repository it does not know is refused.
	if blob, err := p.Blob(context.Background(), "team/b", d); err != nil {
		t.Errorf("team/b, confirmed by the upstream: %v", err)
	} else {
		blob.Close()
	}
	if linked, _ := store.Linked(c.Host(), "team/b", d); !linked {
		t.Error("a confirmed blob was not linked to team/b")
	}
	if blob, err := p.Blob(context.Background(), "team/private", d); !errors.Is(err, ErrNotFound) {
		t.Errorf("a stored blob served under a repository the upstream says lacks it: %v", err)
		if blob != nil {
			blob.Close()
		}
	}
}

func countTemp(t *testing.T, s *cache.Store) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(s.Dir(), "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

func waitStored(t *testing.T, s *cache.Store, d digest.Digest) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 1000 && time.Now().Before(deadline); i++ {
		if _, err := s.StatBlob(d); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("blob %s not stored", d)
}

// waitGoroutines fails if the goroutine count does not come back near
// before (a few belong to the runtime and the HTTP test server).
func waitGoroutines(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	n := runtime.NumGoroutine()
	for i := 0; i < 500 && time.Now().Before(deadline) && n > before+2; i++ {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	if n > before+2 {
		buf := make([]byte, 1<<16)
		t.Errorf("goroutines: %d before, %d after\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}
