package upstream

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder is an Observer that keeps every report.
type recorder struct {
	mu       sync.Mutex
	fills    []FillReport
	requests []RequestReport
}

func (r *recorder) ObserveFill(f FillReport) {
	r.mu.Lock()
	r.fills = append(r.fills, f)
	r.mu.Unlock()
}

func (r *recorder) ObserveUpstreamRequest(q RequestReport) {
	r.mu.Lock()
	r.requests = append(r.requests, q)
	r.mu.Unlock()
}

func (r *recorder) snapshot() ([]FillReport, []RequestReport) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]FillReport(nil), r.fills...), append([]RequestReport(nil), r.requests...)
}

// A fill that pauses between its halves is reported once, as a success
// from the upstream, with a first byte that came at least the pause before
// its end; every request sent to the upstream is reported once too.
func TestFillIsObservedOnceWithItsFirstByteBeforeItsEnd(t *testing.T) {
	b, d := randBlob(t, 512<<10)
	release := make(chan struct{})
	srv, _ := stallingUpstream(t, d, b, release)
	store := newTestStore(t)
	rec := &recorder{}
	c, _ := New(Config{URL: srv.URL, Observer: rec})
	f := NewFiller(store, FillerOptions{Observer: rec, IdleTimeout: 30 * time.Second})
	defer f.Close()
	p := NewProxy(c, store, f, ProxyOptions{})

	blob, err := p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 1024)
	if _, err := io.ReadFull(blob.Reader, first); err != nil {
		t.Fatal(err)
	}
	const pause = 100 * time.Millisecond
	time.Sleep(pause)
	close(release)
	if _, err := io.Copy(io.Discard, blob.Reader); err != nil {
		t.Fatal(err)
	}
	blob.Close()
	waitUntil(t, "the fill's report", func() bool { fills, _ := rec.snapshot(); return len(fills) > 0 })
	waitStored(t, store, d)

	fills, requests := rec.snapshot()
	if len(fills) != 1 {
		t.Fatalf("%d fill reports, want 1: %+v", len(fills), fills)
	}
	r := fills[0]
	if r.Err != nil || r.From != FromUpstream || r.Upstream != c.Host() {
		t.Errorf("report %+v, want a success from the upstream %s", r, c.Host())
	}
	if r.FirstByte <= 0 || r.FirstByte > r.Duration {
		t.Errorf("first byte after %v of a fill of %v: want 0 < first byte <= duration", r.FirstByte, r.Duration)
	}
	if gap := r.Duration - r.FirstByte; gap < pause {
		t.Errorf("%v between the first byte and the end of a fill that paused %v after it", gap, pause)
	}
	var sent uint64
	for _, n := range c.Responses() {
		sent += n
	}
	if sent == 0 || uint64(len(requests)) != sent {
		t.Errorf("%d request reports for %d requests sent", len(requests), sent)
	}
	for _, q := range requests {
		if q.Upstream != c.Host() || q.Duration <= 0 {
			t.Errorf("request report %+v", q)
		}
	}
	if s := f.Stalled(); s != 0 {
		t.Errorf("Stalled %v with no fill in flight, want 0", s)
	}
}

// Stalled grows while a fill waits for its response headers or for more
// body bytes, and a fill the idle timeout ends is reported as a failure
// (with the first byte it did get).
func TestStalledFillsShowAndFailedFillsAreReported(t *testing.T) {
	t.Run("waiting for the body", func(t *testing.T) {
		b, d := randBlob(t, 256<<10)
		srv, _ := stallingUpstream(t, d, b, make(chan struct{}))
		store := newTestStore(t)
		rec := &recorder{}
		c, _ := New(Config{URL: srv.URL})
		f := NewFiller(store, FillerOptions{Observer: rec, IdleTimeout: time.Second})
		defer f.Close()
		if f.IdleTimeout() != time.Second {
			t.Errorf("IdleTimeout %v, want 1s", f.IdleTimeout())
		}
		p := NewProxy(c, store, f, ProxyOptions{})
		blob, err := p.Blob(context.Background(), "team/app", d)
		if err != nil {
			t.Fatal(err)
		}
		defer blob.Close()
		waitUntil(t, "Stalled to pass 300ms", func() bool { return f.Stalled() > 300*time.Millisecond })
		if _, err := io.ReadAll(blob.Reader); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("a fill the idle timeout ended: %v, want ErrUnavailable", err)
		}
		waitUntil(t, "the fill's report", func() bool { fills, _ := rec.snapshot(); return len(fills) > 0 })
		fills, _ := rec.snapshot()
		if len(fills) != 1 || fills[0].Err == nil || fills[0].FirstByte <= 0 || fills[0].From != FromUpstream {
			t.Errorf("reports %+v, want one failure from the upstream after a first byte", fills)
		}
		waitUntil(t, "the fill to leave", func() bool { return f.InFlight() == 0 })
		if s := f.Stalled(); s != 0 {
			t.Errorf("Stalled %v with no fill in flight", s)
		}
	})
	t.Run("waiting for the response headers", func(t *testing.T) {
		_, d := randBlob(t, 1024)
		release := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/v2/" {
				return
			}
			select {
			case <-release:
			case <-r.Context().Done():
			}
			w.WriteHeader(http.StatusNotFound)
		}))
		defer srv.Close()
		defer close(release)
		store := newTestStore(t)
		rec := &recorder{}
		c, _ := New(Config{URL: srv.URL, Retries: -1})
		f := NewFiller(store, FillerOptions{Observer: rec, IdleTimeout: 100 * time.Millisecond})
		defer f.Close()
		p := NewProxy(c, store, f, ProxyOptions{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			blob, err := p.Blob(ctx, "team/app", d)
			if err == nil {
				blob.Close()
			}
			done <- err
		}()
		// The idle timer starts with the body, so nothing cancels this
		// fill but its timeout: it is stuck where Stalled sees it.
		waitUntil(t, "Stalled to pass twice the idle timeout", func() bool { return f.Stalled() > 200*time.Millisecond })
		cancel()
		<-done
		if fills, _ := rec.snapshot(); len(fills) != 0 {
			t.Errorf("a fill still waiting was reported: %+v", fills)
		}
	})
}

// upstream reports through Observer and getters; it must not import
// prometheus (DESIGN.md: only mirror knows metrics).
func TestNoPrometheusImport(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if !strings.Contains(string(out), "slipway/cache") {
		t.Fatalf("go list -deps printed no slipway/cache: %s", out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/prometheus/") || strings.HasPrefix(p, "github.com/labstack/") {
			t.Errorf("upstream imports %s", p)
		}
	}
}
