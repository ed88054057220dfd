package upstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// The public names of the redirect world. Only these two are mapped to
// in-process servers; every other host is reached (or refused) the way
// production reaches it.
const (
	publicUpstream = "registry.example.com"
	publicCDN      = "cdn.example.net"
)

// redirectWorld is an upstream that looks public (http://registry.example.com,
// a go-containerregistry registry behind bearer auth) and a blob CDN
// (http://cdn.example.net). The upstream answers a blob GET with a 307 to
// whatever target holds.
type redirectWorld struct {
	up, cdn  *httptest.Server
	blob     []byte
	d        digest.Digest
	target   atomic.Value // string: where blob GETs go; "" serves the blob
	blobGETs atomic.Int32 // blob GETs the upstream answered
	upAuth   atomic.Value // string: Authorization of the last blob GET
	cdnGETs  atomic.Int32
	cdnAuth  atomic.Value // string: Authorization the CDN saw last
}

func newRedirectWorld(t *testing.T) *redirectWorld {
	t.Helper()
	w := &redirectWorld{blob: []byte("a layer that lives on the upstream")}
	w.d = digest.FromBytes(w.blob)
	w.target.Store("")
	w.upAuth.Store("unset")
	w.cdnAuth.Store("unset")
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	seed := httptest.NewServer(reg)
	repo, err := name.NewRepository(strings.TrimPrefix(seed.URL, "http://") + "/team/app")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(repo, static.NewLayer(w.blob, types.OCILayer)); err != nil {
		t.Fatal(err)
	}
	seed.Close()

	w.up = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/token":
			io.WriteString(rw, `{"token":"upstream-token"}`)
			return
		case r.Header.Get("Authorization") != "Bearer upstream-token":
			rw.Header().Set("WWW-Authenticate", `Bearer realm="http://`+publicUpstream+`/token",service="t"`)
			rw.WriteHeader(http.StatusUnauthorized)
			return
		}
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+string(w.d)) {
			w.blobGETs.Add(1)
			w.upAuth.Store(r.Header.Get("Authorization"))
			if to := w.target.Load().(string); to != "" {
				http.Redirect(rw, r, to, http.StatusTemporaryRedirect)
				return
			}
		}
		reg.ServeHTTP(rw, r)
	}))
	t.Cleanup(w.up.Close)
	w.cdn = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.cdnGETs.Add(1)
		w.cdnAuth.Store(r.Header.Get("Authorization"))
		rw.Write(w.blob)
	}))
	t.Cleanup(w.cdn.Close)
	return w
}

// dialTransport is the production transport of an upstream configured as
// http://registry.example.com, with only the two public names dialled to
// the in-process servers.
func (w *redirectWorld) dialTransport() *http.Transport {
	u, _ := url.Parse("http://" + publicUpstream)
	tr := newTransport(u, false)
	prod := tr.DialContext
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		switch addr {
		case publicUpstream + ":80":
			return (&net.Dialer{}).DialContext(ctx, network, w.up.Listener.Addr().String())
		case publicCDN + ":80":
			return (&net.Dialer{}).DialContext(ctx, network, w.cdn.Listener.Addr().String())
		case publicUpstream + ":443", publicCDN + ":443":
			// go-containerregistry tries https first even for an http
			// registry: the public names have no TLS here.
			return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("connection refused")}
		}
		return prod(ctx, network, addr)
	}
	return tr
}

