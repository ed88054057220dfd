package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// bench runs the scenarios of one registry under test against one seeded
// upstream and fills in a result.
type bench struct {
	cfg runConfig
	up  *seededUpstream
	res *result
	log io.Writer

	warmLayer digest.Digest
	manifest  []byte          // the warm image's
	cold      []digest.Digest // pairs of uncached blobs: one alone, one shared
}

var manifestAccept = http.Header{"Accept": {
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
}}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "slipbench %s: "+format+"\n", append([]any{b.cfg.name}, args...)...)
}

// seed puts the warm image (one layer of blob-size bytes) and the cold
// blobs into the upstream.
func (b *bench) seed() error {
	// The warm image is needed by every read scenario (the ceiling copies
	// it as it starts), by none of the pushes.
	if b.cfg.runs("warm-blob") || b.cfg.runs("warm-manifest") || b.cfg.runs("cold-fill") {
		var err error
		layer := randomBlob(b.cfg.blobSize, 1)
		if b.warmLayer, b.manifest, err = b.up.seedImage(repoWarm, tagWarm, layer); err != nil {
			return err
		}
	}
	if b.cfg.runs("cold-fill") {
		pairs := 1
		if b.cfg.linkRate > 0 {
			pairs = 2
		}
		for i := 0; i < 2*pairs; i++ {
			p := randomBlob(b.cfg.coldSize, uint64(10+i))
			d := digest.FromBytes(p)
			b.up.blobs.add(d, p)
			b.cold = append(b.cold, d)
		}
	}
	return nil
}

// warmBlob: the blob is pulled once (a fill) and checked, then read by 1
// client and by N clients at once, measuring GiB/s and the server's CPU
// seconds per GiB served.
func (b *bench) warmBlob(s *server) error {
	r := &warmBlobResult{SizeBytes: b.cfg.blobSize, Clients: b.cfg.clients}
	b.res.WarmBlob = r
	u := s.URL + "/v2/" + repoWarm + "/blobs/" + string(b.warmLayer)
	c := &http.Client{Transport: newTransport()}
	buf := make([]byte, readBuf)
	for i := 0; i < 2; i++ { // the fill, then a first hit; both checked
		f, err := fetchOK(c, u, nil, buf, b.cfg.blobSize, true)
		if err != nil {
			return err
		}
		if f.digest != string(b.warmLayer) {
			return fmt.Errorf("GET %s: body has digest %s", u, f.digest)
		}
		if i == 0 {
			r.FirstPullSeconds = f.total.Seconds()
		}
	}
	before := b.up.count("GET blob " + string(b.warmLayer))

	gbs, cpu, err := b.measure(s, func() error {
		for i := 0; i < b.cfg.reps; i++ {
			if _, err := fetchOK(c, u, nil, buf, b.cfg.blobSize, false); err != nil {
				return err
			}
		}
		return nil
	}, int64(b.cfg.reps)*b.cfg.blobSize)
	if err != nil {
		return err
	}
	r.GiBps1, r.CPUSecondsPerGiB1 = gbs, cpu

	clients := make([]*http.Client, b.cfg.clients)
	bufs := make([][]byte, b.cfg.clients)
	for i := range clients {
		clients[i] = &http.Client{Transport: newTransport()}
		bufs[i] = make([]byte, readBuf)
	}
	gbs, cpu, err = b.measure(s, func() error {
		for rep := 0; rep < b.cfg.reps; rep++ {
			if err := parallel(b.cfg.clients, func(i int) error {
				_, err := fetchOK(clients[i], u, nil, bufs[i], b.cfg.blobSize, false)
				return err
			}); err != nil {
				return err
			}
		}
		return nil
	}, int64(b.cfg.reps*b.cfg.clients)*b.cfg.blobSize)
	if err != nil {
		return err
	}
	r.GiBpsN, r.CPUSecondsPerGiBN = gbs, cpu
	r.UpstreamGETsWhileWarm = b.up.count("GET blob "+string(b.warmLayer)) - before
	b.logf("warm blob: %.2f GiB/s with 1 client, %.2f GiB/s with %d", r.GiBps1, r.GiBpsN, r.Clients)
	return nil
}

