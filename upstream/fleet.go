package upstream

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// A fleet: replicas that share one object store (cache's shared tier) and
// ask each other before they ask an upstream. Each digest, and each
// proxied repository's manifests, has one owner among the live replicas,
// chosen by rendezvous (highest random weight) hashing: a replica that
// lacks a blob reads it from the shared tier, else from its owner, which
// fills it from the upstream once for the whole fleet. While membership is
// stable that is one upstream fetch per digest; a replica that joins or
// leaves moves the ownership of a share of the digests, and a fill that
// was running on a replica that died is started again by the next owner.

// PeerTokenHeader carries the fleet's shared token on peer requests; the
// peer listener answers nothing without it.
const PeerTokenHeader = "X-Slipway-Peer-Token"

// ErrPeerDown is a peer that could not be reached: the caller does the
// work itself.
var ErrPeerDown = errors.New("upstream: peer unreachable")

// FleetConfig describes a replica's fleet.
type FleetConfig struct {
	// Self is this replica's peer address (host:port) as the others reach
	// it.
	Self string
	// Peers are the replicas' peer addresses (Self among them or not).
	Peers []string
	// DNS, if set, is a name whose addresses are the replicas (a
	// Kubernetes headless Service), each on Self's port; it is resolved
	// again every DNSInterval.
	DNS         string
	DNSInterval time.Duration // default 10 s
	// Token is the secret every replica shares.
	Token  string
	Logger *slog.Logger
	// Client sends peer requests; default: a client without timeout
	// (blobs stream as long as they need) whose dials time out.
	Client *http.Client
	// Resolve looks names up; default net.DefaultResolver (tests).
	Resolve func(ctx context.Context, host string) ([]string, error)
}

// Fleet is a replica's view of its fleet. It is safe for concurrent use.
type Fleet struct {
	self, id, port, token string
	dns                   string
	dnsEvery              time.Duration
	resolve               func(ctx context.Context, host string) ([]string, error)
	client                *http.Client
	log                   *slog.Logger

	mu      sync.Mutex
	members map[string]*member // by peer address, Self not among them

	stop chan struct{}
	wg   sync.WaitGroup
}

type member struct {
	addr, id string
	alive    bool
	fails    int
}

// ReplicaID is the short name of the replica at peer address addr; it
// starts the ids of its upload sessions.
func ReplicaID(addr string) string {
	h := sha256.Sum256([]byte(addr))
	return hex.EncodeToString(h[:4])
}

// NewFleet returns the fleet; Start begins watching its members.
func NewFleet(c FleetConfig) (*Fleet, error) {
	_, port, err := net.SplitHostPort(c.Self)
	if err != nil {
		return nil, fmt.Errorf("upstream: fleet: this replica's peer address %q: %w", c.Self, err)
	}
	if c.Token == "" {
		return nil, errors.New("upstream: fleet: no peer token")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.DNSInterval <= 0 {
		c.DNSInterval = 10 * time.Second
	}
	if c.Resolve == nil {
		c.Resolve = net.DefaultResolver.LookupHost
	}
	if c.Client == nil {
		c.Client = &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}}
	}
	f := &Fleet{self: c.Self, id: ReplicaID(c.Self), port: port, token: c.Token, dns: c.DNS, dnsEvery: c.DNSInterval,
		resolve: c.Resolve, client: c.Client, log: c.Logger, members: map[string]*member{}, stop: make(chan struct{})}
	f.setMembers(c.Peers)
	return f, nil
}

// Start pings the members (and resolves DNS) once, then keeps doing so
// every second until Close.
func (f *Fleet) Start() {
	f.refresh()
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		ping := time.NewTicker(time.Second)
		defer ping.Stop()
		lastDNS := time.Now()
		for {
			select {
			case <-f.stop:
				return
			case <-ping.C:
			}
			if f.dns != "" && time.Since(lastDNS) >= f.dnsEvery {
				f.resolveDNS()
				lastDNS = time.Now()
			}
			f.pingAll()
		}
	}()
}