func (w *redirectWorld) client(t *testing.T, tr http.RoundTripper) *Client {
	t.Helper()
	c, err := New(Config{URL: "http://" + publicUpstream, Transport: tr, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fetch downloads the blob and checks its bytes.
func (w *redirectWorld) fetch(c *Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body, _, err := c.GetBlob(ctx, "team/app", w.d)
	if err != nil {
		return err
	}
	defer body.Close()
	b, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	if !bytes.Equal(b, w.blob) {
		return fmt.Errorf("got %q, want %q", b, w.blob)
	}
	return nil
}

// countingListener accepts connections on addr and counts them.
func countingListener(t *testing.T, network, addr string) (net.Listener, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, nil
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
	return ln, &n
}

// forbiddenTargets are redirect targets into private ranges: a loopback
// listener (by address, by localhost and in inet_aton spellings), cloud
// metadata, RFC 1918, IPv6 loopback, the unspecified address.
func forbiddenTargets(t *testing.T) (targets []string, accepted func() int32) {
	t.Helper()
	ln4, n4 := countingListener(t, "tcp4", "127.0.0.1:0")
	if ln4 == nil {
		t.Fatal("no IPv4 loopback")
	}
	_, port, _ := net.SplitHostPort(ln4.Addr().String())
	port6 := "1"
	ln6, n6 := countingListener(t, "tcp6", "[::1]:0")
	if ln6 != nil {
		_, port6, _ = net.SplitHostPort(ln6.Addr().String())
	}
	targets = []string{
		"http://" + ln4.Addr().String() + "/blob",
		"http://169.254.169.254/latest/meta-data/iam/security-credentials/",
		"http://10.0.0.1/blob",
		"http://[::1]:" + port6 + "/blob",
		"http://localhost:" + port + "/blob",
		"http://LocalHost.:" + port + "/blob",
		"http://registry.localhost:" + port + "/blob",
		"http://127.1:" + port + "/blob",
		"http://2130706433:" + port + "/blob",
		"http://0x7f.0.0.1:" + port + "/blob",
		"http://[::ffff:127.0.0.1]:" + port + "/blob",
		"http://0.0.0.0:" + port + "/blob",
		"http://192.168.1.1/blob",
		"http://[fe80::1]/blob",
	}
	return targets, func() int32 {
		n := n4.Load()
		if n6 != nil {
			n += n6.Load()
		}
		return n
	}
}

// An upstream that is not private redirects a blob GET into a private
// range: the fetch fails with ErrForbiddenHost before any connection, and
// the next fetch asks the upstream again (nothing poisoned).
func TestRedirectIntoPrivateRangesRefused(t *testing.T) {
	w := newRedirectWorld(t)
	c := w.client(t, w.dialTransport())
	targets, accepted := forbiddenTargets(t)
	for _, to := range targets {
		t.Run(to, func(t *testing.T) {
			w.target.Store(to)
			before := w.blobGETs.Load()
			err := w.fetch(c)
			if !errors.Is(err, ErrForbiddenHost) {
				t.Fatalf("redirect to %s: %v, want ErrForbiddenHost", to, err)
			}
			if n := w.blobGETs.Load() - before; n != 1 {
				t.Errorf("the upstream saw %d blob GETs, want 1", n)
			}
			// The next request goes to the upstream again; with the
			// redirect gone, it succeeds.
			w.target.Store("")
			if err := w.fetch(c); err != nil {
				t.Fatalf("after the refused redirect: %v", err)
			}
			if n := w.blobGETs.Load() - before; n != 2 {
				t.Errorf("the upstream saw %d blob GETs over both fetches, want 2", n)
			}
		})
	}
	if n := accepted(); n != 0 {
		t.Errorf("the loopback listeners accepted %d connections", n)
	}
}

// A redirect to another public host (a blob CDN) is followed, without the
// upstream's Authorization.
func TestRedirectToPublicCDNFollowedWithoutAuthorization(t *testing.T) {
	w := newRedirectWorld(t)
	c := w.client(t, w.dialTransport())
	w.target.Store("http://" + publicCDN + "/blobs/" + w.d.Encoded() + "?sig=abc")
	if err := w.fetch(c); err != nil {
		t.Fatal(err)
	}
	if w.cdnGETs.Load() != 1 {
		t.Errorf("the CDN saw %d GETs", w.cdnGETs.Load())
	}
	if got := w.upAuth.Load().(string); got != "Bearer upstream-token" {
		t.Errorf("the upstream's blob GET had Authorization %q", got)
	}
	if got := w.cdnAuth.Load().(string); got != "" {
		t.Errorf("the CDN got Authorization %q", got)
	}
}

// countingProxy is a forward HTTP proxy on loopback that serves the two
// public names itself and counts every request for any other host (a real
// proxy would have fetched those).
type countingProxy struct {
	*httptest.Server
	mu     sync.Mutex
	others map[string]int
}

func newCountingProxy(t *testing.T, w *redirectWorld) *countingProxy {
	t.Helper()
	p := &countingProxy{others: map[string]int{}}
	p.Server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodConnect && (r.Host == publicUpstream+":443" || r.Host == publicCDN+":443"):
			// go-containerregistry tries https first even for an http
			// registry: the public names have no TLS here.
			http.Error(rw, "no TLS here", http.StatusBadGateway)
		case r.URL.Host == publicUpstream:
			w.up.Config.Handler.ServeHTTP(rw, r)
		case r.URL.Host == publicCDN:
			w.cdn.Config.Handler.ServeHTTP(rw, r)
		default:
			p.mu.Lock()
			p.others[r.Method+" "+r.URL.Host]++
			p.mu.Unlock()
			http.Error(rw, "proxied", http.StatusOK)
		}
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *countingProxy) otherRequests() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]int{}
	for k, v := range p.others {
		out[k] = v
	}
	return out
}

