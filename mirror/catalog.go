package mirror

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// The metric catalog: every metric slipway exports, defined once. The
// registration (newMetrics, scrapeCollector, Observer) and the Grafana
// dashboard and Prometheus rules that `slipway monitoring` prints
// (monitoring.go) all take names, labels and buckets from these entries, so
// a renamed metric or label is renamed everywhere at once, and a rule or
// panel that names a label its metric lacks does not generate.
//
// Names are contracts (dashboards and alerts out there use them): add, do
// not rename.

// metricKind is a Prometheus metric type.
type metricKind string

const (
	counter   metricKind = "counter"
	gauge     metricKind = "gauge"
	histogram metricKind = "histogram"
)

// metricDef is one metric.
type metricDef struct {
	name    string
	kind    metricKind
	help    string
	labels  []string
	buckets []float64 // histograms only

	descOnce sync.Once
	descVal  *prometheus.Desc
}

// Buckets, in seconds.
var (
	// A request: a hit is answered in well under a millisecond to a few
	// (a manifest from memory, a blob's headers); a revalidation or a miss
	// of a manifest costs an upstream round trip (tens to hundreds of ms);
	// a blob's whole body takes seconds to minutes with its size. Past 10
	// minutes the exact figure no longer matters.
	requestBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	// A fill: a config blob from a nearby registry in tens of ms, a 1 GiB
	// layer in tens of seconds, a big layer over a slow link up to the
	// default --fill-timeout of an hour.
	fillBuckets = []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}
	// Waiting for an upstream: the response headers of a registry (or its
	// blob CDN) in 5 ms to a second; seconds mean a slow or queueing
	// upstream; a minute is the default --fill-idle-timeout.
	latencyBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}
)

