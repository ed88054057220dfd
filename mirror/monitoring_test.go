package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"go.yaml.in/yaml/v3"

	"slipway/cache"
	"slipway/mirror/promtooltest"
	"slipway/upstream"
)

// promtool runs promtool with args and returns its output; it fails the
// test if promtool does, unless wantFail.
func promtool(t *testing.T, wantFail bool, args ...string) string {
	t.Helper()
	out, err := exec.Command(promtooltest.Binary(t), args...).CombinedOutput()
	if (err != nil) != wantFail {
		t.Fatalf("promtool %s: %v (want failure: %v)\n%s", strings.Join(args, " "), err, wantFail, out)
	}
	return string(out)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestRulesPassPromtoolCheck(t *testing.T) {
	b, err := Rules()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "rules.yml")
	writeFile(t, path, b)
	out := promtool(t, false, "check", "rules", path)
	if want := fmt.Sprintf("SUCCESS: %d rules found", len(alertRules())); !strings.Contains(out, want) {
		t.Errorf("promtool check rules said:\n%s\nwant %q", out, want)
	}
}

// The shape of testdata/rules_test.yml, strictly: a field this test does
// not know fails the parse instead of being dropped on the way to promtool.
type ruleTests struct {
	RuleFiles          []string        `yaml:"rule_files"`
	EvaluationInterval string          `yaml:"evaluation_interval"`
	Tests              []ruleTestGroup `yaml:"tests"`
}

type ruleTestGroup struct {
	Name        string `yaml:"name"`
	Interval    string `yaml:"interval"`
	InputSeries []struct {
		Series string `yaml:"series"`
		Values string `yaml:"values"`
	} `yaml:"input_series"`
	AlertRuleTest []struct {
		EvalTime  string `yaml:"eval_time"`
		Alertname string `yaml:"alertname"`
		ExpAlerts []struct {
			ExpLabels      map[string]string `yaml:"exp_labels"`
			ExpAnnotations map[string]string `yaml:"exp_annotations,omitempty"`
		} `yaml:"exp_alerts"`
	} `yaml:"alert_rule_test"`
}