// With HTTP(S)_PROXY set, the dialer lets the proxy's own address through,
// so it cannot stop a redirect into a private range: the proxy would fetch
// it on our behalf. The guard refuses such a URL before it is sent.
func TestRedirectIntoPrivateRangesRefusedThroughProxy(t *testing.T) {
	w := newRedirectWorld(t)
	var p *countingProxy
	p = newCountingProxy(t, w)
	proxyURL, _ := url.Parse(p.URL)
	u, _ := url.Parse("http://" + publicUpstream)
	tr := newTransportVia(u, false, func(*http.Request) (*url.URL, error) { return proxyURL, nil })
	c := w.client(t, tr)

	// Through the proxy, the upstream and a CDN work.
	w.target.Store("http://" + publicCDN + "/blob")
	if err := w.fetch(c); err != nil {
		t.Fatalf("via the proxy: %v", err)
	}
	if got := w.cdnAuth.Load().(string); w.cdnGETs.Load() != 1 || got != "" {
		t.Errorf("CDN: %d GETs, Authorization %q", w.cdnGETs.Load(), got)
	}

	targets, accepted := forbiddenTargets(t)
	for _, to := range targets {
		w.target.Store(to)
		before := w.blobGETs.Load()
		if err := w.fetch(c); !errors.Is(err, ErrForbiddenHost) {
			t.Errorf("redirect to %s via the proxy: %v, want ErrForbiddenHost", to, err)
		}
		w.target.Store("")
		if err := w.fetch(c); err != nil {
			t.Errorf("after the refused redirect to %s: %v", to, err)
		}
		if n := w.blobGETs.Load() - before; n != 2 {
			t.Errorf("%s: the upstream saw %d blob GETs over both fetches, want 2", to, n)
		}
	}
	if got := p.otherRequests(); len(got) != 0 {
		t.Errorf("the proxy was asked for private hosts: %v", got)
	}
	if n := accepted(); n != 0 {
		t.Errorf("the loopback listeners accepted %d connections", n)
	}
}

