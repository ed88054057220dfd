package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/publicsuffix"
)

// ErrForbiddenHost: the upstream sent us to a host we will not contact (a
// token realm on another site, a redirect into a private network).
var ErrForbiddenHost = errors.New("upstream: refused to contact host")

// hostGuard pins where an upstream's requests may go (invariant 6): to the
// upstream's own host or registrable domain (so Docker Hub's realm on
// auth.docker.io is fine), or — only as a redirect hop — to a public host
// such as a blob CDN. A token realm elsewhere is refused. Authorization is
// never forwarded across hosts: go-containerregistry's transports add it only
// for the registry's own host.
type hostGuard struct {
	upstream string // hostname, no port
	inner    http.RoundTripper
}

func (g *hostGuard) RoundTrip(req *http.Request) (*http.Response, error) {
	if !sameSite(req.URL.Hostname(), g.upstream) && req.Response == nil {
		return nil, fmt.Errorf("%w %q: not the upstream %q or its domain", ErrForbiddenHost, req.URL.Host, g.upstream)
	}
	return g.inner.RoundTrip(req)
}

// sameSite reports whether two hostnames are equal or share a registrable
// domain (eTLD+1).
func sameSite(a, b string) bool {
	a, b = strings.ToLower(a), strings.ToLower(b)
	if a == b {
		return true
	}
	if net.ParseIP(a) != nil || net.ParseIP(b) != nil {
		return false
	}
	da, err1 := publicsuffix.EffectiveTLDPlusOne(a)
	db, err2 := publicsuffix.EffectiveTLDPlusOne(b)
	return err1 == nil && err2 == nil && da == db
}

// newTransport is the base transport of an upstream. Unless allowPrivate,
// it refuses at dial time — after DNS, so a public name that resolves to a
// private address is caught too — any loopback, private, link-local
// (cloud metadata) or unspecified address. A proxy from the environment is
// still reachable.
func newTransport(u *url.URL, allowPrivate bool) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 64
	t.ResponseHeaderTimeout = 60 * time.Second
	var proxyAddr string
	if p, err := http.ProxyFromEnvironment(&http.Request{URL: u}); err == nil && p != nil {
		proxyAddr = p.Host
	}
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	if !allowPrivate {
		d.Control = func(network, address string, _ syscall.RawConn) error {
			if proxyAddr != "" && sameAddr(address, proxyAddr) {
				return nil
			}
			host, _, err := net.SplitHostPort(address)
			if err != nil {
				return err
			}
			ip, err := netip.ParseAddr(host)
			if err != nil {
				return err
			}
			if isPrivateAddr(ip) {
				return fmt.Errorf("%w %s: a private or loopback address", ErrForbiddenHost, address)
			}
			return nil
		}
	}
	t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return d.DialContext(ctx, network, addr)
	}
	return t
}

func sameAddr(a, b string) bool {
	ha, pa, _ := net.SplitHostPort(a)
	hb, pb, _ := net.SplitHostPort(b)
	return pa == pb && ha == hb
}

var cgnat = netip.MustParsePrefix("100.64.0.0/10")

func isPrivateAddr(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() ||
		ip.IsInterfaceLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast() || cgnat.Contains(ip)
}

// isPrivateHost reports whether an upstream named host lives on a private
// network by its own configuration: "localhost" or a private address.
func isPrivateHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && isPrivateAddr(ip)
}
