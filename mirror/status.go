package mirror

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"slipway/cache"
	"slipway/upstream"
)

// The live state the status page shows, as JSON at GET
// /v2/_slipway/status: each upstream's health, disk use against the
// budget with what eviction takes next, the hit ratio over 5 minutes and
// over the hour, and the fills in flight. The page renders it once, then
// its script polls this endpoint.

type statusBody struct {
	Now       time.Time        `json:"now"`
	Upstreams []upstreamStatus `json:"upstreams"`
	Disk      diskStatus       `json:"disk"`
	HitRatio  struct {
		FiveMinutes hitRatio `json:"5m"`
		Hour        hitRatio `json:"1h"`
	} `json:"hit_ratio"`
	Fills []fillStatus `json:"fills"`
}

type upstreamStatus struct {
	Name    string `json:"name"`
	Host    string `json:"host"`
	URL     string `json:"url"`
	Default bool   `json:"default"`
	// State is "ok", "failing" (the last request failed), "rate_limited"
	// (backing off after a 429) or "idle" (nothing asked yet).
	State       string    `json:"state"`
	LastSuccess time.Time `json:"last_success,omitzero"`
	LastError   time.Time `json:"last_error,omitzero"`
	// LastErrorText is untrusted: the upstream's own words.
	LastErrorText      string            `json:"last_error_text,omitempty"`
	BackoffUntil       time.Time         `json:"backoff_until,omitzero"`
	RateLimitRemaining *int64            `json:"ratelimit_remaining"`
	Requests           uint64            `json:"requests"`
	Responses          map[string]uint64 `json:"responses"`
	Stale              uint64            `json:"stale"` // answers served stale because it failed
}

type diskStatus struct {
	cache.Stats
	// UsedRatio is bytes over max_size; absent without a budget.
	UsedRatio float64 `json:"used_ratio,omitempty"`
	// NextEviction is what an eviction pass takes first (with a budget).
	NextEviction []cache.EvictCandidate `json:"next_eviction"`
}

type fillStatus struct {
	Digest   string    `json:"digest"`
	Upstream string    `json:"upstream"` // the upstream's name
	Repo     string    `json:"repo"`
	Bytes    int64     `json:"bytes"`
	Size     int64     `json:"size"` // -1: not known yet
	Rate     float64   `json:"rate"` // bytes per second since it started
	Waiters  int       `json:"waiters"`
	Started  time.Time `json:"started"`
}

// statusCounters are the status page's in-process counters, fed by
// logRequest with every answered request.
type statusCounters struct {
	hits hitWindow

	mu    sync.Mutex
	stale map[string]uint64 // upstream host -> answers served stale

	evictMu   sync.Mutex
	evictAt   time.Time
	evictOf   cache.Stats // the store's totals when evictNext was made
	evictNext []cache.EvictCandidate
}

// Bounds: hosts whose stale answers are counted (upstreams are few; a
// removed one's count goes when this fills up), candidates shown, how
// long a computed list of them is kept (it reads the whole index).
const (
	maxStaleHosts   = 256
	evictNextShown  = 5
	evictNextMaxAge = 15 * time.Second
)

// observe counts one answered request: its cache result for the hit
// ratio, and a stale answer against its upstream.
func (sc *statusCounters) observe(rq *request, routeName string) {
	if !rq.hasSrc || (routeName != "manifest" && routeName != "blob") {
		return
	}
	if hit, ok := isHit(rq.src); ok {
		sc.hits.note(hit)
	}
	t := rq.target
	if rq.src != upstream.SourceStale || !rq.hasTarget || t.local {
		return
	}
	host := t.up.Proxy.Upstream().Host()
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.stale == nil {
		sc.stale = map[string]uint64{}
	}
	if _, ok := sc.stale[host]; !ok && len(sc.stale) >= maxStaleHosts {
		clear(sc.stale)
	}
	sc.stale[host]++
}

func (sc *statusCounters) staleOf(host string) uint64 {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.stale[host]
}