func TestHostGuardPrivateHosts(t *testing.T) {
	for _, c := range []struct {
		upstream     string
		allowPrivate bool
		url          string
		hop          bool
		ok           bool
	}{
		{"registry.example.com", false, "http://registry.example.com/v2/", false, true},
		{"registry.example.com", false, "http://cdn.example.net/blob", true, true},
		{"registry.example.com", false, "http://169.254.169.254/", true, false},
		{"registry.example.com", false, "http://[fd00::1]/", true, false},
		{"registry.example.com", false, "http://[ff02::1]/", true, false},
		{"registry.example.com", false, "http://224.0.0.1/", true, false},
		{"registry.example.com", false, "http://100.64.0.1/", true, false},
		{"registry.example.com", false, "http://8.8.8.8/", true, true},
		{"registry.example.com", false, "http://localhost.example.com/", true, true},
		// NAT64: the IPv4 address behind the well-known prefix decides; the
		// local-use prefix is private.
		{"registry.example.com", false, "http://[64:ff9b::7f00:1]/", true, false},
		{"registry.example.com", false, "http://[64:ff9b::a00:1]:5000/blob", true, false},
		{"registry.example.com", false, "http://[64:ff9b::169.254.169.254]/", true, false},
		{"registry.example.com", false, "http://[64:ff9b:1::808:808]/", true, false},
		{"registry.example.com", false, "http://[64:ff9b::808:808]/blob", true, true},
		{"registry.corp.example", true, "http://[64:ff9b::a00:1]/blob", true, true},
		// An upstream configured as private (AllowPrivate, or a private
		// host itself) may send us to its neighbours.
		{"registry.corp.example", true, "http://10.1.2.3:9000/blob", true, true},
		{"127.0.0.1", false, "http://127.0.0.1:9000/blob", true, true},
		{"localhost", false, "http://10.1.2.3/blob", true, true},
		{"10.0.0.5", false, "http://10.0.0.5:5000/v2/", false, true},
	} {
		inner := &recordingRT{}
		g := &hostGuard{upstream: c.upstream, allowPrivate: c.allowPrivate, inner: inner}
		req, _ := http.NewRequest(http.MethodGet, c.url, nil)
		if c.hop {
			req.Response = &http.Response{StatusCode: http.StatusTemporaryRedirect}
		}
		_, err := g.RoundTrip(req)
		if c.ok && err != nil {
			t.Errorf("upstream %s (allowPrivate %v): %s refused: %v", c.upstream, c.allowPrivate, c.url, err)
		}
		if !c.ok && (!errors.Is(err, ErrForbiddenHost) || len(inner.hosts) != 0) {
			t.Errorf("upstream %s: %s: %v (sent %v), want ErrForbiddenHost and nothing sent", c.upstream, c.url, err, inner.hosts)
		}
	}
}

func TestIsPrivateHost(t *testing.T) {
	for host, want := range map[string]bool{
		"localhost": true, "LOCALHOST.": true, "a.b.localhost": true, "127.0.0.1": true, "127.1": true,
		"2130706433": true, "0x7f000001": true, "0177.0.0.1": true, "0": true, "::1": true,
		"::ffff:169.254.169.254": true, "fe80::1%eth0": true, "10.0.0.1": true, "172.16.0.1": true,
		"registry-1.docker.io": false, "localhost.example.com": false, "8.8.8.8": false,
		"2606:4700::1": false, "1.2.3.4.5": false, "0x": false, "256.1.1.1": false, "1.16777216": false,
		"cafe": false, "": false,
		"64:ff9b::7f00:1": true, "64:ff9b::a00:1": true, "64:ff9b::127.0.0.1": true, "64:ff9b::c0a8:101": true,
		"64:ff9b::a9fe:a9fe": true, "64:ff9b::6440:1": true, "64:ff9b::": true, "64:ff9b:1::1": true,
		"64:ff9b:1:ffff::808:808": true, "::ffff:64:ff9b": false, "64:ff9b::808:808": false,
		"64:ff9b::1.1.1.1": false, "64:ff9b:2::a00:1": false,
	} {
		if got := isPrivateHost(host); got != want {
			t.Errorf("isPrivateHost(%q) = %v, want %v", host, got, want)
		}
	}
}