// Close stops watching.
func (f *Fleet) Close() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	f.wg.Wait()
}

func (f *Fleet) refresh() {
	if f.dns != "" {
		f.resolveDNS()
	}
	f.pingAll()
}

// setMembers makes addrs (less Self) the members, keeping what is known of
// the ones that stay.
func (f *Fleet) setMembers(addrs []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	next := map[string]*member{}
	for _, a := range addrs {
		if a == "" || a == f.self {
			continue
		}
		if m, ok := f.members[a]; ok {
			next[a] = m
		} else {
			next[a] = &member{addr: a, id: ReplicaID(a)}
		}
	}
	f.members = next
}

func (f *Fleet) resolveDNS() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hosts, err := f.resolve(ctx, f.dns)
	if err != nil {
		f.log.Warn("fleet: resolving peers", "name", f.dns, "err", err)
		return
	}
	var addrs []string
	for _, h := range hosts {
		addrs = append(addrs, net.JoinHostPort(h, f.port))
	}
	f.setMembers(addrs)
}

func (f *Fleet) pingAll() {
	f.mu.Lock()
	ms := make([]*member, 0, len(f.members))
	for _, m := range f.members {
		ms = append(ms, m)
	}
	f.mu.Unlock()
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			err := f.ping(ctx, m.addr)
			f.mu.Lock()
			defer f.mu.Unlock()
			was := m.alive
			if err == nil {
				m.alive, m.fails = true, 0
			} else if m.fails++; m.fails >= 2 || !m.alive {
				m.alive = false
			}
			if was != m.alive {
				f.log.Info("fleet: peer", "peer", m.addr, "alive", m.alive)
			}
		})
	}
	wg.Wait()
}

func (f *Fleet) ping(ctx context.Context, addr string) error {
	resp, err := f.do(ctx, addr, http.MethodGet, "/peer/v1/ping", nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// ID is this replica's id.
func (f *Fleet) ID() string { return f.id }

// Self is this replica's peer address.
func (f *Fleet) Self() string { return f.self }

// Alive lists the peer addresses of the replicas thought alive, this one
// included, sorted.
func (f *Fleet) Alive() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := []string{f.self}
	for _, m := range f.members {
		if m.alive {
			out = append(out, m.addr)
		}
	}
	slices.Sort(out)
	return out
}

// Owner is the replica that owns key among the live ones: its peer
// address, and whether it is this replica.
func (f *Fleet) Owner(key string) (string, bool) {
	o := OwnerOf(key, f.Alive())
	return o, o == f.self
}

// OwnerOf is the owner of key among the replicas at peer addresses addrs:
// the one whose id hashed with key scores highest (rendezvous hashing). A
// replica that joins or leaves moves only the keys it wins or held.
func OwnerOf(key string, addrs []string) string {
	var best string
	var bestScore uint64
	for _, a := range addrs {
		if s := score(ReplicaID(a), key); best == "" || s > bestScore || (s == bestScore && a < best) {
			best, bestScore = a, s
		}
	}
	return best
}

func score(id, key string) uint64 {
	h := sha256.Sum256([]byte(id + "\x00" + key))
	return binary.BigEndian.Uint64(h[:8])
}

// Replica is the peer address of the live replica with id, if any.
func (f *Fleet) Replica(id string) (string, bool) {
	if id == f.id {
		return f.self, true
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.members {
		if m.id == id && m.alive {
			return m.addr, true
		}
	}
	return "", false
}

// CheckToken reports whether r carries the fleet's token.
func (f *Fleet) CheckToken(r *http.Request) bool {
	got := r.Header.Get(PeerTokenHeader)
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(f.token)) == 1
}

// Forward prepares r to be sent to the replica at addr's peer listener,
// as a client request it handles itself (upload sessions live on one
// replica): the URL, the token.
func (f *Fleet) Forward(r *http.Request, addr string) {
	r.URL.Scheme, r.URL.Host = "http", addr
	r.URL.Path = "/peer/v1/client" + r.URL.Path
	r.URL.RawPath = ""
	r.Host = addr
	r.Header.Set(PeerTokenHeader, f.token)
}

// Transport is what forwarded requests go through.
func (f *Fleet) Transport() http.RoundTripper { return f.client.Transport }

func (f *Fleet) do(ctx context.Context, addr, method, pathQuery string, header http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+pathQuery, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set(PeerTokenHeader, f.token)
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrPeerDown, addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil, peerStatus(addr, resp.StatusCode)
	}
	return resp, nil
}

