package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"
)

// result is one registry's run; absent scenarios stay nil.
type result struct {
	Name                    string              `json:"name"`
	Machine                 string              `json:"machine"`
	When                    string              `json:"when"`
	WarmBlob                *warmBlobResult     `json:"warm_blob,omitempty"`
	WarmManifest            *warmManifestResult `json:"warm_manifest,omitempty"`
	ColdFill                *coldFillResult     `json:"cold_fill,omitempty"`
	ColdFillLink            *coldFillResult     `json:"cold_fill_link,omitempty"`
	Push                    *pushResult         `json:"push,omitempty"`
	PeakRSSAfterWarmBlobMiB float64             `json:"peak_rss_after_warm_blob_mib,omitempty"`
	PeakRSSAfterColdFillMiB float64             `json:"peak_rss_after_cold_fill_mib,omitempty"`
	PeakRSSAfterPushMiB     float64             `json:"peak_rss_after_push_mib,omitempty"`
}

type warmBlobResult struct {
	SizeBytes             int64   `json:"size_bytes"`
	Clients               int     `json:"clients"`
	FirstPullSeconds      float64 `json:"first_pull_seconds"`
	GiBps1                float64 `json:"gibps_1_client"`
	GiBpsN                float64 `json:"gibps_n_clients"`
	CPUSecondsPerGiB1     float64 `json:"cpu_s_per_gib_1_client"`
	CPUSecondsPerGiBN     float64 `json:"cpu_s_per_gib_n_clients"`
	UpstreamGETsWhileWarm int64   `json:"upstream_gets_while_warm"`
}

type warmManifestResult struct {
	Conns            int     `json:"conns"`
	Seconds          float64 `json:"seconds"`
	Requests         int64   `json:"requests"`
	RPS              float64 `json:"rps"`
	P50Ms            float64 `json:"p50_ms"`
	P99Ms            float64 `json:"p99_ms"`
	MaxMs            float64 `json:"max_ms"`
	UpstreamRequests int64   `json:"upstream_requests"`
	Errors           int64   `json:"errors"`
	FirstError       string  `json:"first_error,omitempty"`
}

type coldFillResult struct {
	SizeBytes         int64   `json:"size_bytes"`
	Clients           int     `json:"clients"`
	UpstreamMiBps     float64 `json:"upstream_mibps,omitempty"` // 0: loopback speed
	UpstreamGETs      int64   `json:"upstream_gets"`
	SingleSeconds     float64 `json:"single_seconds"`
	SingleTTFBMs      float64 `json:"single_ttfb_ms"`
	Total             spread  `json:"total"`
	TTFB              spread  `json:"ttfb"`
	FirstByteSpreadMs float64 `json:"first_byte_spread_ms"`
	ServerCPUSeconds  float64 `json:"server_cpu_seconds"` // while the N clients were served
	SlowestOverSingle float64 `json:"slowest_over_single"`
	ServeBoundSeconds float64 `json:"serve_bound_seconds,omitempty"` // N × size ÷ warm N-client rate
	SlowestOverBound  float64 `json:"slowest_over_serve_bound,omitempty"`
	Errors            int64   `json:"errors"`
	FirstError        string  `json:"first_error,omitempty"`
}

type pushResult struct {
	SizeBytes         int64   `json:"size_bytes"`
	ChunkBytes        int64   `json:"chunk_bytes"`
	DDMBps            float64 `json:"dd_mbps"` // medians of the runs; the ratios are medians of pairs (a dd, then a push)
	MonolithicMBps    float64 `json:"monolithic_mbps"`
	ChunkedMBps       float64 `json:"chunked_mbps"`
	MonolithicOverDD  float64 `json:"monolithic_over_dd"`
	ChunkedOverDD     float64 `json:"chunked_over_dd"`
	SinglePOSTMBps    float64 `json:"single_post_mbps"`
	SinglePOSTOverDD  float64 `json:"single_post_over_dd"`
	Pushers           int     `json:"pushers"`
	PusherBytes       int64   `json:"pusher_bytes"`
	ConcurrentSeconds float64 `json:"concurrent_seconds"` // monolithic (POST, then PUT with the blob)
	ConcurrentErrors  int64   `json:"concurrent_errors"`
	// ConcurrentDiskMB and ConcurrentChunkedDiskMB are what the disk under
	// the work directory wrote while the pushes ran (/proc/diskstats'
	// sectors, so anything else on that disk counts too); -1: unknown.
	ConcurrentDiskMB         float64 `json:"concurrent_disk_mb"`
	ConcurrentChunkedSeconds float64 `json:"concurrent_chunked_seconds"` // POST, PATCHes, PUT with the digest
	ConcurrentChunkedErrors  int64   `json:"concurrent_chunked_errors"`
	ConcurrentChunkedDiskMB  float64 `json:"concurrent_chunked_disk_mb"`
	FirstError               string  `json:"first_error,omitempty"`
}