// nextEviction is the store's EvictNext, kept for evictNextMaxAge while
// nothing was stored or removed (st: the store's totals now).
func (sc *statusCounters) nextEviction(s *cache.Store, st cache.Stats) []cache.EvictCandidate {
	sc.evictMu.Lock()
	defer sc.evictMu.Unlock()
	same := st.Blobs == sc.evictOf.Blobs && st.Manifests == sc.evictOf.Manifests && st.Bytes == sc.evictOf.Bytes
	if same && time.Since(sc.evictAt) < evictNextMaxAge {
		return sc.evictNext
	}
	next, err := s.EvictNext(evictNextShown)
	if err != nil {
		return sc.evictNext // the last good one, or none
	}
	sc.evictAt, sc.evictOf, sc.evictNext = time.Now(), st, next
	return next
}

// status gathers the live state. It takes no lock for long: each source
// copies its own state.
func (s *Server) status() statusBody {
	now := time.Now()
	b := statusBody{Now: now, Upstreams: []upstreamStatus{}, Fills: []fillStatus{}}
	rt := s.routing.Load()
	seen := map[string]bool{}
	for i := range rt.upstreams {
		u := &rt.upstreams[i]
		cl := u.Proxy.Upstream()
		if seen[cl.Host()] {
			continue
		}
		seen[cl.Host()] = true
		h := cl.Health()
		us := upstreamStatus{Name: upstreamName(u), Host: cl.Host(), URL: cl.URL(), Default: u == rt.def,
			LastSuccess: h.LastSuccess, LastError: h.LastError, LastErrorText: h.LastErrorText,
			Requests: h.Requests, Responses: h.Responses, Stale: s.counters.staleOf(cl.Host())}
		if us.Responses == nil {
			us.Responses = map[string]uint64{}
		}
		if h.RateLimitRemaining >= 0 {
			us.RateLimitRemaining = &h.RateLimitRemaining
		}
		switch {
		case h.Backoff(now):
			us.State, us.BackoffUntil = "rate_limited", h.BackoffUntil
		case h.Failing():
			us.State = "failing"
		case h.LastSuccess.IsZero():
			us.State = "idle"
		default:
			us.State = "ok"
		}
		b.Upstreams = append(b.Upstreams, us)
	}

	b.Disk.Stats = s.store.Stats()
	b.Disk.NextEviction = []cache.EvictCandidate{}
	if b.Disk.MaxSize > 0 {
		b.Disk.UsedRatio = float64(b.Disk.Bytes) / float64(b.Disk.MaxSize)
		b.Disk.NextEviction = s.counters.nextEviction(s.store, b.Disk.Stats)
	}
	b.HitRatio.FiveMinutes = s.counters.hits.over(5 * time.Minute)
	b.HitRatio.Hour = s.counters.hits.over(time.Hour)

	if s.fills != nil {
		names := hostNames(rt)
		for _, f := range s.fills.Fills() {
			fs := fillStatus{Digest: string(f.Digest), Upstream: names[f.Upstream], Repo: f.Repo, Bytes: f.Bytes,
				Size: f.Size, Waiters: f.Waiters, Started: f.Started}
			if fs.Upstream == "" {
				fs.Upstream = f.Upstream
			}
			if secs := now.Sub(f.Started).Seconds(); secs > 0 {
				fs.Rate = float64(f.Bytes) / secs
			}
			b.Fills = append(b.Fills, fs)
		}
	}
	return b
}

// upstreamName is how the status page names an upstream: its configured
// name, else its host.
func upstreamName(u *Upstream) string {
	if u.Name != "" {
		return u.Name
	}
	return u.Proxy.Upstream().Host()
}

// hostNames maps each upstream host to its name.
func hostNames(rt *routing) map[string]string {
	m := make(map[string]string, len(rt.upstreams))
	for i := range slices.Backward(rt.upstreams) {
		u := &rt.upstreams[i]
		m[u.Proxy.Upstream().Host()] = upstreamName(u)
	}
	return m
}

// getStatus answers the live state as JSON, for the status page's script
// and for anyone else.
func (s *Server) getStatus(c echo.Context) error {
	uiHeaders(c)
	return c.JSON(http.StatusOK, s.status())
}