// measure runs work and returns GiB/s over bytes and the server's CPU
// seconds per GiB.
func (b *bench) measure(s *server, work func() error, bytes int64) (gibps, cpuPerGiB float64, err error) {
	cpu0, err := cpuSeconds(s.Pid())
	if err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	if err := work(); err != nil {
		return 0, 0, err
	}
	el := time.Since(t0)
	cpu1, err := cpuSeconds(s.Pid())
	if err != nil {
		return 0, 0, err
	}
	g := float64(bytes) / gib
	return g / el.Seconds(), (cpu1 - cpu0) / g, nil
}

// warmManifest: N connections GET the manifest by tag for a fixed time,
// inside the tag's freshness window.
func (b *bench) warmManifest(s *server) error {
	r := &warmManifestResult{Conns: b.cfg.conns, Seconds: b.cfg.duration.Seconds()}
	b.res.WarmManifest = r
	u := s.URL + "/v2/" + repoWarm + "/manifests/" + tagWarm
	c := &http.Client{Transport: newTransport()}
	buf := make([]byte, 64<<10)
	for i := 0; i < 2; i++ {
		f, err := fetchOK(c, u, manifestAccept, buf, 0, true)
		if err != nil {
			return err
		}
		if want := digest.FromBytes(b.manifest); f.digest != string(want) {
			return fmt.Errorf("GET %s: body has digest %s, want %s", u, f.digest, want)
		}
	}
	size := int64(len(b.manifest))

	before := b.up.total.Load()
	lat := make([][]time.Duration, b.cfg.conns)
	errs := make([]int64, b.cfg.conns)
	var first error
	var mu sync.Mutex
	deadline := time.Now().Add(b.cfg.duration)
	t0 := time.Now()
	parallel(b.cfg.conns, func(i int) error {
		c := &http.Client{Transport: newTransport()}
		buf := make([]byte, 64<<10)
		l := make([]time.Duration, 0, 1<<14)
		for time.Now().Before(deadline) {
			f, err := fetchOK(c, u, manifestAccept, buf, size, false)
			if err != nil {
				errs[i]++
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				time.Sleep(time.Millisecond) // a refused connection must not spin
				continue
			}
			l = append(l, f.total)
		}
		lat[i] = l
		return nil
	})
	el := time.Since(t0)
	r.UpstreamRequests = b.up.total.Load() - before
	var all []time.Duration
	for i := range lat {
		all = append(all, lat[i]...)
		r.Errors += errs[i]
	}
	if first != nil {
		r.FirstError = first.Error()
	}
	s2 := sortedCopy(all)
	r.Requests = int64(len(s2))
	r.RPS = float64(len(s2)) / el.Seconds()
	r.P50Ms, r.P99Ms = ms(percentile(s2, 50)), ms(percentile(s2, 99))
	if len(s2) > 0 {
		r.MaxMs = ms(s2[len(s2)-1])
	}
	b.logf("warm manifest: %.0f req/s, p50 %.2f ms, p99 %.2f ms, %d upstream requests, %d errors", r.RPS, r.P50Ms, r.P99Ms, r.UpstreamRequests, r.Errors)
	return nil
}

