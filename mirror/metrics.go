package mirror

import (
	"maps"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"slipway/upstream"
)

// StoreStats is what the store can tell about itself at scrape time; cmd
// fills it from cache.Store.Stats. Nil Config.StoreStats: not exported.
type StoreStats struct {
	DiskBytes   int64  // bytes of blobs and manifests: what counts against the budget
	Evictions   uint64 // blobs evicted by the size budget since start
	UploadsOpen int64  // upload sessions started and not yet finished; -1: unknown
	// The budget and its watermarks in bytes; 0: no budget.
	MaxBytes, HighWatermarkBytes, LowWatermarkBytes int64
}

// metrics are one Server's Prometheus collectors, in a registry of its own
// (no package-global state), each made from its entry in the catalog
// (catalog.go). Counters that originate in upstream are read at scrape time
// through getters (Client.Responses, RateLimitRemaining, Filler.InFlight),
// and its timings come through an Observer, so inner packages do not import
// prometheus.
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec // route, method, status
	duration *prometheus.HistogramVec
	results  *prometheus.CounterVec // kind, result
	bytes    *prometheus.CounterVec // source
	denied   *prometheus.CounterVec // upstream
	reloads  *prometheus.CounterVec // result
	reloadOK prometheus.Gauge
	reloadAt prometheus.Gauge

	// The series answered requests count in, by what labels them, found
	// once: WithLabelValues hashes and compares every label value on each
	// call, four calls a request. Each is made when the first request of
	// its kind is counted, as WithLabelValues would make it, so the keys
	// are bounded as the series are. Read without a lock; a new kind
	// copies the map under seriesMu.
	series   atomic.Pointer[map[seriesKey]*series]
	seriesMu sync.Mutex
}

// seriesKey is what decides an answered request's series.
type seriesKey struct {
	route, method string // the route label, methodLabel
	status        int
	src           upstream.Source
	hasSrc, local bool // local: a local repository answered without a source
}

type series struct {
	requests prometheus.Counter
	duration prometheus.Observer
	results  prometheus.Counter // nil: not a manifest or blob answer with a source
	// bytes, made at the first answer of this kind with a body (with
	// none, slipway_served_bytes_total has no series for it yet).
	bytes     atomic.Pointer[prometheus.Counter]
	bytesVec  *prometheus.CounterVec
	bytesFrom string // its source label
}

// seriesOf returns the series of the request rq (on route routeName).
func (m *metrics) seriesOf(c echo.Context, rq *request, routeName string) *series {
	k := seriesKey{route: routeName, method: methodLabel(c.Request().Method), status: c.Response().Status,
		src: rq.src, hasSrc: rq.hasSrc, local: !rq.hasSrc && rq.hasTarget && rq.target.local}
	if all := m.series.Load(); all != nil {
		if s, ok := (*all)[k]; ok {
			return s
		}
	}
	m.seriesMu.Lock()
	defer m.seriesMu.Unlock()
	var old map[seriesKey]*series
	if p := m.series.Load(); p != nil {
		old = *p
	}
	if s, ok := old[k]; ok {
		return s
	}
	result := "none"
	switch {
	case k.hasSrc:
		result = string(k.src)
	case k.local:
		result = "local"
	}
	s := &series{
		requests:  m.requests.WithLabelValues(k.route, k.method, strconv.Itoa(k.status)),
		duration:  m.duration.WithLabelValues(k.route, k.method, result),
		bytesVec:  m.bytes,
		bytesFrom: servedFrom(k.src),
	}
	if k.hasSrc && (k.route == "manifest" || k.route == "blob") {
		s.results = m.results.WithLabelValues(k.route, string(k.src))
	}
	all := make(map[seriesKey]*series, len(old)+1)
	maps.Copy(all, old)
	all[k] = s
	m.series.Store(&all)
	return s
}

// addBytes counts n bytes served.
func (s *series) addBytes(n int64) {
	c := s.bytes.Load()
	if c == nil {
		made := s.bytesVec.WithLabelValues(s.bytesFrom)
		s.bytes.CompareAndSwap(nil, &made)
		c = s.bytes.Load()
	}
	(*c).Add(float64(n))
}

// servedFrom is slipway_served_bytes_total's source label of an answer.
func servedFrom(src upstream.Source) string {
	switch src {
	case upstream.SourceHit, upstream.SourceRevalidated, upstream.SourceStale:
		return "cache"
	case upstream.SourceMiss, upstream.SourceJoined, upstream.SourceUpstream:
		return "upstream"
	}
	return "local"
}

func newMetrics(s *Server, fills *upstream.Filler, stats func() StoreStats, obs *Observer) *metrics {
	m := &metrics{
		reg:      prometheus.NewRegistry(),
		requests: mHTTPRequests.counterVec(),
		duration: mHTTPDuration.histogramVec(),
		results:  mCacheResults.counterVec(),
		bytes:    mServedBytes.counterVec(),
		denied:   mPolicyDenied.counterVec(),
		reloads:  mReloads.counterVec(),
		reloadOK: mReloadOK.gauge(),
		reloadAt: mReloadAt.gauge(),
	}
	if obs == nil {
		obs = NewObserver()
	}
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("failure")
	m.reloadOK.Set(1)
	m.reloadAt.SetToCurrentTime()
	m.reg.MustRegister(m.requests, m.duration, m.results, m.bytes, m.denied, m.reloads, m.reloadOK, m.reloadAt,
		obs.fills, obs.fillDuration, obs.fillFirstByte, obs.upstreamDuration,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&scrapeCollector{s: s, fills: fills, stats: stats})
	return m
}