var labelTemplate = regexp.MustCompile(`\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)

// renderAnnotation expands the $labels templates of an annotation, the only
// ones slipway's rules use.
func renderAnnotation(t *testing.T, tmpl string, labels map[string]string) string {
	t.Helper()
	out := labelTemplate.ReplaceAllStringFunc(tmpl, func(m string) string {
		return labels[labelTemplate.FindStringSubmatch(m)[1]]
	})
	if strings.Contains(out, "{{") {
		t.Fatalf("annotation %q uses a template other than $labels", tmpl)
	}
	return out
}

// Every alert fires on the synthetic series made to fire it, at the time it
// should, with the labels it should, and nowhere else (promtool compares
// the whole set of firing alerts at each evaluation). Each alert has at
// least one evaluation where it fires and one where it must not.
func TestAlertsFireOnSyntheticSeriesAndNowhereElse(t *testing.T) {
	raw, err := os.ReadFile("testdata/rules_test.yml")
	if err != nil {
		t.Fatal(err)
	}
	var tests ruleTests
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&tests); err != nil {
		t.Fatalf("testdata/rules_test.yml: %v", err)
	}
	rules := map[string]alertRule{}
	for _, r := range alertRules() {
		rules[r.Alert] = r
	}
	fires, quiet := map[string]int{}, map[string]int{}
	for gi := range tests.Tests {
		g := &tests.Tests[gi]
		for ai := range g.AlertRuleTest {
			at := &g.AlertRuleTest[ai]
			r, ok := rules[at.Alertname]
			if !ok {
				t.Fatalf("test %q names alert %q, which the rules lack", g.Name, at.Alertname)
			}
			if len(at.ExpAlerts) == 0 {
				quiet[r.Alert]++
			} else {
				fires[r.Alert]++
			}
			for ei := range at.ExpAlerts {
				e := &at.ExpAlerts[ei]
				e.ExpAnnotations = map[string]string{}
				for k, v := range r.Annotations {
					e.ExpAnnotations[k] = renderAnnotation(t, v, e.ExpLabels)
				}
			}
		}
	}
	for name := range rules {
		if fires[name] == 0 || quiet[name] == 0 {
			t.Errorf("alert %s: %d evaluations where it fires and %d where it must not in testdata/rules_test.yml; want both",
				name, fires[name], quiet[name])
		}
	}
	unit, err := yaml.Marshal(tests)
	if err != nil {
		t.Fatal(err)
	}
	rulesYAML, err := Rules()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "rules.yml"), rulesYAML)
	writeFile(t, filepath.Join(dir, "rules_test.yml"), unit)
	out := promtool(t, false, "test", "rules", filepath.Join(dir, "rules_test.yml"))
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool test rules said:\n%s", out)
	}

	// The same tests against rules without their "for": alerts fire at
	// the early evaluations where the tests expect none, and promtool must
	// say so. (A harness that passes anything proves nothing.)
	var rf ruleFile
	if err := yaml.Unmarshal(rulesYAML, &rf); err != nil {
		t.Fatal(err)
	}
	for i := range rf.Groups[0].Rules {
		rf.Groups[0].Rules[i].For = ""
	}
	hasty, err := yaml.Marshal(rf)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "rules.yml"), hasty)
	out = promtool(t, true, "test", "rules", filepath.Join(dir, "rules_test.yml"))
	for name := range rules {
		if !strings.Contains(out, "alertname: "+name) {
			t.Errorf("rules without their for: promtool found nothing wrong with %s:\n%s", name, out)
		}
	}
}

// The dashboard is one Grafana imports: a schema version, a Prometheus data
// source variable every query uses, unique panel ids on a 24-column grid,
// and every query valid PromQL (promtool checks them as recording rules,
// with Grafana's variables filled in). Every catalog metric has a panel.
func TestDashboardIsImportableAndEveryQueryParses(t *testing.T) {
	b, err := Dashboard()
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		SchemaVersion int `json:"schemaVersion"`
		Templating    struct {
			List []struct {
				Name, Type string
				Query      any
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource *struct {
				Type, UID string
			} `json:"datasource"`
			GridPos struct{ H, W, X, Y int } `json:"gridPos"`
			Targets []struct {
				Expr       string `json:"expr"`
				RefID      string `json:"refId"`
				Datasource struct {
					Type, UID string
				} `json:"datasource"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d", d.SchemaVersion)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		hasDS = hasDS || (v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus")
	}
	if !hasDS {
		t.Error("no ${datasource} variable of Prometheus data sources")
	}
	ids := map[int]bool{}
	var exprs []string
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.X < 0 || p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H <= 0 {
			t.Errorf("panel %q: gridPos %+v off the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" || p.Datasource.Type != "prometheus" {
			t.Errorf("panel %q: datasource %+v, want the ${datasource} variable", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			if q.Expr == "" || q.RefID == "" || q.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: query %+v", p.Title, q)
			}
			exprs = append(exprs, q.Expr)
		}
	}
	for _, m := range catalog {
		name := regexp.MustCompile(regexp.QuoteMeta(m.name) + `(_bucket)?\b`)
		if !slices.ContainsFunc(exprs, name.MatchString) {
			t.Errorf("no panel shows %s", m.name)
		}
	}

	vars := strings.NewReplacer("$__rate_interval", "5m", "$instance", ".*")
	var rf struct {
		Groups []struct {
			Name  string              `yaml:"name"`
			Rules []map[string]string `yaml:"rules"`
		} `yaml:"groups"`
	}
	rf.Groups = append(rf.Groups, struct {
		Name  string              `yaml:"name"`
		Rules []map[string]string `yaml:"rules"`
	}{Name: "dashboard"})
	for i, e := range exprs {
		rf.Groups[0].Rules = append(rf.Groups[0].Rules, map[string]string{"record": fmt.Sprintf("dashboard:query_%d", i), "expr": vars.Replace(e)})
	}
	y, err := yaml.Marshal(rf)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	writeFile(t, path, y)
	out := promtool(t, false, "check", "rules", path)
	if want := fmt.Sprintf("SUCCESS: %d rules found", len(exprs)); !strings.Contains(out, want) {
		t.Errorf("promtool check rules on the dashboard's queries said:\n%s\nwant %q", out, want)
	}
}

