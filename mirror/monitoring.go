package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"slipway/upstream"
)

// What `slipway monitoring dashboard|rules` prints: a Grafana dashboard and
// Prometheus alert rules, built from the metric catalog (catalog.go). Every
// metric and label in an expression comes from a catalog entry, and cache
// results from upstream's Source values, so nothing here can name a series
// the server does not export.

// Cache results as label values: what the hit ratio counts (hits.go, as
// the status page does), and stale answers.
var (
	resultHit         = sourcesRegexp(hitResults)
	resultCacheAnswer = sourcesRegexp(slices.Concat(hitResults, missResults))
	resultStale       = string(upstream.SourceStale)
)

func sourcesRegexp(srcs []upstream.Source) string {
	parts := make([]string, len(srcs))
	for i, s := range srcs {
		parts[i] = string(s)
	}
	return strings.Join(parts, "|")
}

// hitRatioExpr is the share of manifest and blob answers that came from the
// cache (fresh or revalidated) among all cache answers, per agg ("sum",
// "sum without (...)"), over window.
func hitRatioExpr(agg string, window string, matchers ...string) string {
	hits := mCacheResults.sel(slices.Concat(matchers, []string{`result=~"` + resultHit + `"`})...)
	all := mCacheResults.sel(slices.Concat(matchers, []string{`result=~"` + resultCacheAnswer + `"`})...)
	return fmt.Sprintf("%s (rate(%s[%s])) / %s (rate(%s[%s]))", agg, hits, window, agg, all, window)
}

// quantile is histogram_quantile(q) of histogram d, per by (plus le).
func quantile(q float64, d *metricDef, by []string, window string, matchers ...string) string {
	return fmt.Sprintf("histogram_quantile(%g, sum by %s (rate(%s[%s])))",
		q, labelList(append([]string{"le"}, by...), d), d.bucket(matchers...), window)
}

// ---- Prometheus rules ----

type ruleFile struct {
	Groups []ruleGroup `yaml:"groups"`
}

type ruleGroup struct {
	Name  string      `yaml:"name"`
	Rules []alertRule `yaml:"rules"`
}

type alertRule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for,omitempty"`
	Labels      map[string]string `yaml:"labels,omitempty"`
	Annotations map[string]string `yaml:"annotations,omitempty"`
}