func writeJSON(path string, r *result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func readJSON(path string) (*result, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// describeMachine names the CPU, core count and kernel, for the record.
func describeMachine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	kernel := ""
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = ", Linux " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%d × %s%s", runtime.NumCPU(), model, kernel)
}

// printResult writes one run as a two-column table.
func printResult(w io.Writer, r *result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t(%s)\n", r.Name, r.Machine)
	for _, row := range rows(r) {
		fmt.Fprintf(tw, "  %s\t%s\n", row[0], row[1])
	}
	tw.Flush()
}

func rows(r *result) [][2]string {
	var out [][2]string
	add := func(k, format string, args ...any) { out = append(out, [2]string{k, fmt.Sprintf(format, args...)}) }
	if b := r.WarmBlob; b != nil {
		add("warm blob, 1 client", "%.2f GiB/s, %.2f CPU s/GiB", b.GiBps1, b.CPUSecondsPerGiB1)
		add(fmt.Sprintf("warm blob, %d clients", b.Clients), "%.2f GiB/s, %.2f CPU s/GiB, %d upstream GETs", b.GiBpsN, b.CPUSecondsPerGiBN, b.UpstreamGETsWhileWarm)
	}
	if m := r.WarmManifest; m != nil {
		add(fmt.Sprintf("warm manifest, %d conns", m.Conns), "%.0f req/s, p50 %.2f ms, p99 %.2f ms, %d upstream requests, %d errors", m.RPS, m.P50Ms, m.P99Ms, m.UpstreamRequests, m.Errors)
	}
	for _, c := range []*coldFillResult{r.ColdFill, r.ColdFillLink} {
		if c == nil {
			continue
		}
		bound := ""
		if c.ServeBoundSeconds > 0 {
			bound = fmt.Sprintf(" = %.2f × serving %d copies warm", c.SlowestOverBound, c.Clients)
		}
		add(fmt.Sprintf("cold fill, %d clients, %s", c.Clients, linkName(c)), "%d upstream GETs, slowest %.2f s = %.2f × single (%.2f s)%s, first bytes within %.0f ms, server CPU %.1f s, %d errors",
			c.UpstreamGETs, c.Total.MaxMs/1000, c.SlowestOverSingle, c.SingleSeconds, bound, c.FirstByteSpreadMs, c.ServerCPUSeconds, c.Errors)
	}
	if p := r.Push; p != nil {
		add("push", "monolithic %.2f × dd, chunked %.2f × dd, single POST %.2f × dd (dd %.0f MB/s)", p.MonolithicOverDD, p.ChunkedOverDD, p.SinglePOSTOverDD, p.DDMBps)
		add(fmt.Sprintf("%d × one blob, monolithic", p.Pushers), "%.1f s, %d errors, disk wrote %.0f MB for %.0f MB", p.ConcurrentSeconds, p.ConcurrentErrors, p.ConcurrentDiskMB, float64(p.PusherBytes)/1e6)
		add(fmt.Sprintf("%d × one blob, chunked", p.Pushers), "%.1f s, %d errors, disk wrote %.0f MB for %.0f MB", p.ConcurrentChunkedSeconds, p.ConcurrentChunkedErrors, p.ConcurrentChunkedDiskMB, float64(p.PusherBytes)/1e6)
	}
	var rss []string
	for _, m := range []struct {
		after string
		mib   float64
	}{{"warm blob", r.PeakRSSAfterWarmBlobMiB}, {"cold fill", r.PeakRSSAfterColdFillMiB}, {"push", r.PeakRSSAfterPushMiB}} {
		if m.mib > 0 {
			rss = append(rss, fmt.Sprintf("%.0f MiB after %s", m.mib, m.after))
		}
	}
	if len(rss) > 0 {
		add("peak RSS", "%s", strings.Join(rss, ", "))
	}
	if m := r.WarmManifest; m != nil && m.FirstError != "" {
		add("first error, manifest", "%s", m.FirstError)
	}
	for _, c := range []*coldFillResult{r.ColdFill, r.ColdFillLink} {
		if c != nil && c.FirstError != "" {
			add("first error, cold fill", "%s", c.FirstError)
		}
	}
	if p := r.Push; p != nil && p.FirstError != "" {
		add("first error, push", "%s", p.FirstError)
	}
	return out
}

// compareCommand reads the JSON of slipway, a peer and the ceiling (by
// name: the first is the subject; "ceiling" and the other are found by
// name) and prints the ratios next to the targets. Runs of one name are
// merged, keeping each warm figure's best (see mergeBest).
func compareCommand(args []string, w io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: slipbench compare subject.json [peer.json] [ceiling.json]")
	}
	var all []*result
	byName := map[string]*result{}
	for _, p := range args {
		r, err := readJSON(p)
		if err != nil {
			return err
		}
		if first := byName[r.Name]; first != nil {
			mergeBest(first, r)
			continue
		}
		byName[r.Name] = r
		all = append(all, r)
	}
	subject := all[0]
	var peer, ceiling *result
	for _, r := range all[1:] {
		if r.Name == "ceiling" {
			ceiling = r
		} else {
			peer = r
		}
	}
	for _, r := range all {
		printResult(w, r)
		fmt.Fprintln(w)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s against the targets\tmeasured\ttarget\t\n", subject.Name)
	for _, c := range checks(subject, peer, ceiling) {
		mark := "met"
		if !c.ok {
			mark = "MISSED"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", c.what, c.got, c.want, mark)
	}
	return tw.Flush()
}

type check struct {
	what, got, want string
	ok              bool
}

// checks are the targets of issues 7 and 16, where the results to compare
// exist.
func checks(s, peer, ceil *result) []check {
	var out []check
	ratio := func(what string, a, b, min float64, want string) {
		if b <= 0 {
			return
		}
		out = append(out, check{what, fmt.Sprintf("%.2f", a/b), want, a/b >= min})
	}
	if ceil != nil && s.WarmBlob != nil && ceil.WarmBlob != nil {
		ratio("warm blob 1 client ÷ ceiling", s.WarmBlob.GiBps1, ceil.WarmBlob.GiBps1, 0.95, "≥ 0.95")
		ratio(fmt.Sprintf("warm blob %d clients ÷ ceiling", s.WarmBlob.Clients), s.WarmBlob.GiBpsN, ceil.WarmBlob.GiBpsN, 0.95, "≥ 0.95")
		if c := ceil.WarmBlob.CPUSecondsPerGiBN; c > 0 {
			r := s.WarmBlob.CPUSecondsPerGiBN / c
			out = append(out, check{"warm blob CPU s/GiB ÷ ceiling", fmt.Sprintf("%.2f", r), "≤ 1.2", r <= 1.2})
		}
	}
	if m := s.WarmManifest; m != nil {
		if ceil != nil && ceil.WarmManifest != nil {
			ratio("warm manifest req/s ÷ ceiling", m.RPS, ceil.WarmManifest.RPS, 0.9, "≥ 0.9")
			if c := ceil.WarmManifest.P99Ms; c > 0 {
				out = append(out, check{"warm manifest p99 ÷ ceiling", fmt.Sprintf("%.2f", m.P99Ms/c), "≤ 1.5", m.P99Ms/c <= 1.5})
			}
		}
		if peer != nil && peer.WarmManifest != nil {
			ratio("warm manifest req/s ÷ "+peer.Name, m.RPS, peer.WarmManifest.RPS, 0, "(about 40)")
		}
		out = append(out, check{"warm manifest upstream requests", fmt.Sprint(m.UpstreamRequests), "0", m.UpstreamRequests == 0})
		out = append(out, check{"warm manifest errors", fmt.Sprint(m.Errors), "0", m.Errors == 0})
	}
	for _, c := range []*coldFillResult{s.ColdFill, s.ColdFillLink} {
		if c == nil {
			continue
		}
		at := " (" + linkName(c) + ")"
		out = append(out, check{"cold fill upstream GETs" + at, fmt.Sprint(c.UpstreamGETs), "1", c.UpstreamGETs == 1})
		if c.UpstreamMiBps <= 0 && c.ServeBoundSeconds > 0 {
			// At loopback speed no server beats serving N copies warm.
			out = append(out, check{"cold fill slowest ÷ bound" + at, fmt.Sprintf("%.2f", c.SlowestOverBound), "≤ 1.25", c.SlowestOverBound <= 1.25})
		} else {
			out = append(out, check{"cold fill slowest ÷ single" + at, fmt.Sprintf("%.2f", c.SlowestOverSingle), "≤ 1.25", c.SlowestOverSingle <= 1.25})
		}
		out = append(out,
			check{"cold fill first-byte spread" + at, fmt.Sprintf("%.0f ms", c.FirstByteSpreadMs), "≤ 100 ms", c.FirstByteSpreadMs <= 100},
			check{"cold fill errors" + at, fmt.Sprint(c.Errors), "0", c.Errors == 0})
	}
	for _, m := range []struct {
		what string
		v    float64
	}{{"peak RSS after warm blob", s.PeakRSSAfterWarmBlobMiB}, {"peak RSS after cold fill", s.PeakRSSAfterColdFillMiB}} {
		if m.v > 0 {
			out = append(out, check{m.what, fmt.Sprintf("%.0f MiB", m.v), "≤ 100 MiB", m.v <= 100})
		}
	}
	if p := s.Push; p != nil {
		out = append(out,
			check{"push monolithic ÷ dd", fmt.Sprintf("%.2f", p.MonolithicOverDD), "≥ 0.9", p.MonolithicOverDD >= 0.9},
			check{"push chunked ÷ dd", fmt.Sprintf("%.2f", p.ChunkedOverDD), "≥ 0.9", p.ChunkedOverDD >= 0.9},
			check{"push single POST ÷ dd", fmt.Sprintf("%.2f", p.SinglePOSTOverDD), "≥ 0.9", p.SinglePOSTOverDD >= 0.9},
			check{fmt.Sprintf("%d concurrent pushes, errors", p.Pushers), fmt.Sprint(p.ConcurrentErrors + p.ConcurrentChunkedErrors), "0", p.ConcurrentErrors+p.ConcurrentChunkedErrors == 0})
		if p.ConcurrentChunkedDiskMB > 0 {
			// One copy of the blob, with room for the index and what
			// else the disk wrote meanwhile.
			mb := float64(p.PusherBytes) / 1e6
			out = append(out, check{fmt.Sprintf("%d concurrent chunked pushes, disk written ÷ blob", p.Pushers),
				fmt.Sprintf("%.2f", p.ConcurrentChunkedDiskMB/mb), "≤ 1.5", p.ConcurrentChunkedDiskMB/mb <= 1.5})
		}
		if peer != nil && peer.Push != nil && peer.Push.ConcurrentSeconds > 0 {
			r := p.ConcurrentSeconds / peer.Push.ConcurrentSeconds
			out = append(out, check{fmt.Sprintf("%d concurrent pushes, wall ÷ %s", p.Pushers, peer.Name), fmt.Sprintf("%.2f", r), "≤ 0.5", r <= 0.5})
		}
	}
	return out
}

func linkName(c *coldFillResult) string {
	if c.UpstreamMiBps <= 0 {
		return "upstream at loopback speed"
	}
	return fmt.Sprintf("upstream link %.0f MiB/s", c.UpstreamMiBps)
}

// mergeBest folds another run of the same server into r: the best of each
// warm figure (throughput up, CPU and latency down), and the worst of the
// counts that must be zero. Warm reads on a 2-core machine swing by 10%
// from one minute to the next; the best of two runs, for every server
// alike, is what the machine can do. The other scenarios keep r's run.
func mergeBest(r, o *result) {
	if a, b := r.WarmBlob, o.WarmBlob; a == nil {
		r.WarmBlob = b
	} else if b != nil {
		a.GiBps1, a.GiBpsN = max(a.GiBps1, b.GiBps1), max(a.GiBpsN, b.GiBpsN)
		a.CPUSecondsPerGiB1, a.CPUSecondsPerGiBN = min(a.CPUSecondsPerGiB1, b.CPUSecondsPerGiB1), min(a.CPUSecondsPerGiBN, b.CPUSecondsPerGiBN)
		a.UpstreamGETsWhileWarm = max(a.UpstreamGETsWhileWarm, b.UpstreamGETsWhileWarm)
	}
	if a, b := r.WarmManifest, o.WarmManifest; a == nil {
		r.WarmManifest = b
	} else if b != nil {
		a.RPS, a.Requests = max(a.RPS, b.RPS), a.Requests+b.Requests
		a.P50Ms, a.P99Ms = min(a.P50Ms, b.P50Ms), min(a.P99Ms, b.P99Ms)
		a.MaxMs = max(a.MaxMs, b.MaxMs)
		a.UpstreamRequests, a.Errors = max(a.UpstreamRequests, b.UpstreamRequests), a.Errors+b.Errors
		if a.FirstError == "" {
			a.FirstError = b.FirstError
		}
	}
	r.PeakRSSAfterWarmBlobMiB = max(r.PeakRSSAfterWarmBlobMiB, o.PeakRSSAfterWarmBlobMiB)
	r.PeakRSSAfterColdFillMiB = max(r.PeakRSSAfterColdFillMiB, o.PeakRSSAfterColdFillMiB)
	if r.ColdFill == nil {
		r.ColdFill, r.ColdFillLink = o.ColdFill, o.ColdFillLink
	}
	if r.Push == nil {
		r.Push, r.PeakRSSAfterPushMiB = o.Push, o.PeakRSSAfterPushMiB
	}
}