// The catalog, in the README's order.
var (
	mHTTPRequests = &metricDef{name: "slipway_http_requests_total", kind: counter,
		help:   "HTTP requests answered, by route kind, method and status code.",
		labels: []string{"route", "method", "status"}}
	mHTTPDuration = &metricDef{name: "slipway_http_request_duration_seconds", kind: histogram,
		help:    "Time from a request's arrival to the end of its response (the whole body), by route kind, method and how the cache answered it (cache: hit, miss, joined, revalidated, stale, upstream; local for a pushed repository; none).",
		labels:  []string{"route", "method", "cache"},
		buckets: requestBuckets}
	mPolicyDenied = &metricDef{name: "slipway_policy_denied_total", kind: counter,
		help:   "Requests refused by an upstream's pull-through policy (403 DENIED, no upstream request), by upstream.",
		labels: []string{"upstream"}}
	mCacheResults = &metricDef{name: "slipway_cache_results_total", kind: counter,
		help:   "Proxied manifest and blob requests by how they were answered: hit, miss, stale, joined, revalidated, upstream.",
		labels: []string{"kind", "result"}}
	mServedBytes = &metricDef{name: "slipway_served_bytes_total", kind: counter,
		help:   "Response body bytes of manifests and blobs, by source: cache (stored), upstream (streamed from a fill), local (pushed).",
		labels: []string{"source"}}
	mFillsInFlight = &metricDef{name: "slipway_fills_in_flight", kind: gauge,
		help: "Blob downloads from upstreams running now (each shared by every client that asks for the blob)."}
	mFills = &metricDef{name: "slipway_fills_total", kind: counter,
		help:   "Blob downloads (fills) that ended, by result: success (verified and stored) or failure (every waiter got an error, nothing was stored).",
		labels: []string{"result"}}
	mFillDuration = &metricDef{name: "slipway_fill_duration_seconds", kind: histogram,
		help:    "Time from a successful fill's start to its commit, by where the bytes came from (upstream, shared: the fleet's shared tier, peer: the digest's owner in the fleet).",
		labels:  []string{"from"},
		buckets: fillBuckets}
	mFillFirstByte = &metricDef{name: "slipway_fill_first_byte_seconds", kind: histogram,
		help:    "Time from a successful fill's start to the first body byte (waiting for a connection slot, a token, the response headers, a redirect), by where the bytes came from.",
		labels:  []string{"from"},
		buckets: latencyBuckets}
	mFillStalled = &metricDef{name: "slipway_fill_stalled_seconds", kind: gauge,
		help: "The longest time any fill in flight has gone without receiving a byte (0: none in flight). Past slipway_fill_idle_timeout_seconds, a fill is stuck where the idle timeout does not reach."}
	mFillIdleTimeout = &metricDef{name: "slipway_fill_idle_timeout_seconds", kind: gauge,
		help: "--fill-idle-timeout: a fill whose source sends nothing for this long is canceled."}
	mUploadsOpen = &metricDef{name: "slipway_upload_sessions_open", kind: gauge,
		help: "Push upload sessions started and not yet finished or cancelled."}
	mFillJoins = &metricDef{name: "slipway_fill_joins_total", kind: counter,
		help: "Blob requests that joined a download already in flight instead of starting one."}
	mUpstreamRequests = &metricDef{name: "slipway_upstream_requests_total", kind: counter,
		help:   "Requests sent to an upstream registry, by upstream host and status code (\"error\": no response).",
		labels: []string{"upstream", "status"}}
	mUpstreamDuration = &metricDef{name: "slipway_upstream_request_duration_seconds", kind: histogram,
		help:    "Time from sending a request to an upstream registry to its response headers (or its failure), by upstream host.",
		labels:  []string{"upstream"},
		buckets: latencyBuckets}
	mRateLimitRemaining = &metricDef{name: "slipway_upstream_ratelimit_remaining", kind: gauge,
		help:   "The last ratelimit-remaining an upstream reported (Docker Hub pulls left in its window).",
		labels: []string{"upstream"}}
	mRateLimitLimit = &metricDef{name: "slipway_upstream_ratelimit_limit", kind: gauge,
		help:   "The last ratelimit-limit an upstream reported (Docker Hub pulls allowed in its window).",
		labels: []string{"upstream"}}
	mDiskBytes = &metricDef{name: "slipway_cache_disk_bytes", kind: gauge,
		help: "Bytes of blobs and manifests in the cache: what counts against --max-size."}
	mMaxBytes = &metricDef{name: "slipway_cache_max_bytes", kind: gauge,
		help: "The cache budget, --max-size, in bytes; absent without a budget."}
	mHighWatermark = &metricDef{name: "slipway_cache_high_watermark_bytes", kind: gauge,
		help: "Eviction starts when slipway_cache_disk_bytes passes this (--high-watermark of --max-size); absent without a budget."}
	mLowWatermark = &metricDef{name: "slipway_cache_low_watermark_bytes", kind: gauge,
		help: "Eviction frees space down to this (--low-watermark of --max-size); absent without a budget."}
	mEvictions = &metricDef{name: "slipway_cache_evictions_total", kind: counter,
		help: "Blobs removed by the cache size budget."}
	mReloads = &metricDef{name: "slipway_config_reloads_total", kind: counter,
		help:   "Reloads of the configuration (SIGHUP, a renewed certificate), by result: success, or failure (the old configuration stays).",
		labels: []string{"result"}}
	mReloadOK = &metricDef{name: "slipway_config_last_reload_successful", kind: gauge,
		help: "1 if the last reload of the configuration took, 0 if it failed and the configuration before it is still in use."}
	mReloadAt = &metricDef{name: "slipway_config_last_reload_success_timestamp_seconds", kind: gauge,
		help: "When the configuration in use was loaded (at start or by the last reload that took), in Unix seconds."}
)

// catalog is every entry above.
var catalog = []*metricDef{
	mHTTPRequests, mHTTPDuration, mPolicyDenied, mCacheResults, mServedBytes,
	mFillsInFlight, mFills, mFillDuration, mFillFirstByte, mFillStalled, mFillIdleTimeout,
	mUploadsOpen, mFillJoins,
	mUpstreamRequests, mUpstreamDuration, mRateLimitRemaining, mRateLimitLimit,
	mDiskBytes, mMaxBytes, mHighWatermark, mLowWatermark, mEvictions,
	mReloads, mReloadOK, mReloadAt,
}