// observe records one answered request, which took d; logRequest calls
// it. Every label is bounded: the route kind, the method as methodLabel
// gives it, the status, and the cache result (a Source, "local" for a
// pushed repository, or "none").
func (m *metrics) observe(c echo.Context, rq *request, routeName string, d time.Duration) {
	req := c.Request()
	status := c.Response().Status
	s := m.seriesOf(c, rq, routeName)
	s.requests.Inc()
	s.duration.Observe(d.Seconds())
	if routeName != "manifest" && routeName != "blob" {
		return
	}
	if s.results != nil {
		s.results.Inc()
	}
	if req.Method != http.MethodGet || c.Response().Size == 0 || (!rq.hasSrc && status >= 300) {
		return
	}
	s.addBytes(c.Response().Size)
}

func (m *metrics) noteReload(err error) {
	if err != nil {
		m.reloads.WithLabelValues("failure").Inc()
		m.reloadOK.Set(0)
		return
	}
	m.reloads.WithLabelValues("success").Inc()
	m.reloadOK.Set(1)
	m.reloadAt.SetToCurrentTime()
}

// methodLabel is the method as a label: one of the methods slipway
// answers, or "other", so made-up methods cannot make series without end.
func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions:
		return m
	}
	return "other"
}

// handler serves the registry in the Prometheus text format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// scrapeCollector reads counters that live in other packages when
// Prometheus scrapes.
type scrapeCollector struct {
	s     *Server
	fills *upstream.Filler
	stats func() StoreStats
}

// scraped are the catalog entries scrapeCollector reads.
var scraped = []*metricDef{mFillsInFlight, mFillJoins, mFillStalled, mFillIdleTimeout,
	mUpstreamRequests, mRateLimitRemaining, mRateLimitLimit,
	mDiskBytes, mMaxBytes, mHighWatermark, mLowWatermark, mEvictions, mUploadsOpen}

func (sc *scrapeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range scraped {
		ch <- d.desc()
	}
}

func (sc *scrapeCollector) Collect(ch chan<- prometheus.Metric) {
	if sc.fills != nil {
		ch <- mFillsInFlight.constMetric(float64(sc.fills.InFlight()))
		ch <- mFillJoins.constMetric(float64(sc.fills.Joins()))
		ch <- mFillStalled.constMetric(sc.fills.Stalled().Seconds())
		ch <- mFillIdleTimeout.constMetric(sc.fills.IdleTimeout().Seconds())
	}
	seen := map[string]bool{}
	for _, u := range sc.s.routing.Load().upstreams {
		cl := u.Proxy.Upstream()
		host := cl.Host()
		if seen[host] {
			continue
		}
		seen[host] = true
		for status, n := range cl.Responses() {
			ch <- mUpstreamRequests.constMetric(float64(n), host, status)
		}
		if r := cl.RateLimitRemaining(); r >= 0 {
			ch <- mRateLimitRemaining.constMetric(float64(r), host)
		}
		if l := cl.RateLimit(); l >= 0 {
			ch <- mRateLimitLimit.constMetric(float64(l), host)
		}
	}
	if sc.stats != nil {
		st := sc.stats()
		ch <- mDiskBytes.constMetric(float64(st.DiskBytes))
		ch <- mEvictions.constMetric(float64(st.Evictions))
		if st.UploadsOpen >= 0 {
			ch <- mUploadsOpen.constMetric(float64(st.UploadsOpen))
		}
		if st.MaxBytes > 0 {
			ch <- mMaxBytes.constMetric(float64(st.MaxBytes))
			ch <- mHighWatermark.constMetric(float64(st.HighWatermarkBytes))
			ch <- mLowWatermark.constMetric(float64(st.LowWatermarkBytes))
		}
	}
}

// routeLabel names a request's route for metrics and logs: the /v2/ route
// kind, or the echo path of the other endpoints.
func routeLabel(c echo.Context, rq *request) string {
	if rq.hasRoute {
		return rq.route.kind.String()
	}
	p := c.Path()
	switch {
	case p == "/v2" || p == "/v2/":
		return "base"
	case strings.HasPrefix(p, "/v2/_slipway/"):
		return strings.TrimPrefix(p, "/v2/")
	case p == "/v2/*" || p == "":
		return "unknown"
	case p == "/":
		return "_slipway/ui" // the status page's other address
	}
	return strings.TrimPrefix(p, "/")
}

// setSource records how a proxied request was answered, for the log line
// and metrics, and tells the client in X-Slipway-Cache (slipway prefetch
// reads it to report what was already cached).
func setSource(c echo.Context, src upstream.Source) {
	rq := requestOf(c)
	rq.src, rq.hasSrc = src, true
	v, ok := sourceHeaders[src]
	if !ok {
		v = []string{string(src)}
	}
	c.Response().Header()["X-Slipway-Cache"] = v
}

// sourceHeaders are X-Slipway-Cache's values, one slice for every response
// (their capacity is their length: an Add copies).
var sourceHeaders = func() map[upstream.Source][]string {
	m := map[upstream.Source][]string{}
	for _, src := range []upstream.Source{upstream.SourceHit, upstream.SourceRevalidated, upstream.SourceStale,
		upstream.SourceMiss, upstream.SourceJoined, upstream.SourceUpstream, sourceLocal} {
		m[src] = []string{string(src)}
	}
	return m
}()
