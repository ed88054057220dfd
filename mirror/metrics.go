package mirror

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"slipway/upstream"
)

// StoreStats is what the store can tell about itself at scrape time; cmd
// fills it from cache.Store.Stats. Nil Config.StoreStats: not exported.
type StoreStats struct {
	DiskBytes   int64  // bytes of blob files on disk
	Evictions   uint64 // blobs evicted by the size budget since start
	UploadsOpen int64  // upload sessions started and not yet finished; -1: unknown
}

// metrics are one Server's Prometheus collectors, in a registry of its own
// (no package-global state). Counters that originate in upstream are read
// at scrape time through getters (Client.Responses, RateLimitRemaining,
// Filler.InFlight), so inner packages do not import prometheus.
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec // route, method, status
	results  *prometheus.CounterVec // kind, result
	bytes    *prometheus.CounterVec // source
	denied   *prometheus.CounterVec // upstream
	reloads  *prometheus.CounterVec // result
	reloadOK prometheus.Gauge
	reloadAt prometheus.Gauge
}

func newMetrics(s *Server, fills *upstream.Filler, stats func() StoreStats) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "slipway_http_requests_total",
			Help: "HTTP requests answered, by route kind, method and status code.",
		}, []string{"route", "method", "status"}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "slipway_cache_results_total",
			Help: "Proxied manifest and blob requests by how they were answered: hit, miss, stale, joined, revalidated, upstream.",
		}, []string{"kind", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "slipway_served_bytes_total",
			Help: "Response body bytes of manifests and blobs, by source: cache (stored), upstream (streamed from a fill), local (pushed).",
		}, []string{"source"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "slipway_policy_denied_total",
			Help: "Requests refused by an upstream's pull-through policy (403 DENIED, no upstream request), by upstream.",
		}, []string{"upstream"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "slipway_config_reloads_total",
			Help: "Reloads of the configuration (SIGHUP, a renewed certificate), by result: success, or failure (the old configuration stays).",
		}, []string{"result"}),
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "slipway_config_last_reload_successful",
			Help: "1 if the last reload of the configuration took, 0 if it failed and the configuration before it is still in use.",
		}),
		reloadAt: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "slipway_config_last_reload_success_timestamp_seconds",
			Help: "When the configuration in use was loaded (at start or by the last reload that took), in Unix seconds.",
		}),
	}
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("failure")
	m.reloadOK.Set(1)
	m.reloadAt.SetToCurrentTime()
	m.reg.MustRegister(m.requests, m.results, m.bytes, m.denied, m.reloads, m.reloadOK, m.reloadAt,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&scrapeCollector{s: s, fills: fills, stats: stats})
	return m
}

// observe records one answered request; logRequests calls it.
func (m *metrics) observe(c echo.Context, routeName string, src upstream.Source, hasSrc bool) {
	req := c.Request()
	status := c.Response().Status
	m.requests.WithLabelValues(routeName, methodLabel(req.Method), strconv.Itoa(status)).Inc()
	if routeName != "manifest" && routeName != "blob" {
		return
	}
	if hasSrc {
		m.results.WithLabelValues(routeName, string(src)).Inc()
	}
	if req.Method != http.MethodGet || c.Response().Size == 0 {
		return
	}
	source := "local"
	switch src {
	case upstream.SourceHit, upstream.SourceRevalidated, upstream.SourceStale:
		source = "cache"
	case upstream.SourceMiss, upstream.SourceJoined, upstream.SourceUpstream:
		source = "upstream"
	}
	if !hasSrc && status >= 300 {
		return
	}
	m.bytes.WithLabelValues(source).Add(float64(c.Response().Size))
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

var (
	descFills = prometheus.NewDesc("slipway_fills_in_flight",
		"Blob downloads from upstreams running now (each shared by every client that asks for the blob).", nil, nil)
	descJoins = prometheus.NewDesc("slipway_fill_joins_total",
		"Blob requests that joined a download already in flight instead of starting one.", nil, nil)
	descUpstream = prometheus.NewDesc("slipway_upstream_requests_total",
		"Requests sent to an upstream registry, by upstream host and status code (\"error\": no response).",
		[]string{"upstream", "status"}, nil)
	descRateLimit = prometheus.NewDesc("slipway_upstream_ratelimit_remaining",
		"The last ratelimit-remaining an upstream reported (Docker Hub pulls left in its window).",
		[]string{"upstream"}, nil)
	descDisk = prometheus.NewDesc("slipway_cache_disk_bytes",
		"Bytes of blob files in the cache directory.", nil, nil)
	descEvictions = prometheus.NewDesc("slipway_cache_evictions_total",
		"Blobs removed by the cache size budget.", nil, nil)
	descUploads = prometheus.NewDesc("slipway_upload_sessions_open",
		"Push upload sessions started and not yet finished or cancelled.", nil, nil)
)

// scrapeCollector reads counters that live in other packages when
// Prometheus scrapes.
type scrapeCollector struct {
	s     *Server
	fills *upstream.Filler
	stats func() StoreStats
}

func (sc *scrapeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFills, descJoins, descUpstream, descRateLimit, descDisk, descEvictions, descUploads} {
		ch <- d
	}
}

func (sc *scrapeCollector) Collect(ch chan<- prometheus.Metric) {
	if sc.fills != nil {
		ch <- prometheus.MustNewConstMetric(descFills, prometheus.GaugeValue, float64(sc.fills.InFlight()))
		ch <- prometheus.MustNewConstMetric(descJoins, prometheus.CounterValue, float64(sc.fills.Joins()))
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
			ch <- prometheus.MustNewConstMetric(descUpstream, prometheus.CounterValue, float64(n), host, status)
		}
		if r := cl.RateLimitRemaining(); r >= 0 {
			ch <- prometheus.MustNewConstMetric(descRateLimit, prometheus.GaugeValue, float64(r), host)
		}
	}
	if sc.stats != nil {
		st := sc.stats()
		ch <- prometheus.MustNewConstMetric(descDisk, prometheus.GaugeValue, float64(st.DiskBytes))
		ch <- prometheus.MustNewConstMetric(descEvictions, prometheus.CounterValue, float64(st.Evictions))
		if st.UploadsOpen >= 0 {
			ch <- prometheus.MustNewConstMetric(descUploads, prometheus.GaugeValue, float64(st.UploadsOpen))
		}
	}
}

// routeLabel names a request's route for metrics and logs: the /v2/ route
// kind, or the echo path of the other endpoints.
func routeLabel(c echo.Context) string {
	if r, ok := c.Get(ctxRoute).(route); ok {
		return r.kind.String()
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
	c.Set(ctxSource, src)
	c.Response().Header().Set("X-Slipway-Cache", string(src))
}
