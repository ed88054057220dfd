package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"slipway/cache/tier/tiertest"
)

// The tool runs every scenario, small, against the real slipway binary and
// against its own ceiling, and compares them: the numbers are not judged
// here (that is what the tool is for), but what must hold whatever the
// machine is: no errors, exactly one upstream GET for the joined cold
// fill, none for warm reads, every pushed blob read back whole.

var bins string // directory with slipway and slipbench built for the tests

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "slipbench-test-")
	if err != nil {
		panic(err)
	}
	for _, pkg := range []string{"slipway", "slipbench"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "../"+pkg).CombinedOutput()
		if err != nil {
			os.RemoveAll(dir)
			panic("go build ../" + pkg + ": " + string(out))
		}
	}
	bins = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func smallConfig(t *testing.T, name, server string, scenarios ...string) runConfig {
	c := runConfig{
		name: name, server: server, pushServer: server, scenarios: map[string]bool{},
		work: t.TempDir(), upstreamListen: "127.0.0.1:0",
		blobSize: 4 << 20, coldSize: 2 << 20, pushSize: 8 << 20, chunkSize: 3 << 20, pusherSize: 1 << 20,
		linkRate: 16 << 20, clients: 3, reps: 2, conns: 4, coldClients: 8, pushers: 4, pushReps: 2, duration: 300 * time.Millisecond,
		serverLog: filepath.Join(t.TempDir(), "server.log"),
	}
	for _, s := range scenarios {
		c.scenarios[s] = true
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(c.serverLog)
			t.Logf("server output:\n%s", b)
		}
	})
	return c
}

func TestRunAgainstSlipwayAndCeiling(t *testing.T) {
	t.Setenv("BIN", bins)
	var log bytes.Buffer
	c := smallConfig(t, "slipway", `exec "$BIN/slipway" serve --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --data-dir "$SLIPBENCH_DATA" --log-level warn`, allScenarios...)
	res, err := run(c, &log)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, log.String())
	}
	// CPU time comes in 10 ms ticks: a few MiB may cost none.
	if w := res.WarmBlob; w == nil || w.GiBps1 <= 0 || w.GiBpsN <= 0 || w.CPUSecondsPerGiBN < 0 || w.UpstreamGETsWhileWarm != 0 {
		t.Errorf("warm blob: %+v", w)
	}
	if m := res.WarmManifest; m == nil || m.Requests == 0 || m.Errors != 0 || m.UpstreamRequests != 0 {
		t.Errorf("warm manifest: %+v", m)
	}
	if cf := res.ColdFill; cf == nil || cf.UpstreamGETs != 1 || cf.Errors != 0 || cf.Total.MaxMs <= 0 || cf.SlowestOverSingle <= 0 {
		t.Errorf("cold fill: %+v", cf)
	}
	if cf := res.ColdFillLink; cf == nil || cf.UpstreamGETs != 1 || cf.Errors != 0 || cf.UpstreamMiBps != 16 || cf.SingleSeconds < 0.08 {
		// 2 MiB over a 16 MiB/s link takes 125 ms (less the 20 ms the link may catch up).
		t.Errorf("cold fill over a slow link: %+v", cf)
	}
	if p := res.Push; p == nil || p.DDMBps <= 0 || p.MonolithicMBps <= 0 || p.ChunkedMBps <= 0 || p.ConcurrentErrors != 0 {
		t.Errorf("push: %+v", p)
	}
	if res.PeakRSSAfterWarmBlobMiB <= 0 || res.PeakRSSAfterColdFillMiB < res.PeakRSSAfterWarmBlobMiB {
		t.Errorf("peak RSS after warm blob %.1f MiB, after cold fill %.1f MiB", res.PeakRSSAfterWarmBlobMiB, res.PeakRSSAfterColdFillMiB)
	}

	cc := smallConfig(t, "ceiling", `exec "$BIN/slipbench" ceiling --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --dir "$SLIPBENCH_DATA"`, "warm-blob", "warm-manifest")
	ceil, err := run(cc, &log)
	if err != nil {
		t.Fatalf("ceiling: %v\n%s", err, log.String())
	}
	if ceil.WarmBlob == nil || ceil.WarmManifest == nil || ceil.WarmManifest.Errors != 0 || ceil.ColdFill != nil || ceil.Push != nil {
		t.Errorf("ceiling ran %+v", ceil)
	}

	dir := t.TempDir()
	var paths []string
	for _, r := range []*result{res, ceil} {
		p := filepath.Join(dir, r.Name+".json")
		if err := writeJSON(p, r); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	var out bytes.Buffer
	if err := compareCommand(paths, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"warm blob 1 client ÷ ceiling", "warm manifest p99 ÷ ceiling", "cold fill upstream GETs", "push chunked ÷ dd"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("compare output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestServerThatDoesNotStart(t *testing.T) {
	c := smallConfig(t, "broken", "exit 3", "warm-manifest")
	_, err := run(c, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("run with a server that exits: %v", err)
	}
}

func TestBadArguments(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"run"},
		{"run", "--server", "true", "--scenarios", "warm-blob,teleport"},
		{"run", "--server", "true", "--push-size", "5MiB"},
		{"run", "--server", "true", "--blob-size", "-1"},
		{"run", "--server", "true", "--cold-size", "2TiB"},
		{"run", "--server", "true", "--conns", "0"},
		{"ceiling"},
		{"compare"},
		{"compare", "/nonexistent.json"},
	} {
		if err := dispatch(args, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
			t.Errorf("slipbench %q: no error", args)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1": 1, "64KiB": 64 << 10, "256MiB": 256 << 20, "1GiB": 1 << 30,
		"500MB": 500e6, "1TiB": 1 << 40} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1", "1TiB1", "2TiB", "1,5GiB", "lots", "64XiB"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, no error", in, got)
		}
	}
}