// alertRules are slipway's alerts. Each one is evaluated per scraped
// instance: aggregations keep every label but the metric's own ("sum
// without"), so instance and job survive into the alert. Annotations use
// only $labels, never $value: what the value was is on the dashboard.
func alertRules() []alertRule {
	results := "sum without " + labelList([]string{"kind", "result"}, mCacheResults)
	byStatus := "sum without " + labelList([]string{"status"}, mUpstreamRequests)
	byResult := "sum without " + labelList([]string{"result"}, mFills)
	warning := map[string]string{"severity": "warning"}
	critical := map[string]string{"severity": "critical"}
	return []alertRule{{
		Alert: "SlipwayHitRatioDrop",
		// A drop against the instance's own day, not a fixed floor: a
		// mirror of many different images may live at 40%. At least 100
		// answers in the window, so a quiet night does not page.
		Expr: fmt.Sprintf("(%s) < 0.5 * (%s)\nand %s (increase(%s[30m])) > 100",
			hitRatioExpr(results, "30m"), hitRatioExpr(results, "1d"),
			results, mCacheResults.sel(`result=~"`+resultCacheAnswer+`"`)),
		For:    "15m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: the cache hit ratio fell below half of its daily average",
			"description": "Over the last 30 minutes, fewer manifest and blob requests were answered from the cache than half the share of the last day. Causes: new images being pulled (a release, a new CI base image), the cache emptied (a new data directory, eviction of what is in use: see the disk panels), or tags revalidated more often (a shorter tag_ttl).",
		},
	}, {
		Alert:  "SlipwayServingStale",
		Expr:   fmt.Sprintf("%s (rate(%s[5m])) > 0", results, mCacheResults.sel(`result="`+resultStale+`"`)),
		For:    "5m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }} is serving cached tags stale: an upstream is failing",
			"description": fmt.Sprintf("For 5 minutes, tags were answered with the manifest they had when last fetched, because their upstream did not answer (down, timing out, 5xx or 429). Clients still pull, but new tags and images are not seen. %s by upstream and status, and the log (cache=stale, upstream=...), say which upstream.", mUpstreamRequests),
		},
	}, {
		Alert: "SlipwayUpstreamFailing",
		Expr: fmt.Sprintf("%s (rate(%s[5m])) / %s (rate(%s[5m])) > 0.25",
			byStatus, mUpstreamRequests.sel(`status=~"error|5..|429"`), byStatus, mUpstreamRequests.sel()),
		For:    "10m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: a quarter or more of the requests to {{ $labels.upstream }} fail",
			"description": "For 10 minutes, more than 25% of the requests to this upstream got no response, a 5xx, or a 429. Cached tags are served stale meanwhile; uncached images fail to pull.",
		},
	}, {
		Alert: "SlipwayRateLimitNearlyExhausted",
		// Against the limit the upstream reports; an upstream that
		// reports only what remains is low below 10.
		Expr: fmt.Sprintf("%s < 0.1 * %s\nor (%s < 10 unless %s)",
			mRateLimitRemaining.sel(), mRateLimitLimit.sel(), mRateLimitRemaining.sel(), mRateLimitLimit.sel()),
		For:    "1m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: {{ $labels.upstream }} has under 10% of its pull rate limit left",
			"description": "The upstream's last ratelimit-remaining is under a tenth of its ratelimit-limit (Docker Hub counts manifest GETs per window). When it reaches 0 the upstream answers 429: cached tags are served stale and uncached images fail. Give the upstream credentials with a higher limit (password_env or token_env), or pull less through it. The value is the last one the upstream sent; it does not rise again until a pull gets a new one.",
		},
	}, {
		Alert:  "SlipwayDiskPastHighWatermark",
		Expr:   fmt.Sprintf("%s > %s", mDiskBytes.sel(), mHighWatermark.sel()),
		For:    "15m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: the cache stays above its high watermark",
			"description": "For 15 minutes, blobs and manifests have taken more than --high-watermark of --max-size, although an eviction pass runs every 30 seconds and frees down to --low-watermark. What holds the space cannot be evicted: pushed content, pinned images (--pin), or blobs being read. Raise --max-size, unpin, or delete pushed images.",
		},
	}, {
		Alert: "SlipwayFillFailures",
		Expr: fmt.Sprintf("%s (rate(%s[15m])) / %s (rate(%s[15m])) > 0.1\nand %s (increase(%s[15m])) >= 3",
			byResult, mFills.sel(`result="failure"`), byResult, mFills.sel(),
			byResult, mFills.sel(`result="failure"`)),
		For:    "5m",
		Labels: critical,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: more than 10% of blob downloads from upstreams fail",
			"description": "Over 15 minutes, more than a tenth of the fills (and at least 3) failed: every client waiting for those blobs got an error. The log's \"fill failed\" lines say why: the upstream cut the connection or went idle past --fill-idle-timeout, a digest mismatch, a full disk (507), or --fill-timeout.",
		},
	}, {
		Alert:  "SlipwayFillStuck",
		Expr:   fmt.Sprintf("%s > %s", mFillStalled.sel(), mFillIdleTimeout.sel()),
		For:    "1m",
		Labels: critical,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: a blob download has made no progress for longer than its idle timeout",
			"description": "A fill has received no byte for longer than --fill-idle-timeout, the time after which a silent upstream body cancels it, so it is stuck where that timer does not reach: waiting for a free upstream connection (every blob slot of max_concurrent busy), for an upstream's response headers, or for the disk to take the blob. Its clients are waiting too.",
		},
	}, {
		Alert:  "SlipwayConfigReloadFailing",
		Expr:   fmt.Sprintf("%s == 0", mReloadOK.sel()),
		For:    "5m",
		Labels: warning,
		Annotations: map[string]string{
			"summary":     "slipway {{ $labels.instance }}: the last configuration reload failed",
			"description": "A reload (SIGHUP, or a renewed TLS certificate) did not take: the configuration before it is still in use. The log line \"reload failed: the configuration in use stays\" says why. Fix the file and send SIGHUP again.",
		},
	}}
}

