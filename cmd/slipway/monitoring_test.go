package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"go.yaml.in/yaml/v3"
)

// monitoringOutput runs `slipway monitoring what` and returns what it
// printed.
func monitoringOutput(t *testing.T, what string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binPath, "monitoring", what)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("slipway monitoring %s: %v\n%s", what, err, stderr.String())
	}
	return stdout.Bytes()
}

// monitoringExprs are the PromQL expressions of the dashboard (its queries,
// and the metric its instance variable lists) and of the rules.
func monitoringExprs(t *testing.T, dashboard, rules []byte) []string {
	t.Helper()
	var d struct {
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(dashboard, &d); err != nil {
		t.Fatalf("the dashboard is not JSON: %v", err)
	}
	var exprs []string
	for _, v := range d.Templating.List {
		// label_values(<metric>, <label>): only the metric is PromQL.
		if arg, ok := strings.CutPrefix(v.Definition, "label_values("); ok {
			exprs = append(exprs, arg[:strings.LastIndexByte(arg, ',')])
		}
	}
	for _, p := range d.Panels {
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	var r struct {
		Groups []struct {
			Rules []struct {
				Expr string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(rules, &r); err != nil {
		t.Fatalf("the rules are not YAML: %v", err)
	}
	for _, g := range r.Groups {
		for _, rule := range g.Rules {
			exprs = append(exprs, rule.Expr)
		}
	}
	return exprs
}

var (
	promqlStrings = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	// label matchers, range and subquery windows
	promqlBraces = regexp.MustCompile(`\{[^}]*\}|\[[^\]]*\]`)
	// the label lists of by, without, on, ignoring, group_left/right
	promqlLabelLists = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	// a number (with a unit, for durations), or an identifier
	promqlTokens = regexp.MustCompile(`[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?[a-zA-Z]*|[a-zA-Z_:][a-zA-Z0-9_:]*`)
	// what follows the name of a function or an aggregation
	promqlCall  = regexp.MustCompile(`^\s*(\(|(by|without)\b)`)
	promqlWords = []string{"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
		"offset", "bool", "inf", "nan", "Inf", "NaN"}
)

// metricNames lists the metric names in a PromQL expression: the
// identifiers left once strings, label matchers, windows and grouping
// labels are gone, except keywords and the names of functions and
// aggregations (which an opening parenthesis, or by or without, follows).
func metricNames(expr string) []string {
	s := promqlStrings.ReplaceAllString(expr, `""`)
	s = promqlBraces.ReplaceAllString(s, "")
	s = promqlLabelLists.ReplaceAllString(s, "$1")
	var names []string
	for _, loc := range promqlTokens.FindAllStringIndex(s, -1) {
		tok := s[loc[0]:loc[1]]
		if tok[0] >= '0' && tok[0] <= '9' || slices.Contains(promqlWords, tok) {
			continue
		}
		if rest := s[loc[1]:]; promqlCall.MatchString(rest) {
			continue
		}
		names = append(names, tok)
	}
	return names
}

func TestMetricNamesOfPromQL(t *testing.T) {
	for expr, want := range map[string][]string{
		`histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{instance=~"$instance", route="x{y}"}[$__rate_interval])))`: {"a_bucket"},
		`sum without (kind, result) (rate(b_total{result=~"hit|revalidated"}[30m])) < 0.5 * c and d > 1e3`:                     {"b_total", "c", "d"},
		"x < 0.1 * y\nor (x < 10 unless on (instance) group_left (upstream) y)":                                                {"x", "y", "x", "y"},
		`time() - e offset 5m`: {"e"},
	} {
		if got := metricNames(expr); !slices.Equal(got, want) {
			t.Errorf("metricNames(%q) = %q, want %q", expr, got, want)
		}
	}
}

// exposition reads /metrics: each family's type, and the series names that
// have samples.
func exposition(t *testing.T, addr string) (types map[string]string, sampled map[string]bool) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	types, sampled = map[string]string{}, map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			types[name] = typ
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name := line[:strings.IndexAny(line, "{ ")]
		sampled[name] = true
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return types, sampled
}

// Every metric the dashboard and the rules name is in a live slipway's
// /metrics after end-to-end traffic: pulls cold and warm, a push, a name
// its policy denies, a reload, and a tag served stale with the upstream
// stopped. A histogram counts as present by its _bucket, _sum and _count
// series.
func TestMonitoringNamesOnlyLiveMetrics(t *testing.T) {
	t.Parallel()
	dashboard, rules := monitoringOutput(t, "dashboard"), monitoringOutput(t, "rules")
	named := map[string]bool{}
	for _, e := range monitoringExprs(t, dashboard, rules) {
		for _, n := range metricNames(e) {
			named[n] = true
		}
	}
	// The parse found what it must: each kind of series the generator
	// writes, so an empty or broken parse cannot pass.
	for _, n := range []string{
		"slipway_http_request_duration_seconds_bucket", "slipway_fill_duration_seconds_bucket",
		"slipway_fill_first_byte_seconds_bucket", "slipway_upstream_request_duration_seconds_bucket",
		"slipway_cache_results_total", "slipway_upstream_ratelimit_remaining", "slipway_upstream_ratelimit_limit",
		"slipway_cache_disk_bytes", "slipway_cache_high_watermark_bytes", "slipway_fills_total",
		"slipway_fill_stalled_seconds", "slipway_fill_idle_timeout_seconds", "slipway_config_last_reload_successful",
	} {
		if !named[n] {
			t.Errorf("the dashboard and rules do not name %s", n)
		}
	}

	// The upstream reports Docker Hub's rate limit headers.
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/manifests/") {
			w.Header().Set("Ratelimit-Limit", "100;w=21600")
			w.Header().Set("Ratelimit-Remaining", "99;w=21600")
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	up := &fakeUpstream{srv: srv, host: strings.TrimPrefix(srv.URL, "http://"), url: srv.URL}
	want := up.push(t, "team/app:v1", 64<<10, 2)
	up.push(t, "team/secret:v1", 1024, 1)

	dir := t.TempDir()
	cfg := filepath.Join(dir, "slipway.yaml")
	writeAtomic(t, cfg, fmt.Sprintf("tag_ttl: 1s\nmax_size: 1GB\npush_prefix: [ci]\nupstreams:\n  - name: up\n    url: %s\n    policy: {deny: [team/secret]}\n", up.url))
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--data-dir", filepath.Join(dir, "data"), "--config", cfg)
	p.waitReady(t, addr)

	pulled := time.Now()
	pullAndCheck(t, addr, "team/app:v1", want) // cold: fills
	pullAndCheck(t, addr, "team/app:v1", want) // warm: hits
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(img, addr+"/ci/app:v1", crane.Insecure); err != nil {
		t.Fatalf("push: %v", err)
	}
	if _, err := crane.Manifest(addr+"/team/secret:v1", crane.Insecure); err == nil {
		t.Error("a name the policy denies was served")
	}
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reload", func() bool {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return metricValue(string(b), `slipway_config_reloads_total{result="success"}`) == 1
	})
	srv.Close()
	time.Sleep(time.Until(pulled.Add(1100 * time.Millisecond))) // past tag_ttl
	resp, err := http.Get("http://" + addr + "/v2/team/app/manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Slipway-Cache") != "stale" {
		t.Fatalf("a tag with its upstream down: %s, X-Slipway-Cache %q, want 200 stale", resp.Status, resp.Header.Get("X-Slipway-Cache"))
	}

	types, sampled := exposition(t, addr)
	var missing []string
	for n := range named {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && types[b] == "histogram" {
				base = b
			}
		}
		ok := sampled[n] && types[base] != ""
		if types[base] == "histogram" {
			ok = sampled[base+"_bucket"] && sampled[base+"_sum"] && sampled[base+"_count"]
		}
		if !ok {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the dashboard or the rules name metrics a live slipway does not export: %s", strings.Join(missing, ", "))
	}
}

func TestMonitoringCommandUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"monitoring"}, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "monitoring dashboard") {
		t.Errorf("slipway monitoring: exit %d, stderr %q", code, stderr.String())
	}
	stderr.Reset()
	if code := run([]string{"monitoring", "grafana"}, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), `unknown "grafana"`) {
		t.Errorf("slipway monitoring grafana: exit %d, stderr %q", code, stderr.String())
	}
	stdout.Reset()
	if code := run([]string{"monitoring", "rules"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "alert: SlipwayFillStuck") {
		t.Errorf("slipway monitoring rules: exit %d, %d bytes", code, stdout.Len())
	}
}