// peerStatus maps a peer's error answer onto the sentinels, as the
// upstream's would be: the peer answered for the upstream.
func peerStatus(addr string, status int) error {
	switch {
	case status == http.StatusNotFound:
		return fmt.Errorf("%w (peer %s)", ErrNotFound, addr)
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return fmt.Errorf("%w (peer %s said %d)", ErrUnauthorized, addr, status)
	case status == http.StatusTooManyRequests:
		return fmt.Errorf("%w (peer %s)", ErrRateLimited, addr)
	case status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout:
		return fmt.Errorf("%w (peer %s said %d)", ErrUnavailable, addr, status)
	}
	return fmt.Errorf("%w: peer %s answered %d", ErrPeerDown, addr, status)
}

// GetBlob streams blob d of ns/repo from the replica at addr, which
// serves it as a client would get it (filling it from the shared tier or
// the upstream if it must). size is -1 if unknown.
func (f *Fleet) GetBlob(ctx context.Context, addr, ns, repo string, d digest.Digest) (io.ReadCloser, int64, error) {
	q := url.Values{"ns": {ns}, "repo": {repo}, "digest": {string(d)}}
	resp, err := f.do(ctx, addr, http.MethodGet, "/peer/v1/blob?"+q.Encode(), nil)
	if err != nil {
		return nil, 0, err
	}
	return resp.Body, resp.ContentLength, nil
}

// GetManifest asks the replica at addr for manifest ref of ns/repo: it
// answers from its cache or its upstream, as a client would be. fetchedAt
// is when that replica last confirmed a tag.
func (f *Fleet) GetManifest(ctx context.Context, addr, ns, repo, ref string, accept []string) (cache.Manifest, time.Time, error) {
	q := url.Values{"ns": {ns}, "repo": {repo}, "ref": {ref}}
	h := http.Header{}
	if len(accept) > 0 {
		h.Set("Accept", strings.Join(accept, ", "))
	}
	resp, err := f.do(ctx, addr, http.MethodGet, "/peer/v1/manifest?"+q.Encode(), h)
	if err != nil {
		return cache.Manifest{}, time.Time{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil || len(b) > MaxManifestSize {
		return cache.Manifest{}, time.Time{}, fmt.Errorf("%w: manifest from peer %s: %v", ErrPeerDown, addr, err)
	}
	d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil || !d.Algorithm().Available() || d.Algorithm().FromBytes(b) != d {
		return cache.Manifest{}, time.Time{}, fmt.Errorf("%w: manifest from peer %s does not match its digest", ErrPeerDown, addr)
	}
	at, err := time.Parse(time.RFC3339Nano, resp.Header.Get(FetchedAtHeader))
	if err != nil {
		at = time.Now()
	}
	return cache.Manifest{Digest: d, MediaType: resp.Header.Get("Content-Type"), Bytes: b, Origin: cache.OriginPulled}, at, nil
}

// FetchedAtHeader carries, on a peer's manifest answer, when its tag was
// last confirmed by the upstream.
const FetchedAtHeader = "X-Slipway-Fetched-At"

// hop marks a request that came from a peer: it is answered here and never
// forwarded again.
type hopKey struct{}

// WithHop marks ctx as a peer's request.
func WithHop(ctx context.Context) context.Context { return context.WithValue(ctx, hopKey{}, true) }

// IsHop reports whether ctx is a peer's request.
func IsHop(ctx context.Context) bool { v, _ := ctx.Value(hopKey{}).(bool); return v }

// FormatFetchedAt writes t for FetchedAtHeader.
func FormatFetchedAt(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }
