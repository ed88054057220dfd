package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
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
//
// Unless the upstream itself lives on a private network, no request — the
// first or any redirect hop — may name a loopback, private, link-local,
// unspecified or multicast address, or localhost. The dialer refuses such
// addresses too, and after DNS, but it cannot see through an HTTP(S)_PROXY:
// it lets the proxy's own address through, and the proxy would then fetch
// http://169.254.169.254/ on our behalf.
type hostGuard struct {
	upstream string // hostname, no port
	// allowPrivate is Config.AllowPrivate. An upstream whose own host is
	// private (isPrivateHost) is allowed private hosts without it, as its
	// dialer is.
	allowPrivate bool
	inner        http.RoundTripper
}

func (g *hostGuard) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Hostname()
	if !sameSite(host, g.upstream) && req.Response == nil {
		closeBody(req)
		return nil, fmt.Errorf("%w %q: not the upstream %q or its domain", ErrForbiddenHost, req.URL.Host, g.upstream)
	}
	if !g.allowPrivate && !isPrivateHost(g.upstream) && isPrivateHost(host) {
		closeBody(req)
		return nil, fmt.Errorf("%w %q: a loopback, private or link-local address", ErrForbiddenHost, req.URL.Host)
	}
	return g.inner.RoundTrip(req)
}

// closeBody keeps RoundTrip's promise to close the request body, even when
// it sends nothing.
func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
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
	return newTransportVia(u, allowPrivate, http.ProxyFromEnvironment)
}

// newTransportVia is newTransport with the proxy chosen by proxy (tests
// point it at a local proxy; the environment is read once per process).
func newTransportVia(u *url.URL, allowPrivate bool, proxy func(*http.Request) (*url.URL, error)) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 64
	t.ResponseHeaderTimeout = 60 * time.Second
	t.Proxy = proxy
	var proxyAddr string
	if p, err := proxy(&http.Request{URL: u}); err == nil && p != nil {
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

var (
	cgnat = netip.MustParsePrefix("100.64.0.0/10")
	// NAT64 (RFC 6052): an address under the well-known prefix carries an
	// IPv4 address in its last 32 bits, and the translator on the path
	// connects to that; DNS64 gives every public IPv4 host such an address
	// on an IPv6-only network, so it is as private as the address it
	// carries. The local-use prefix (RFC 8215) maps however the network
	// chose: private.
	nat64      = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")
)

func isPrivateAddr(ip netip.Addr) bool {
	ip = ip.Unmap()
	if nat64.Contains(ip) {
		b := ip.As16()
		ip = netip.AddrFrom4([4]byte(b[12:]))
	}
	return ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() ||
		ip.IsInterfaceLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast() || cgnat.Contains(ip) ||
		nat64Local.Contains(ip)
}

// isPrivateHost reports whether a URL's host names a private network by
// itself: localhost or a name under .localhost (RFC 6761), or a loopback,
// private, link-local, unspecified or multicast address (or one of those
// behind a NAT64 prefix, isPrivateAddr) — also written the
// old inet_aton ways ("127.1", "2130706433", "0x7f.0.0.1") that a proxy or
// the system resolver may still accept.
func isPrivateHost(host string) bool {
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		var ok bool
		if ip, ok = parseLegacyIPv4(host); !ok {
			return false
		}
	}
	return isPrivateAddr(ip)
}

// parseLegacyIPv4 reads an IPv4 address as inet_aton does: one to four
// parts, each decimal, octal (leading 0) or hex (0x), the last filling the
// bytes left.
func parseLegacyIPv4(s string) (netip.Addr, bool) {
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var v uint64
	for i, p := range parts {
		base := 10
		switch {
		case len(p) > 2 && (p[:2] == "0x"):
			base, p = 16, p[2:]
		case len(p) > 1 && p[0] == '0':
			base, p = 8, p[1:]
		}
		n, err := strconv.ParseUint(p, base, 32)
		if err != nil {
			return netip.Addr{}, false
		}
		if i < len(parts)-1 {
			if n > 0xff {
				return netip.Addr{}, false
			}
			v |= n << (8 * (3 - i))
			continue
		}
		if rest := uint(8 * (4 - i)); rest < 32 && n >= 1<<rest {
			return netip.Addr{}, false
		}
		v |= n
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}