// coldFill: one client pulls an uncached blob alone; then N clients ask at
// the same moment for another uncached blob of the same size. rate, if not
// zero, is the upstream link's bytes per second.
func (b *bench) coldFill(s *server, r *coldFillResult, single, shared digest.Digest, rate int64) error {
	b.up.link.rate.Store(rate)
	defer b.up.link.rate.Store(0)
	*r = coldFillResult{SizeBytes: b.cfg.coldSize, Clients: b.cfg.coldClients, UpstreamMiBps: float64(rate) / (1 << 20)}
	c := &http.Client{Transport: newTransport()}
	buf := make([]byte, readBuf)
	u := s.URL + "/v2/" + repoCold + "/blobs/"
	f, err := fetchOK(c, u+string(single), nil, buf, b.cfg.coldSize, true)
	if err != nil {
		return err
	}
	if f.digest != string(single) {
		return fmt.Errorf("cold blob has digest %s, want %s", f.digest, single)
	}
	r.SingleSeconds, r.SingleTTFBMs = f.total.Seconds(), ms(f.ttfb)

	// Every client gets its own connection, opened before the start, so
	// that the requests leave together.
	n := b.cfg.coldClients
	clients := make([]*http.Client, n)
	bufs := make([][]byte, n)
	for i := range clients {
		clients[i] = &http.Client{Transport: newTransport()}
		bufs[i] = make([]byte, readBuf)
		if _, err := fetch(clients[i], s.URL+"/v2/", nil, bufs[i], false); err != nil {
			return err
		}
	}
	start := make(chan struct{})
	totals := make([]time.Duration, n)
	ttfbs := make([]time.Duration, n)
	firstByteAt := make([]time.Time, n)
	var wg sync.WaitGroup
	errc := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			t0 := time.Now()
			f, err := fetchOK(clients[i], u+string(shared), nil, bufs[i], b.cfg.coldSize, false)
			if err != nil {
				errc <- err
				return
			}
			totals[i], ttfbs[i], firstByteAt[i] = f.total, f.ttfb, t0.Add(f.ttfb)
		}()
	}
	time.Sleep(50 * time.Millisecond) // let every goroutine reach the gate
	cpu0, err := cpuSeconds(s.Pid())
	if err != nil {
		return err
	}
	close(start)
	wg.Wait()
	cpu1, err := cpuSeconds(s.Pid())
	if err != nil {
		return err
	}
	r.ServerCPUSeconds = cpu1 - cpu0
	close(errc)
	for err := range errc {
		r.Errors++
		if r.FirstError == "" {
			r.FirstError = err.Error()
		}
	}
	r.UpstreamGETs = b.up.count("GET blob " + string(shared))
	r.Total, r.TTFB = spreadOf(totals), spreadOf(ttfbs)
	lo, hi := firstByteAt[0], firstByteAt[0]
	for _, t := range firstByteAt {
		if t.Before(lo) {
			lo = t
		}
		if t.After(hi) {
			hi = t
		}
	}
	r.FirstByteSpreadMs = ms(hi.Sub(lo))
	r.SlowestOverSingle = r.Total.MaxMs / 1000 / r.SingleSeconds
	if w := b.res.WarmBlob; w != nil && w.GiBpsN > 0 {
		// No server sends N copies faster than it serves warm reads.
		r.ServeBoundSeconds = float64(n) * float64(b.cfg.coldSize) / gib / w.GiBpsN
		r.SlowestOverBound = r.Total.MaxMs / 1000 / r.ServeBoundSeconds
	}
	// One checked read afterwards: the shared blob is stored whole.
	f, err = fetchOK(c, u+string(shared), nil, buf, b.cfg.coldSize, true)
	if err != nil {
		return err
	}
	if f.digest != string(shared) {
		return fmt.Errorf("cold blob has digest %s after the fill, want %s", f.digest, shared)
	}
	b.logf("cold fill (upstream %s): %d upstream GETs, slowest %.2f s = %.2f × single %.2f s, first bytes within %.0f ms, %d errors",
		rateName(rate), r.UpstreamGETs, r.Total.MaxMs/1000, r.SlowestOverSingle, r.SingleSeconds, r.FirstByteSpreadMs, r.Errors)
	return nil
}