// String is the metric's name, so that an entry can stand in fmt for it.
func (d *metricDef) String() string { return d.name }

func (d *metricDef) counterVec() *prometheus.CounterVec {
	d.must(counter)
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: d.name, Help: d.help}, d.labels)
}

func (d *metricDef) gauge() prometheus.Gauge {
	d.must(gauge)
	if len(d.labels) > 0 {
		panic(fmt.Sprintf("metric %s has labels: not a plain gauge", d.name))
	}
	return prometheus.NewGauge(prometheus.GaugeOpts{Name: d.name, Help: d.help})
}

func (d *metricDef) histogramVec() *prometheus.HistogramVec {
	d.must(histogram)
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: d.name, Help: d.help, Buckets: d.buckets}, d.labels)
}

// desc is the entry's descriptor, for values read at scrape time; made
// once, as every scrape uses it.
func (d *metricDef) desc() *prometheus.Desc {
	if d.kind == histogram {
		panic(fmt.Sprintf("metric %s: a histogram is not read at scrape time", d.name))
	}
	d.descOnce.Do(func() { d.descVal = prometheus.NewDesc(d.name, d.help, d.labels, nil) })
	return d.descVal
}

// constMetric is a value of the entry read at scrape time.
func (d *metricDef) constMetric(v float64, labels ...string) prometheus.Metric {
	t := prometheus.GaugeValue
	if d.kind == counter {
		t = prometheus.CounterValue
	}
	return prometheus.MustNewConstMetric(d.desc(), t, v, labels...)
}

func (d *metricDef) must(k metricKind) {
	if d.kind != k {
		panic(fmt.Sprintf("metric %s is a %s, not a %s", d.name, d.kind, k))
	}
}

// targetLabels are the labels Prometheus adds to every series it scrapes;
// expressions may match and group on them too.
var targetLabels = []string{"instance", "job"}

// hasLabel says whether a selector or grouping of d may name label l.
func (d *metricDef) hasLabel(l string) bool {
	return slices.Contains(d.labels, l) || slices.Contains(targetLabels, l) || (l == "le" && d.kind == histogram)
}

// sel is a PromQL selector of d: name{matchers}. Each matcher
// (`result="hit"`, `status=~"5.."`) must name one of d's labels.
func (d *metricDef) sel(matchers ...string) string { return d.series("", matchers) }

// bucket, sum and count are the series of histogram d.
func (d *metricDef) bucket(matchers ...string) string {
	d.must(histogram)
	return d.series("_bucket", matchers)
}
func (d *metricDef) sum(matchers ...string) string {
	d.must(histogram)
	return d.series("_sum", matchers)
}
func (d *metricDef) count(matchers ...string) string {
	d.must(histogram)
	return d.series("_count", matchers)
}

func (d *metricDef) series(suffix string, matchers []string) string {
	for _, m := range matchers {
		l := m[:strings.IndexAny(m+"=!", "=!")]
		if !d.hasLabel(strings.TrimSpace(l)) {
			panic(fmt.Sprintf("metric %s has no label %q (matcher %s)", d.name, l, m))
		}
	}
	if len(matchers) == 0 {
		return d.name + suffix
	}
	return d.name + suffix + "{" + strings.Join(matchers, ", ") + "}"
}

// labelList is "(a, b)" for by/without clauses, each label checked against
// every metric in the expression.
func labelList(labels []string, defs ...*metricDef) string {
	for _, l := range labels {
		for _, d := range defs {
			if !d.hasLabel(l) {
				panic(fmt.Sprintf("metric %s has no label %q to group by", d.name, l))
			}
		}
	}
	return "(" + strings.Join(labels, ", ") + ")"
}
