package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestSameSite(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"registry-1.docker.io", "auth.docker.io", true},
		{"ghcr.io", "ghcr.io", true},
		{"quay.io", "cdn.quay.io", true},
		{"registry-1.docker.io", "evil.com", false},
		{"registry-1.docker.io", "docker.io.evil.com", false},
		{"foo.github.io", "bar.github.io", false}, // github.io is a public suffix
		{"127.0.0.1", "127.0.0.1", true},
		{"127.0.0.1", "127.0.0.2", false},
		{"Registry.Example.com", "registry.example.COM", true},
	} {
		if got := sameSite(c.a, c.b); got != c.want {
			t.Errorf("sameSite(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

type recordingRT struct{ hosts []string }

func (r *recordingRT) RoundTrip(req *http.Request) (*http.Response, error) {
	r.hosts = append(r.hosts, req.URL.Host)
	return &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader("")), Request: req}, nil
}

func TestHostGuardRefusesForeignRealms(t *testing.T) {
	inner := &recordingRT{}
	g := &hostGuard{upstream: "registry-1.docker.io", inner: inner}
	for _, u := range []string{"https://auth.docker.io/token", "https://registry-1.docker.io/v2/"} {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		if _, err := g.RoundTrip(req); err != nil {
			t.Errorf("%s refused: %v", u, err)
		}
	}
	// A realm on another site: refused before any connection.
	req, _ := http.NewRequest(http.MethodGet, "https://tokens.evil.example/token", nil)
	if _, err := g.RoundTrip(req); !errors.Is(err, ErrForbiddenHost) {
		t.Errorf("foreign realm: %v, want ErrForbiddenHost", err)
	}
	// A redirect hop (a blob CDN) may go elsewhere; the dialer still
	// refuses private addresses.
	hop, _ := http.NewRequest(http.MethodGet, "https://production.cloudflare.docker.com/blob", nil)
	hop.Response = &http.Response{StatusCode: http.StatusTemporaryRedirect}
	if _, err := g.RoundTrip(hop); err != nil {
		t.Errorf("redirect hop refused: %v", err)
	}
	if len(inner.hosts) != 3 {
		t.Errorf("requests sent: %v", inner.hosts)
	}
}

func TestDialerRefusesPrivateAddresses(t *testing.T) {
	var accepted atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	u, _ := url.Parse("https://registry.example.com")
	tr := newTransport(u, false)
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for _, target := range []string{"http://" + ln.Addr().String() + "/", "http://[::1]:1/", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1:80/",
		"http://[64:ff9b::7f00:1]:1/", "http://[64:ff9b::a00:1]:80/", "http://[64:ff9b:1::1]:80/"} {
		_, err := client.Get(target)
		if !errors.Is(err, ErrForbiddenHost) {
			t.Errorf("GET %s: %v, want ErrForbiddenHost", target, err)
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("the loopback listener saw %d connections", n)
	}
	if !isPrivateHost("127.0.0.1") || !isPrivateHost("localhost") || isPrivateHost("registry-1.docker.io") {
		t.Error("isPrivateHost")
	}
}

// A blob redirect to another host gets no Authorization header.
func TestAuthorizationNotForwardedOnRedirect(t *testing.T) {
	var cdnAuth atomic.Value
	cdnAuth.Store("unset")
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cdnAuth.Store(r.Header.Get("Authorization"))
		io.WriteString(w, "blob")
	}))
	defer cdn.Close()
	var reg *httptest.Server
	reg = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/token":
			io.WriteString(w, `{"token":"secret-token"}`)
		case r.Header.Get("Authorization") != "Bearer secret-token":
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="t"`, reg.URL))
			w.WriteHeader(http.StatusUnauthorized)
		case strings.Contains(r.URL.Path, "/blobs/"):
			http.Redirect(w, r, cdn.URL+"/blob", http.StatusTemporaryRedirect)
		}
	}))
	defer reg.Close()
	c, _ := New(Config{URL: reg.URL})
	body, _, err := c.GetBlob(context.Background(), "team/app", digestOf("blob"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(body)
	body.Close()
	if string(b) != "blob" {
		t.Fatalf("body %q", b)
	}
	if got := cdnAuth.Load().(string); got != "" {
		t.Errorf("the redirect target got Authorization %q", got)
	}
}