// push: dd of the same size on the same disk sets the bar; then a
// monolithic and a chunked push, then N concurrent pushes of one blob.
func (b *bench) push(s *server, workDir string) error {
	r := &pushResult{SizeBytes: b.cfg.pushSize, ChunkBytes: b.cfg.chunkSize, Pushers: b.cfg.pushers, PusherBytes: b.cfg.pusherSize}
	b.res.Push = r

	// This disk's speed wanders from run to run (a virtual disk with a
	// cache in front): each push is paired with a dd just before it, and
	// the median of the pairs' ratios is the result.
	c := &http.Client{Transport: newTransport()}
	blob := randomBlob(b.cfg.pushSize, 4)
	kinds := []struct {
		name string
		push func(c *http.Client, base, repo string, blob []byte, d digest.Digest) error
		mbps []float64
		over []float64
	}{
		{name: "monolithic", push: pushMonolithic},
		{name: "chunked", push: func(c *http.Client, base, repo string, blob []byte, d digest.Digest) error {
			return pushChunked(c, base, repo, blob, d, b.cfg.chunkSize)
		}},
		{name: "single POST", push: pushSinglePOST},
	}
	var dds []float64
	for rep := 0; rep < b.cfg.pushReps; rep++ {
		for k := range kinds {
			ddMBps, err := b.dd(workDir)
			if err != nil {
				return err
			}
			blob[0]++ // another blob of the same size each time
			d := digest.FromBytes(blob)
			t0 := time.Now()
			if err := kinds[k].push(c, s.URL, repoPush, blob, d); err != nil {
				return fmt.Errorf("%s push: %w", kinds[k].name, err)
			}
			mbps := float64(len(blob)) / 1e6 / time.Since(t0).Seconds()
			if err := b.checkBlob(c, s.URL, repoPush, d, int64(len(blob))); err != nil {
				return err
			}
			dds = append(dds, ddMBps)
			kinds[k].mbps, kinds[k].over = append(kinds[k].mbps, mbps), append(kinds[k].over, mbps/ddMBps)
		}
	}
	r.DDMBps = median(dds)
	r.MonolithicMBps, r.MonolithicOverDD = median(kinds[0].mbps), median(kinds[0].over)
	r.ChunkedMBps, r.ChunkedOverDD = median(kinds[1].mbps), median(kinds[1].over)
	r.SinglePOSTMBps, r.SinglePOSTOverDD = median(kinds[2].mbps), median(kinds[2].over)

	// N pushes of one blob at once, as parallel CI jobs do: each kind on a
	// blob not stored yet. The chunked ones learn the digest only at the
	// PUT, so each writes its own upload; what a duplicate costs on disk
	// is in the diskstats.
	concurrent := func(name string, blob []byte, push func(c *http.Client, base, repo string, blob []byte, d digest.Digest) error) (secs float64, errs int64, diskMB float64, err error) {
		d := digest.FromBytes(blob)
		w0 := diskWritten(workDir)
		t0 := time.Now()
		var mu sync.Mutex
		parallel(b.cfg.pushers, func(int) error {
			c := &http.Client{Transport: newTransport()}
			if err := push(c, s.URL, repoPush+"16", blob, d); err != nil {
				mu.Lock()
				errs++
				if r.FirstError == "" {
					r.FirstError = name + ": " + err.Error()
				}
				mu.Unlock()
			}
			return nil
		})
		secs = time.Since(t0).Seconds()
		diskMB = -1
		if w1 := diskWritten(workDir); w0 >= 0 && w1 >= 0 {
			diskMB = float64(w1-w0) / 1e6
		}
		return secs, errs, diskMB, b.checkBlob(c, s.URL, repoPush+"16", d, int64(len(blob)))
	}
	one := blob[:b.cfg.pusherSize]
	one[1] ^= 0x0f
	var err error
	if r.ConcurrentSeconds, r.ConcurrentErrors, r.ConcurrentDiskMB, err = concurrent("monolithic", one, pushMonolithic); err != nil {
		return err
	}
	one[1] ^= 0xf0
	if r.ConcurrentChunkedSeconds, r.ConcurrentChunkedErrors, r.ConcurrentChunkedDiskMB, err = concurrent("chunked", one, kinds[1].push); err != nil {
		return err
	}
	b.logf("push: dd %.0f MB/s (median); monolithic %.0f MB/s (%.2f × dd), chunked %.0f MB/s (%.2f × dd), single POST %.0f MB/s (%.2f × dd); %d × one blob: monolithic %.1f s, %d errors, disk %.0f MB; chunked %.1f s, %d errors, disk %.0f MB",
		r.DDMBps, r.MonolithicMBps, r.MonolithicOverDD, r.ChunkedMBps, r.ChunkedOverDD, r.SinglePOSTMBps, r.SinglePOSTOverDD,
		r.Pushers, r.ConcurrentSeconds, r.ConcurrentErrors, r.ConcurrentDiskMB, r.ConcurrentChunkedSeconds, r.ConcurrentChunkedErrors, r.ConcurrentChunkedDiskMB)
	return nil
}

// diskWritten is how many bytes the block device under dir has written
// since boot (/sys/dev/block/MAJ:MIN/stat, sectors of 512 bytes); -1 if
// it cannot tell (a filesystem on no block device, such as tmpfs).
func diskWritten(dir string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(dir, &st) != nil {
		return -1
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) < 7 {
		return -1
	}
	sectors, err := strconv.ParseInt(f[6], 10, 64)
	if err != nil {
		return -1
	}
	return sectors * 512
}

// dd writes push-size bytes with dd bs=4M conv=fsync into dir and returns
// its MB/s.
func (b *bench) dd(dir string) (float64, error) {
	path := filepath.Join(dir, "dd.bin")
	defer os.Remove(path)
	t0 := time.Now()
	out, err := exec.Command("dd", "if=/dev/zero", "of="+path, "bs=4M", fmt.Sprintf("count=%d", b.cfg.pushSize>>22), "conv=fsync").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("dd: %v: %s", err, out)
	}
	return float64(b.cfg.pushSize) / 1e6 / time.Since(t0).Seconds(), nil
}