// Rules is a Prometheus rules file with slipway's alerts (for rule_files).
func Rules() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("# slipway's alerts, printed by `slipway monitoring rules` from the metrics it registers.\n")
	b.WriteString("# Load with Prometheus's rule_files; check with `promtool check rules`.\n")
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(ruleFile{Groups: []ruleGroup{{Name: "slipway", Rules: alertRules()}}}); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// ---- Grafana dashboard ----

type dashboard struct {
	UID           string         `json:"uid"`
	Title         string         `json:"title"`
	Description   string         `json:"description"`
	Tags          []string       `json:"tags"`
	SchemaVersion int            `json:"schemaVersion"`
	Version       int            `json:"version"`
	Editable      bool           `json:"editable"`
	GraphTooltip  int            `json:"graphTooltip"`
	Refresh       string         `json:"refresh"`
	Time          map[string]any `json:"time"`
	Templating    struct {
		List []variable `json:"list"`
	} `json:"templating"`
	Annotations struct {
		List []any `json:"list"`
	} `json:"annotations"`
	Panels []panel `json:"panels"`
}

type variable struct {
	Name       string         `json:"name"`
	Label      string         `json:"label"`
	Type       string         `json:"type"`
	Query      any            `json:"query"`
	Definition string         `json:"definition,omitempty"`
	Datasource *datasourceRef `json:"datasource,omitempty"`
	Refresh    int            `json:"refresh"`
	Multi      bool           `json:"multi"`
	IncludeAll bool           `json:"includeAll"`
	AllValue   string         `json:"allValue,omitempty"`
	Current    map[string]any `json:"current"`
	Options    []any          `json:"options"`
	Hide       int            `json:"hide"`
	Sort       int            `json:"sort,omitempty"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type gridPos struct {
	H int `json:"h"`
	W int `json:"w"`
	X int `json:"x"`
	Y int `json:"y"`
}

type panel struct {
	ID          int            `json:"id"`
	Type        string         `json:"type"`
	Title       string         `json:"title"`
	Description string         `json:"description,omitempty"`
	GridPos     gridPos        `json:"gridPos"`
	Datasource  *datasourceRef `json:"datasource,omitempty"`
	Targets     []query        `json:"targets,omitempty"`
	FieldConfig *fieldConfig   `json:"fieldConfig,omitempty"`
	Options     map[string]any `json:"options,omitempty"`
	Collapsed   *bool          `json:"collapsed,omitempty"`
	Panels      []panel        `json:"panels,omitempty"`
}

type query struct {
	RefID        string         `json:"refId"`
	Expr         string         `json:"expr"`
	LegendFormat string         `json:"legendFormat"`
	Datasource   *datasourceRef `json:"datasource"`
}

type fieldConfig struct {
	Defaults struct {
		Unit   string         `json:"unit,omitempty"`
		Min    *float64       `json:"min,omitempty"`
		Max    *float64       `json:"max,omitempty"`
		Custom map[string]any `json:"custom,omitempty"`
	} `json:"defaults"`
	Overrides []any `json:"overrides"`
}

// The dashboard's variables, as its expressions use them.
var (
	promDS   = &datasourceRef{Type: "prometheus", UID: "${datasource}"}
	inst     = `instance=~"$instance"`
	interval = "$__rate_interval"
)

// dashboardBuilder lays panels out left to right, two or three to a row.
type dashboardBuilder struct {
	panels []panel
	id     int
	x, y   int
}

func (b *dashboardBuilder) row(title string) {
	b.id++
	if b.x > 0 {
		b.x, b.y = 0, b.y+8
	}
	f := false
	b.panels = append(b.panels, panel{ID: b.id, Type: "row", Title: title, GridPos: gridPos{H: 1, W: 24, X: 0, Y: b.y}, Collapsed: &f})
	b.y++
}

// add puts a time series panel of width w; described is the metric whose
// help text describes it.
func (b *dashboardBuilder) add(w int, title, unit string, described *metricDef, qs ...query) {
	b.id++
	if b.x+w > 24 {
		b.x, b.y = 0, b.y+8
	}
	p := panel{ID: b.id, Type: "timeseries", Title: title, Description: described.help,
		GridPos: gridPos{H: 8, W: w, X: b.x, Y: b.y}, Datasource: promDS, FieldConfig: &fieldConfig{}}
	p.FieldConfig.Defaults.Unit = unit
	p.FieldConfig.Defaults.Custom = map[string]any{"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
	p.FieldConfig.Overrides = []any{}
	if unit == "percentunit" {
		lo, hi := 0.0, 1.0
		p.FieldConfig.Defaults.Min, p.FieldConfig.Defaults.Max = &lo, &hi
	}
	p.Options = map[string]any{
		"legend":  map[string]any{"displayMode": "list", "placement": "bottom", "showLegend": true},
		"tooltip": map[string]any{"mode": "multi", "sort": "desc"},
	}
	for i := range qs {
		qs[i].RefID = string(rune('A' + i))
		qs[i].Datasource = promDS
	}
	p.Targets = qs
	b.panels = append(b.panels, p)
	b.x += w
}

func q(legend, expr string) query { return query{Expr: expr, LegendFormat: legend} }

// rate is "agg (rate(sel[$__rate_interval]))".
func rate(agg, sel string) string { return fmt.Sprintf("%s (rate(%s[%s]))", agg, sel, interval) }

func sumBy(labels []string, defs ...*metricDef) string { return "sum by " + labelList(labels, defs...) }

func dashboardPanels() []panel {
	b := &dashboardBuilder{}
	qs := []float64{0.5, 0.9, 0.99}

	b.row("Cache")
	b.add(8, "Hit ratio", "percentunit", mCacheResults,
		q("all", hitRatioExpr("sum", interval, inst)),
		q("{{kind}}", hitRatioExpr(sumBy([]string{"kind"}, mCacheResults), interval, inst)))
	b.add(8, "Cache answers", "reqps", mCacheResults,
		q("{{kind}} {{result}}", rate(sumBy([]string{"kind", "result"}, mCacheResults), mCacheResults.sel(inst))))
	b.add(8, "Stale answers (an upstream failing)", "reqps", mCacheResults,
		q("{{kind}}", rate(sumBy([]string{"kind"}, mCacheResults), mCacheResults.sel(inst, `result="`+resultStale+`"`))))
	b.add(12, "Served bytes by source", "Bps", mServedBytes,
		q("{{source}}", rate(sumBy([]string{"source"}, mServedBytes), mServedBytes.sel(inst))))
	b.add(12, "Policy denials", "reqps", mPolicyDenied,
		q("{{upstream}}", rate(sumBy([]string{"upstream"}, mPolicyDenied), mPolicyDenied.sel(inst))))

	b.row("Requests")
	b.add(12, "Requests by route", "reqps", mHTTPRequests,
		q("{{route}}", rate(sumBy([]string{"route"}, mHTTPRequests), mHTTPRequests.sel(inst))))
	b.add(12, "Errors by route and status", "reqps", mHTTPRequests,
		q("{{route}} {{status}}", rate(sumBy([]string{"route", "status"}, mHTTPRequests), mHTTPRequests.sel(inst, `status=~"4..|5.."`))))
	var byRoute []query
	for _, v := range qs {
		byRoute = append(byRoute, q(fmt.Sprintf("p%g {{route}}", v*100), quantile(v, mHTTPDuration, []string{"route"}, interval, inst)))
	}
	b.add(12, "Request duration by route", "s", mHTTPDuration, byRoute...)
	b.add(12, "GET duration by cache result (p99)", "s", mHTTPDuration,
		q("{{route}} {{cache}}", quantile(0.99, mHTTPDuration, []string{"route", "cache"}, interval,
			inst, `route=~"manifest|blob"`, `method="GET"`)))

	b.row("Fills (downloads from upstreams)")
	b.add(8, "Fills in flight", "short", mFillsInFlight,
		q("in flight", "sum ("+mFillsInFlight.sel(inst)+")"))
	b.add(8, "Fills ended, and requests that joined one", "ops", mFills,
		q("{{result}}", rate(sumBy([]string{"result"}, mFills), mFills.sel(inst))),
		q("joined", rate("sum", mFillJoins.sel(inst))))
	b.add(8, "Longest fill without a byte, against the idle timeout", "s", mFillStalled,
		q("{{instance}} stalled", mFillStalled.sel(inst)),
		q("{{instance}} idle timeout", mFillIdleTimeout.sel(inst)))
	var fillDur, fillTTFB []query
	for _, v := range qs {
		fillDur = append(fillDur, q(fmt.Sprintf("p%g {{from}}", v*100), quantile(v, mFillDuration, []string{"from"}, interval, inst)))
		fillTTFB = append(fillTTFB, q(fmt.Sprintf("p%g {{from}}", v*100), quantile(v, mFillFirstByte, []string{"from"}, interval, inst)))
	}
	b.add(12, "Fill duration", "s", mFillDuration, fillDur...)
	b.add(12, "Fill time to first byte", "s", mFillFirstByte, fillTTFB...)

	b.row("Upstreams")
	var upLat []query
	for _, v := range []float64{0.5, 0.99} {
		upLat = append(upLat, q(fmt.Sprintf("p%g {{upstream}}", v*100), quantile(v, mUpstreamDuration, []string{"upstream"}, interval, inst)))
	}
	b.add(8, "Upstream latency (to response headers)", "s", mUpstreamDuration, upLat...)
	b.add(8, "Upstream responses by status", "reqps", mUpstreamRequests,
		q("{{upstream}} {{status}}", rate(sumBy([]string{"upstream", "status"}, mUpstreamRequests), mUpstreamRequests.sel(inst))))
	b.add(8, "Upstream rate limit", "short", mRateLimitRemaining,
		q("{{upstream}} remaining", "min by "+labelList([]string{"upstream"}, mRateLimitRemaining)+" ("+mRateLimitRemaining.sel(inst)+")"),
		q("{{upstream}} limit", "max by "+labelList([]string{"upstream"}, mRateLimitLimit)+" ("+mRateLimitLimit.sel(inst)+")"))

	b.row("Disk")
	b.add(12, "Cache size against the budget", "bytes", mDiskBytes,
		q("{{instance}} used", mDiskBytes.sel(inst)),
		q("{{instance}} high watermark", mHighWatermark.sel(inst)),
		q("{{instance}} low watermark", mLowWatermark.sel(inst)),
		q("{{instance}} budget", mMaxBytes.sel(inst)))
	b.add(6, "Evictions", "ops", mEvictions, q("evicted blobs", rate("sum", mEvictions.sel(inst))))
	b.add(6, "Upload sessions open", "short", mUploadsOpen, q("open", "sum ("+mUploadsOpen.sel(inst)+")"))

	b.row("Configuration")
	b.add(12, "Reloads", "short", mReloads,
		q("{{result}}", fmt.Sprintf("sum by %s (increase(%s[%s]))", labelList([]string{"result"}, mReloads), mReloads.sel(inst), interval)))
	b.add(6, "Last reload took (1) or failed (0)", "short", mReloadOK,
		q("{{instance}}", mReloadOK.sel(inst)))
	b.add(6, "Age of the configuration in use", "s", mReloadAt,
		q("{{instance}}", "time() - "+mReloadAt.sel(inst)))
	return b.panels
}

// Dashboard is a Grafana dashboard of slipway's metrics, to import (it asks
// for a Prometheus data source).
func Dashboard() ([]byte, error) {
	d := dashboard{
		UID: "slipway", Title: "slipway",
		Description:   "slipway, the pull-through registry mirror: printed by `slipway monitoring dashboard` from the metrics it registers.",
		Tags:          []string{"slipway", "registry"},
		SchemaVersion: 39, Version: 1, Editable: true, GraphTooltip: 1, Refresh: "30s",
		Time:   map[string]any{"from": "now-6h", "to": "now"},
		Panels: dashboardPanels(),
	}
	d.Annotations.List = []any{}
	d.Templating.List = []variable{{
		Name: "datasource", Label: "Data source", Type: "datasource", Query: "prometheus",
		Refresh: 1, Current: map[string]any{}, Options: []any{},
	}, {
		Name: "instance", Label: "Instance", Type: "query", Datasource: promDS,
		Query:      map[string]any{"query": "label_values(" + mHTTPRequests.sel() + ", instance)", "refId": "instance"},
		Definition: "label_values(" + mHTTPRequests.sel() + ", instance)",
		Refresh:    2, Multi: true, IncludeAll: true, AllValue: ".*", Sort: 1,
		Current: map[string]any{"selected": true, "text": []string{"All"}, "value": []string{"$__all"}},
		Options: []any{},
	}}
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