// The generator refuses a selector or grouping on a label its metric lacks,
// and a histogram series of a metric that is not one.
func TestCatalogRefusesWhatAMetricLacks(t *testing.T) {
	for name, f := range map[string]func(){
		"matcher":   func() { mCacheResults.sel(`status="200"`) },
		"by":        func() { labelList([]string{"upstream"}, mFills) },
		"bucket":    func() { mFills.bucket() },
		"le":        func() { labelList([]string{"le"}, mFills) },
		"histogram": func() { mFills.histogramVec() },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
	if got := mCacheResults.sel(`result="hit"`, inst); got != `slipway_cache_results_total{result="hit", instance=~"$instance"}` {
		t.Errorf("sel: %s", got)
	}
}

func TestCatalogIsConsistent(t *testing.T) {
	seen := map[string]bool{}
	for _, m := range catalog {
		if seen[m.name] {
			t.Errorf("%s twice", m.name)
		}
		seen[m.name] = true
		if !strings.HasPrefix(m.name, "slipway_") || m.help == "" {
			t.Errorf("%s: name or help", m.name)
		}
		if (m.kind == counter) != strings.HasSuffix(m.name, "_total") {
			t.Errorf("%s: a %s; counters, and only they, end in _total", m.name, m.kind)
		}
		if m.kind == histogram && (!strings.HasSuffix(m.name, "_seconds") || len(m.buckets) == 0 || !slices.IsSorted(m.buckets)) {
			t.Errorf("%s: a histogram of seconds with sorted buckets", m.name)
		}
		if m.kind != histogram && m.buckets != nil {
			t.Errorf("%s: buckets on a %s", m.name, m.kind)
		}
	}
}

// monitoringEnv is a mirror with a size budget and an Observer, in front of
// an upstream that reports Docker Hub's rate limit headers.
type monitoringEnv struct {
	up    *fakeUpstream
	store *cache.Store
	fills *upstream.Filler
	s     *Server
	srv   *httptest.Server
}

func newMonitoringEnv(t *testing.T) *monitoringEnv {
	t.Helper()
	e := &monitoringEnv{up: newFakeUpstream(t)}
	e.up.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/") {
			w.Header().Set("Ratelimit-Limit", "100;w=21600")
			w.Header().Set("Ratelimit-Remaining", "42;w=21600")
		}
		return false
	})
	st, err := cache.Open(t.TempDir(), cache.Options{MaxSize: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	e.store = st
	obs := NewObserver()
	c, err := upstream.New(upstream.Config{URL: e.up.URL, Retries: -1, Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	e.fills = upstream.NewFiller(st, upstream.FillerOptions{Observer: obs})
	p := upstream.NewProxy(c, st, e.fills, upstream.ProxyOptions{})
	policy := &upstream.Policy{Deny: mustRules(t, false, "team/secret")}
	e.s, err = New(Config{Store: st, Upstreams: []Upstream{{Proxy: p, Names: []string{"up"}, Policy: policy}}, Fills: e.fills, Observer: obs,
		StoreStats: func() StoreStats {
			s := st.Stats()
			return StoreStats{DiskBytes: s.Bytes, Evictions: uint64(s.Evicted), UploadsOpen: 0,
				MaxBytes: s.MaxSize, HighWatermarkBytes: s.HighWatermark, LowWatermarkBytes: s.LowWatermark}
		}})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(e.s.Handler())
	t.Cleanup(func() {
		e.srv.Close()
		e.fills.Close()
		st.Close()
	})
	return e
}

func (e *monitoringEnv) get(t *testing.T, path string, want int) {
	t.Helper()
	resp, err := http.Get(e.srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != want {
		t.Fatalf("GET %s: %s, want %d", path, resp.Status, want)
	}
}

// After a pull through the mirror (a miss of each kind, then a hit, and a
// name its policy denies), the
// server exports exactly the catalog, with its types and help; and the
// histograms saw what happened: one observation per request, per fill and
// per upstream request, and no fill whose first byte came after its end.
func TestServerExportsTheCatalogAndItsHistogramsSeeThePull(t *testing.T) {
	e := newMonitoringEnv(t)
	img, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	e.up.pushImageTo(t, img, "team/app:v1")
	e.get(t, "/v2/up/team/app/manifests/v1", http.StatusOK)
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		e.get(t, "/v2/up/team/app/blobs/"+d.String(), http.StatusOK)
	}
	waitFor(t, "the fills to end", func() bool { return e.fills.InFlight() == 0 })
	d, _ := layers[0].Digest()
	e.get(t, "/v2/up/team/app/blobs/"+d.String(), http.StatusOK) // a hit
	e.get(t, "/v2/up/team/secret/manifests/v1", http.StatusForbidden)

	types, helps := metricTypes(t, e.srv.URL+"/metrics")
	for _, m := range catalog {
		typ, ok := types[m.name]
		if !ok {
			t.Errorf("%s is in the catalog but not exported", m.name)
			continue
		}
		if typ != string(m.kind) || helps[m.name] != m.help {
			t.Errorf("%s: exported as %s %q, catalog says %s %q", m.name, typ, helps[m.name], m.kind, m.help)
		}
		delete(types, m.name)
	}
	for name := range types {
		if strings.HasPrefix(name, "slipway_") {
			t.Errorf("%s is exported but not in the catalog", name)
		}
	}

	m := scrape(t, e.srv.URL+"/metrics")
	host := strings.TrimPrefix(e.up.URL, "http://")
	for cache, want := range map[string]float64{"miss": 2, "hit": 1} {
		if n := m[key(mHTTPDuration.name+"_count", `cache="`+cache+`"`, `method="GET"`, `route="blob"`)]; n != want {
			t.Errorf("blob GETs answered %s: %v observations, want %v", cache, n, want)
		}
	}
	if n := m[key(mHTTPDuration.name+"_count", `cache="miss"`, `method="GET"`, `route="manifest"`)]; n != 1 {
		t.Errorf("manifest GET: %v observations, want 1", n)
	}
	// The client fetched two layers: two fills, both from the upstream.
	from := `from="` + upstream.FromUpstream + `"`
	durN, durSum := m[key(mFillDuration.name+"_count", from)], m[key(mFillDuration.name+"_sum", from)]
	ttfbN, ttfbSum := m[key(mFillFirstByte.name+"_count", from)], m[key(mFillFirstByte.name+"_sum", from)]
	if durN != 2 || ttfbN != 2 {
		t.Errorf("fills observed: %v durations and %v first bytes, want 2 and 2", durN, ttfbN)
	}
	if ttfbSum <= 0 || ttfbSum > durSum {
		t.Errorf("first bytes after %gs in all, fills of %gs: want 0 < first byte <= duration", ttfbSum, durSum)
	}
	if n := m[key(mFills.name, `result="success"`)]; n != 2 {
		t.Errorf("fills succeeded: %v, want 2", n)
	}
	if n, ok := m[key(mFills.name, `result="failure"`)]; !ok || n != 0 {
		t.Errorf("fills failed: %v (exported: %v), want 0", n, ok)
	}
	var sent float64
	for k, v := range m {
		if strings.HasPrefix(k, mUpstreamRequests.name+"{") {
			sent += v
		}
	}
	if n := m[key(mUpstreamDuration.name+"_count", `upstream="`+host+`"`)]; sent == 0 || n != sent {
		t.Errorf("%v upstream request observations for %v requests sent", n, sent)
	}
	if v := m[key(mRateLimitLimit.name, `upstream="`+host+`"`)]; v != 100 {
		t.Errorf("%s = %v, want 100", mRateLimitLimit, v)
	}
	if v, want := m[key(mHighWatermark.name)], math.Floor(0.95*(1<<30)); v != want {
		t.Errorf("%s = %v, want %v (95%% of 1 GiB)", mHighWatermark, v, want)
	}
}

// key is a series as scrape writes it: labels in name order, no spaces.
func key(name string, labels ...string) string {
	if len(labels) == 0 {
		return name
	}
	return name + "{" + strings.Join(labels, ",") + "}"
}

// metricTypes reads the # TYPE and # HELP lines of /metrics.
func metricTypes(t *testing.T, url string) (types, helps map[string]string) {
	t.Helper()
	_, body := getBody(t, url)
	types, helps = map[string]string{}, map[string]string{}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			types[name] = typ
		}
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, help, _ := strings.Cut(rest, " ")
			helps[name] = strings.NewReplacer(`\\`, `\`, `\n`, "\n").Replace(help)
		}
	}
	return types, helps
}