func (b *bench) checkBlob(c *http.Client, base, repo string, d digest.Digest, size int64) error {
	f, err := fetchOK(c, base+"/v2/"+repo+"/blobs/"+string(d), nil, make([]byte, readBuf), size, true)
	if err != nil {
		return fmt.Errorf("reading back a pushed blob: %w", err)
	}
	if f.digest != string(d) {
		return fmt.Errorf("pushed %s, read back %s", d, f.digest)
	}
	return nil
}

// startUpload POSTs an upload session and returns its absolute location.
func startUpload(c *http.Client, base, repo string) (string, error) {
	resp, err := c.Post(base+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		return "", err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("POST upload: status %d", resp.StatusCode)
	}
	return location(base, resp)
}

func location(base string, resp *http.Response) (string, error) {
	b, err := url.Parse(base)
	if err != nil {
		return "", err
	}
	l, err := url.Parse(resp.Header.Get("Location"))
	if err != nil || resp.Header.Get("Location") == "" {
		return "", fmt.Errorf("upload answer %d without a usable Location", resp.StatusCode)
	}
	return b.ResolveReference(l).String(), nil
}

func withDigest(loc string, d digest.Digest) string {
	u, _ := url.Parse(loc)
	q := u.Query()
	q.Set("digest", string(d))
	u.RawQuery = q.Encode()
	return u.String()
}

// send does one request with a body and wants status want (any, if
// want < 0).
func send(c *http.Client, method, u string, body []byte, header map[string]string, want int) (*http.Response, error) {
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.ContentLength = int64(len(body))
	req.Header.Set("Content-Type", "application/octet-stream")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if want >= 0 && resp.StatusCode != want {
		return nil, fmt.Errorf("%s %s: status %d, want %d: %s", method, u, resp.StatusCode, want, msg)
	}
	return resp, nil
}

// pushMonolithic is POST then one PUT with the whole blob.
func pushMonolithic(c *http.Client, base, repo string, blob []byte, d digest.Digest) error {
	loc, err := startUpload(c, base, repo)
	if err != nil {
		return err
	}
	_, err = send(c, http.MethodPut, withDigest(loc, d), blob, nil, http.StatusCreated)
	return err
}

// pushSinglePOST is one POST with the digest and the whole blob
// (BuildKit pushes image configs so). A registry that does not take a
// blob in the POST answers 202 with an upload, as the spec allows
// (distribution 2.8 does); the client then sends it again with a PUT, as
// clients do, and the push costs both.
func pushSinglePOST(c *http.Client, base, repo string, blob []byte, d digest.Digest) error {
	resp, err := send(c, http.MethodPost, base+"/v2/"+repo+"/blobs/uploads/?digest="+string(d), blob, nil, -1)
	if err != nil {
		return err
	}
	switch resp.StatusCode {
	case http.StatusCreated:
		return nil
	case http.StatusAccepted:
		loc, err := location(base, resp)
		if err != nil {
			return err
		}
		_, err = send(c, http.MethodPut, withDigest(loc, d), blob, nil, http.StatusCreated)
		return err
	}
	return fmt.Errorf("single POST: status %d, want 201 (or 202 and an upload)", resp.StatusCode)
}

// pushChunked is POST, a PATCH per chunk with Content-Range, then PUT.
func pushChunked(c *http.Client, base, repo string, blob []byte, d digest.Digest, chunk int64) error {
	loc, err := startUpload(c, base, repo)
	if err != nil {
		return err
	}
	for off := int64(0); off < int64(len(blob)); off += chunk {
		end := min(off+chunk, int64(len(blob)))
		resp, err := send(c, http.MethodPatch, loc, blob[off:end], map[string]string{"Content-Range": fmt.Sprintf("%d-%d", off, end-1)}, http.StatusAccepted)
		if err != nil {
			return err
		}
		if loc, err = location(base, resp); err != nil {
			return err
		}
	}
	_, err = send(c, http.MethodPut, withDigest(loc, d), nil, nil, http.StatusCreated)
	return err
}

// parallel runs f(0..n-1) at once and returns the first error.
func parallel(n int, f func(i int) error) error {
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func rateName(rate int64) string {
	if rate <= 0 {
		return "at loopback speed"
	}
	return fmt.Sprintf("at %d MiB/s", rate>>20)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}