func TestMergeKeepsTheBestWarmFigures(t *testing.T) {
	a := &result{Name: "x", WarmBlob: &warmBlobResult{GiBps1: 2, GiBpsN: 3, CPUSecondsPerGiBN: 0.4},
		WarmManifest: &warmManifestResult{RPS: 100, P99Ms: 9, Errors: 1}}
	b := &result{Name: "x", WarmBlob: &warmBlobResult{GiBps1: 1, GiBpsN: 4, CPUSecondsPerGiBN: 0.3},
		WarmManifest: &warmManifestResult{RPS: 90, P99Ms: 7, UpstreamRequests: 2}, Push: &pushResult{DDMBps: 1}}
	mergeBest(a, b)
	if w := a.WarmBlob; w.GiBps1 != 2 || w.GiBpsN != 4 || w.CPUSecondsPerGiBN != 0.3 {
		t.Errorf("warm blob %+v", w)
	}
	if m := a.WarmManifest; m.RPS != 100 || m.P99Ms != 7 || m.Errors != 1 || m.UpstreamRequests != 2 {
		t.Errorf("warm manifest %+v: errors and upstream requests must not be hidden", m)
	}
	if a.Push == nil {
		t.Error("a scenario only the second run has was dropped")
	}
}

// The fleet scenario, small, on a real MinIO: it runs, every client gets
// its blob, and the fleet makes one upstream GET.
func TestFleetScenario(t *testing.T) {
	var out, log bytes.Buffer
	js := filepath.Join(t.TempDir(), "fleet.json")
	err := dispatch([]string{"fleet", "--slipway", filepath.Join(bins, "slipway"), "--minio", tiertest.Binary(t),
		"--size", "8MiB", "--cold-size", "4MiB", "--clients", "9", "--json", js}, &out, &log)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var r fleetResult
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if r.Errors != 0 || r.FleetUpstreamGETs != 1 || r.SingleUpstreamGETs != 1 || r.ColdDiskGiBps <= 0 || r.DirectMinIOGiBps <= 0 {
		t.Errorf("fleet result: %+v", r)
	}
	if !strings.Contains(out.String(), "1 upstream GETs") {
		t.Errorf("output: %s", out.String())
	}
}
