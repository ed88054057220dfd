package mirror

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// redirectEnv is a mirror whose upstream looks public: configured as
// http://registry.example.com (bearer auth, a realm on its own host), it
// is a fakeUpstream reached by a transport that dials only that name and
// cdn.example.net to in-process servers. Every other host is left to the
// upstream client's guard.
type redirectEnv struct {
	up      *fakeUpstream
	store   *cache.Store
	fills   *upstream.Filler
	srv     *httptest.Server
	target  atomic.Value // string: where the upstream redirects blob GETs; "" serves
	cdnGETs atomic.Int32
	cdnAuth atomic.Value // string
}

func newRedirectEnv(t *testing.T, blob []byte) *redirectEnv {
	t.Helper()
	e := &redirectEnv{up: newFakeUpstream(t)}
	e.target.Store("")
	e.cdnAuth.Store("unset")
	e.up.pushBlobTo(t, "team/app", blob)
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		switch {
		case r.URL.Path == "/token":
			io.WriteString(w, `{"token":"good","expires_in":300}`)
			return true
		case r.Header.Get("Authorization") != "Bearer good":
			w.Header().Set("WWW-Authenticate", `Bearer realm="http://registry.example.com/token",service="fake"`)
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		to := e.target.Load().(string)
		if to == "" || r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") {
			return false
		}
		http.Redirect(w, r, to, http.StatusTemporaryRedirect)
		return true
	})
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.cdnGETs.Add(1)
		e.cdnAuth.Store(r.Header.Get("Authorization"))
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		w.Write(blob)
	}))
	t.Cleanup(cdn.Close)

	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		switch addr {
		case "registry.example.com:80":
			addr = e.up.Listener.Addr().String()
		case "cdn.example.net:80":
			addr = cdn.Listener.Addr().String()
		case "registry.example.com:443":
			// go-containerregistry tries https first; there is none.
			return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("connection refused")}
		}
		return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
	}
	log := slog.New(slog.DiscardHandler)
	st, err := cache.Open(t.TempDir(), cache.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	c, err := upstream.New(upstream.Config{URL: "http://registry.example.com", Transport: tr, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	e.fills = upstream.NewFiller(st, upstream.FillerOptions{Logger: log, IdleTimeout: 5 * time.Second})
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{Logger: log})
	s, err := New(Config{Store: st, Upstreams: []Upstream{{Proxy: p}}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		e.srv.Close()
		e.fills.Close()
		st.Close()
	})
	return e
}

// loopbackListener counts the connections it accepts.
func loopbackListener(t *testing.T, network, addr string) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		return "", nil
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	return ln.Addr().String(), &n
}

// TestBlobRedirectIntoPrivateRanges: the upstream answers a blob GET with
// a redirect into a private range. The client gets 502 in an OCI body,
// nothing reaches the target, nothing is cached, and the next pull asks
// the upstream again and, once it behaves, is served.
func TestBlobRedirectIntoPrivateRanges(t *testing.T) {
	blob := randomBytes(t, 32<<10)
	d := digest.FromBytes(blob)
	blobPath := "/v2/team/app/blobs/" + string(d)
	addr4, n4 := loopbackListener(t, "tcp4", "127.0.0.1:0")
	if n4 == nil {
		t.Fatal("no IPv4 loopback")
	}
	_, port, _ := net.SplitHostPort(addr4)
	addr6, n6 := loopbackListener(t, "tcp6", "[::1]:0")
	if n6 == nil {
		addr6 = "[::1]:1"
	}
	for _, to := range []string{
		"http://" + addr4 + "/blob",
		"http://169.254.169.254/latest/meta-data/",
		"http://10.0.0.1/blob",
		"http://" + addr6 + "/blob",
		"http://localhost:" + port + "/blob",
	} {
		t.Run(to, func(t *testing.T) {
			e := newRedirectEnv(t, blob)
			e.target.Store(to)
			for i := 1; i <= 2; i++ {
				expectError(t, http.MethodGet, e.srv.URL+blobPath, nil, http.StatusBadGateway, "UNAVAILABLE")
				// Not negatively cached: every pull asks the upstream.
				if n := e.up.count(http.MethodGet, blobPath); n != i {
					t.Errorf("after pull %d the upstream saw %d blob GETs", i, n)
				}
			}
			waitFor(t, "fill ended", func() bool { return e.fills.InFlight() == 0 })
			if _, err := e.store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
				t.Fatalf("cached after a refused redirect: %v", err)
			}
			e.target.Store("")
			if err := getAndVerify(e.srv.URL+blobPath, d, int64(len(blob)), nil); err != nil {
				t.Fatalf("after the upstream recovered: %v", err)
			}
			if n := e.up.count(http.MethodGet, blobPath); n != 3 {
				t.Errorf("the upstream saw %d blob GETs, want 3", n)
			}
		})
	}
	n := n4.Load()
	if n6 != nil {
		n += n6.Load()
	}
	if n != 0 {
		t.Errorf("the loopback listeners accepted %d connections", n)
	}
}

// A redirect to a public CDN is followed, with no Authorization, and the
// blob is cached.
func TestBlobRedirectToPublicCDN(t *testing.T) {
	blob := randomBytes(t, 32<<10)
	d := digest.FromBytes(blob)
	e := newRedirectEnv(t, blob)
	e.target.Store("http://cdn.example.net/blobs/" + d.Encoded() + "?sig=abc")
	if err := getAndVerify(e.srv.URL+"/v2/team/app/blobs/"+string(d), d, int64(len(blob)), nil); err != nil {
		t.Fatal(err)
	}
	if e.cdnGETs.Load() != 1 {
		t.Errorf("the CDN saw %d GETs", e.cdnGETs.Load())
	}
	if got := e.cdnAuth.Load().(string); got != "" {
		t.Errorf("the CDN got Authorization %q", got)
	}
	waitFor(t, "blob cached", func() bool { _, err := e.store.StatBlob(d); return err == nil })
}
