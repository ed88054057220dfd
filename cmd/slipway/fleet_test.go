package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
	"slipway/cache/tier/tiertest"
	"slipway/upstream"
)

// A fleet of three replicas on one real MinIO (issue 14), in front of a
// counting upstream: go-containerregistry's registry on loopback, whose
// blob bodies can be slowed down.

type countingRegistry struct {
	srv  *httptest.Server
	host string
	reg  http.Handler

	mu       sync.Mutex
	blobGETs map[string]int // by digest
	rate     int            // bytes a second of blob bodies; 0: as fast as it goes
	sent     map[string]time.Time

	manifestRequests int
}

func newCountingRegistry(t *testing.T) *countingRegistry {
	u := &countingRegistry{reg: registry.New(registry.Logger(log.New(io.Discard, "", 0))), blobGETs: map[string]int{}, sent: map[string]time.Time{}}
	u.srv = httptest.NewServer(u)
	t.Cleanup(u.srv.Close)
	u.host = strings.TrimPrefix(u.srv.URL, "http://")
	return u
}

func (u *countingRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// go-containerregistry's registry keeps one blob store for all its
	// repositories; a real one says a repository holds only its own.
	if strings.HasPrefix(r.URL.Path, "/v2/lib/stranger/") {
		http.NotFound(w, r)
		return
	}
	if strings.Contains(r.URL.Path, "/manifests/") {
		u.mu.Lock()
		u.manifestRequests++
		u.mu.Unlock()
	}
	i := strings.LastIndex(r.URL.Path, "/blobs/sha256:")
	if r.Method != http.MethodGet || i < 0 {
		u.reg.ServeHTTP(w, r)
		return
	}
	d := r.URL.Path[i+len("/blobs/"):]
	u.mu.Lock()
	u.blobGETs[d]++
	rate := u.rate
	u.mu.Unlock()
	if rate == 0 {
		u.reg.ServeHTTP(w, r)
		return
	}
	rec := httptest.NewRecorder()
	u.reg.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	step := max(rate/20, 1)
	for off := 0; off < len(body); off += step {
		if off > 0 {
			time.Sleep(50 * time.Millisecond)
		}
		if _, err := w.Write(body[off:min(off+step, len(body))]); err != nil {
			return
		}
		w.(http.Flusher).Flush()
	}
	u.mu.Lock()
	u.sent[d] = time.Now()
	u.mu.Unlock()
}

func (u *countingRegistry) gets(d digest.Digest) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.blobGETs[string(d)]
}

func (u *countingRegistry) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.blobGETs {
		n += c
	}
	return n
}

func (u *countingRegistry) setRate(r int) {
	u.mu.Lock()
	u.rate = r
	u.mu.Unlock()
}

// pushBlob puts b into repo at the upstream with a monolithic upload.
func (u *countingRegistry) pushBlob(t *testing.T, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := monolithic("http://"+u.host, repo, d, b); err != nil {
		t.Fatal(err)
	}
	return d
}

type fleetEnv struct {
	t        *testing.T
	minio    *tiertest.Server
	up       *countingRegistry
	shared   *tier.Client
	token    string
	replicas []*replica
}

type replica struct {
	addr, peer, dir string
	proc            *proc
}

func (r *replica) url(path string) string { return "http://" + r.addr + path }

func newFleetEnv(t *testing.T, n int) *fleetEnv {
	t.Helper()
	f := &fleetEnv{t: t, minio: tiertest.Start(t), up: newCountingRegistry(t), token: "fleet-test-token-" + fmt.Sprint(time.Now().UnixNano())}
	var err error
	f.shared, err = tier.New(tier.Config{Endpoint: f.minio.Endpoint, Bucket: "slipway", Prefix: "fleet/",
		AccessKey: f.minio.AccessKey, SecretKey: f.minio.SecretKey, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.shared.CreateBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	for range n {
		f.replicas = append(f.replicas, &replica{addr: freeAddr(t), peer: freeAddr(t), dir: t.TempDir()})
	}
	for i := range f.replicas {
		f.start(i)
	}
	f.waitFleet()
	return f
}

func (f *fleetEnv) peers() string {
	var ps []string
	for _, r := range f.replicas {
		ps = append(ps, r.peer)
	}
	return strings.Join(ps, ",")
}

func (f *fleetEnv) start(i int) {
	r := f.replicas[i]
	env := []string{"AWS_ACCESS_KEY_ID=" + f.minio.AccessKey, "AWS_SECRET_ACCESS_KEY=" + f.minio.SecretKey, "SLIPWAY_PEER_TOKEN=" + f.token}
	defer func() {
		p := r.proc
		f.t.Cleanup(func() {
			if strings.Contains(p.stderr.String(), "DATA RACE") {
				f.t.Errorf("replica %s had a data race:\n%s", r.addr, p.stderr.String())
			}
		})
	}()
	r.proc = start(f.t, env, "serve", "--listen", r.addr, "--upstream", f.up.srv.URL, "--data-dir", r.dir,
		"--log-level", "warn", "--push-prefix", "ci,conformance",
		"--s3-endpoint", f.minio.Endpoint, "--s3-bucket", "slipway", "--s3-prefix", "fleet/",
		"--peers", f.peers(), "--peer-listen", r.peer)
	r.proc.waitReady(f.t, r.addr)
}

// kill stops replica i with SIGKILL.
func (f *fleetEnv) kill(i int) {
	r := f.replicas[i]
	syscall.Kill(-r.proc.cmd.Process.Pid, syscall.SIGKILL)
	<-r.proc.done
}

// waitFleet waits until every replica sees every other alive (their peer
// listeners answer with the token).
func (f *fleetEnv) waitFleet() {
	f.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for _, r := range f.replicas {
		for {
			req, _ := http.NewRequest("GET", "http://"+r.peer+"/peer/v1/ping", nil)
			req.Header.Set(upstream.PeerTokenHeader, f.token)
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					break
				}
			}
			if time.Now().After(deadline) {
				f.t.Fatalf("replica %s: peer listener not up: %v", r.addr, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	time.Sleep(2500 * time.Millisecond) // two ping rounds: every replica sees the others alive
}

// owner is the replica that owns key while all are alive.
func (f *fleetEnv) owner(key string) int {
	var addrs []string
	for _, r := range f.replicas {
		addrs = append(addrs, r.peer)
	}
	o := upstream.OwnerOf(key, addrs)
	for i, r := range f.replicas {
		if r.peer == o {
			return i
		}
	}
	f.t.Fatal("no owner")
	return -1
}

// waitShared waits until the shared tier has blob d.
func (f *fleetEnv) waitShared(d digest.Digest) {
	f.t.Helper()
	for range 300 {
		if _, err := f.shared.StatBlob(context.Background(), d); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.t.Fatalf("%s never reached the shared tier", d)
}

func randomBlob(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func monolithic(base, repo string, d digest.Digest, b []byte) error {
	resp, err := http.Post(base+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("POST: %d", resp.StatusCode)
	}
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = base + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ := http.NewRequest("PUT", loc+sep+"digest="+string(d), bytes.NewReader(b))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("PUT: %d %s", resp.StatusCode, body)
	}
	return nil
}

// getBlob GETs url and verifies it against d; firstByte is when the first
// byte arrived.
func getVerified(url string, d digest.Digest) (firstByte time.Time, err error) {
	resp, err := http.Get(url)
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Time{}, fmt.Errorf("status %d", resp.StatusCode)
	}
	h := d.Algorithm().Digester()
	buf := make([]byte, 64<<10)
	n, err := resp.Body.Read(buf)
	firstByte = time.Now()
	h.Hash().Write(buf[:n])
	if err == nil {
		_, err = io.CopyBuffer(h.Hash(), resp.Body, buf)
	}
	if err != nil && err != io.EOF {
		return firstByte, err
	}
	if h.Digest() != d {
		return firstByte, fmt.Errorf("wrong bytes: %s", h.Digest())
	}
	return firstByte, nil
}

func TestFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	f := newFleetEnv(t, 3)

	t.Run("1 one upstream fetch for 30 clients on 3 replicas", func(t *testing.T) {
		b := randomBlob(64 << 20)
		d := f.up.pushBlob(t, "lib/big", b)
		f.up.setRate(32 << 20) // two seconds of fill
		defer f.up.setRate(0)
		var wg sync.WaitGroup
		firsts := make([]time.Time, 30)
		errs := make([]error, 30)
		gate := make(chan struct{})
		for i := range 30 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				firsts[i], errs[i] = getVerified(f.replicas[i%3].url("/v2/lib/big/blobs/"+string(d)), d)
			}()
		}
		close(gate)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("client %d (replica %d): %v", i, i%3, err)
			}
		}
		if n := f.up.gets(d); n != 1 {
			t.Errorf("%d upstream GETs of the blob, want 1", n)
		}
		f.up.mu.Lock()
		end := f.up.sent[string(d)]
		f.up.mu.Unlock()
		for i, at := range firsts {
			if !at.Before(end) {
				t.Errorf("client %d got its first byte %s after the fill ended", i, at.Sub(end))
			}
		}
		f.waitShared(d)
	})

	t.Run("2 a wiped replica serves from the shared tier", func(t *testing.T) {
		img := pushImageTo(t, f.up.host, "lib/app:v1")
		// Pull it through one replica; the fill queues it for the shared tier.
		pullAndCheck(t, f.replicas[0].addr, "lib/app:v1", img.digest)
		for _, bd := range img.blobs {
			f.waitShared(bd)
		}
		waitPulledTag(t, f.shared, f.up.host, "lib/app", "v1")
		before := f.up.total()
		beforeManifests := countManifestRequests(f)
		f.kill(2)
		os.RemoveAll(f.replicas[2].dir)
		os.MkdirAll(f.replicas[2].dir, 0o755)
		f.start(2)
		f.waitFleet()
		pullAndCheck(t, f.replicas[2].addr, "lib/app:v1", img.digest)
		if n := f.up.total() - before; n != 0 {
			t.Errorf("%d upstream blob GETs after the wipe", n)
		}
		if n := countManifestRequests(f) - beforeManifests; n != 0 {
			t.Errorf("%d upstream manifest requests after the wipe", n)
		}
	})

	t.Run("3 a chunked push across replicas, seen on all, deleted on all", func(t *testing.T) {
		layer, config := randomBlob(3<<20), []byte(`{"architecture":"amd64","os":"linux"}`)
		ld, cd := digest.FromBytes(layer), digest.FromBytes(config)
		// POST on one, PATCHes on the next two, PUT on the first.
		resp, err := http.Post(f.replicas[0].url("/v2/ci/app/blobs/uploads/"), "", nil)
		if err != nil || resp.StatusCode != http.StatusAccepted {
			t.Fatalf("POST: %v %v", err, resp)
		}
		loc := resp.Header.Get("Location")
		third := len(layer) / 3
		for i, part := range [][]byte{layer[:third], layer[third : 2*third], layer[2*third:]} {
			req, _ := http.NewRequest("PATCH", f.replicas[(i+1)%3].url(loc), bytes.NewReader(part))
			req.Header.Set("Content-Range", fmt.Sprintf("%d-%d", i*third, i*third+len(part)-1))
			req.Header.Set("Content-Type", "application/octet-stream")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("PATCH %d on replica %d: %d %s", i, (i+1)%3, resp.StatusCode, body)
			}
			loc = resp.Header.Get("Location")
		}
		req, _ := http.NewRequest("PUT", f.replicas[2].url(loc+"?digest="+string(ld)), nil)
		if strings.Contains(loc, "?") {
			req, _ = http.NewRequest("PUT", f.replicas[2].url(loc+"&digest="+string(ld)), nil)
		}
		resp, err = http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusCreated {
			t.Fatalf("PUT on replica 2: %v %v", err, resp)
		}
		resp.Body.Close()
		if err := monolithic(f.replicas[1].url(""), "ci/app", cd, config); err != nil {
			t.Fatal(err)
		}
		man := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":%d}]}`,
			cd, len(config), ld, len(layer)))
		md := digest.FromBytes(man)
		req, _ = http.NewRequest("PUT", f.replicas[0].url("/v2/ci/app/manifests/v1"), bytes.NewReader(man))
		req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		resp, err = http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusCreated {
			body := ""
			if resp != nil {
				b, _ := io.ReadAll(resp.Body)
				body = string(b)
			}
			t.Fatalf("manifest PUT on replica 0: %v %v %s", err, resp, body)
		}
		for i, r := range f.replicas {
			for _, p := range []string{"/v2/ci/app/manifests/v1", "/v2/ci/app/manifests/" + string(md)} {
				resp, err := http.Get(r.url(p))
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Errorf("replica %d GET %s: %v %v", i, p, err, resp)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
			for _, bd := range []digest.Digest{ld, cd} {
				if _, err := getVerified(r.url("/v2/ci/app/blobs/"+string(bd)), bd); err != nil {
					t.Errorf("replica %d blob %s: %v", i, bd, err)
				}
			}
		}
		req, _ = http.NewRequest("DELETE", f.replicas[1].url("/v2/ci/app/manifests/"+string(md)), nil)
		resp, err = http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusAccepted {
			t.Fatalf("DELETE on replica 1: %v %v", err, resp)
		}
		for i, r := range f.replicas {
			for _, p := range []string{"/v2/ci/app/manifests/v1", "/v2/ci/app/manifests/" + string(md)} {
				resp, err := http.Get(r.url(p))
				if err != nil || resp.StatusCode != http.StatusNotFound {
					t.Errorf("after the DELETE, replica %d GET %s: %v %v", i, p, err, resp)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
		}
	})

	t.Run("4 sixteen pushes of one digest over the replicas", func(t *testing.T) {
		b := randomBlob(2 << 20)
		d := digest.FromBytes(b)
		var wg sync.WaitGroup
		errs := make([]error, 16)
		for i := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = monolithic(f.replicas[i%3].url(""), fmt.Sprintf("ci/p%d", i%4), d, b)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("push %d: %v", i, err)
			}
		}
		n := 0
		f.shared.Blobs(context.Background(), func(o tier.Object) error {
			if o.Digest == d {
				n++
				if o.Size != int64(len(b)) {
					t.Errorf("the object has %d bytes", o.Size)
				}
			}
			return nil
		})
		if n != 1 {
			t.Errorf("%d objects of the blob in the shared tier, want 1", n)
		}
	})

	t.Run("5 the owner dies mid-fill", func(t *testing.T) {
		b := randomBlob(16 << 20)
		d := f.up.pushBlob(t, "lib/dies", b)
		own := f.owner(string(d))
		f.up.setRate(4 << 20) // four seconds of fill
		var wg sync.WaitGroup
		var complete, cut atomic.Int32
		for i := range 6 {
			r := f.replicas[(own+1+i%2)%3] // the two that do not own it
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := getVerified(r.url("/v2/lib/dies/blobs/"+string(d)), d); err == nil {
					complete.Add(1)
				} else if strings.Contains(err.Error(), "wrong bytes") {
					t.Errorf("a client got wrong bytes: %v", err)
				} else {
					cut.Add(1)
				}
			}()
		}
		time.Sleep(time.Second)
		f.kill(own)
		wg.Wait()
		f.up.setRate(0)
		t.Logf("%d complete, %d cut", complete.Load(), cut.Load())
		// The next request (the owner is gone) succeeds.
		time.Sleep(2500 * time.Millisecond) // the others see it dead
		if _, err := getVerified(f.replicas[(own+1)%3].url("/v2/lib/dies/blobs/"+string(d)), d); err != nil {
			t.Errorf("after the owner died: %v", err)
		}
		if n := f.up.gets(d); n > 2 {
			t.Errorf("%d upstream GETs, want at most 2", n)
		}
		f.start(own)
		f.waitFleet()
	})

	t.Run("6 the shared tier down: hits and fills serve, pushes 503, the queue drains", func(t *testing.T) {
		hit := randomBlob(1 << 20)
		hd := f.up.pushBlob(t, "lib/hit", hit)
		for _, r := range f.replicas {
			if _, err := getVerified(r.url("/v2/lib/hit/blobs/"+string(hd)), hd); err != nil {
				t.Fatal(err)
			}
		}
		f.waitShared(hd)
		f.minio.Stop(t)
		for i, r := range f.replicas {
			if _, err := getVerified(r.url("/v2/lib/hit/blobs/"+string(hd)), hd); err != nil {
				t.Errorf("replica %d, a hit with the shared tier down: %v", i, err)
			}
		}
		fresh := randomBlob(1 << 20)
		fd := f.up.pushBlob(t, "lib/fresh", fresh)
		if _, err := getVerified(f.replicas[0].url("/v2/lib/fresh/blobs/"+string(fd)), fd); err != nil {
			t.Errorf("a fill with the shared tier down: %v", err)
		}
		pb := randomBlob(1000)
		err := monolithic(f.replicas[1].url(""), "ci/down", digest.FromBytes(pb), pb)
		if err == nil || !strings.Contains(err.Error(), "503") {
			t.Errorf("a push with the shared tier down: %v, want a 503", err)
		}
		f.minio.Restart(t)
		f.waitShared(fd) // the queue drains
	})

	t.Run("8 the shared tier is no way to read another repository's blobs", func(t *testing.T) {
		b := randomBlob(1 << 20)
		d := f.up.pushBlob(t, "lib/holder", b)
		if _, err := getVerified(f.replicas[0].url("/v2/lib/holder/blobs/"+string(d)), d); err != nil {
			t.Fatal(err)
		}
		f.waitShared(d)
		for i, r := range f.replicas {
			resp, err := http.Get(r.url("/v2/lib/stranger/blobs/" + string(d)))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("replica %d served a blob under a repository the upstream does not hold it in: %d", i, resp.StatusCode)
			}
		}
	})

	t.Run("7 conformance through a round-robin proxy", func(t *testing.T) {
		var targets []*url.URL
		for _, r := range f.replicas {
			u, _ := url.Parse("http://" + r.addr)
			targets = append(targets, u)
		}
		var next atomic.Uint64
		rp := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(targets[next.Add(1)%uint64(len(targets))])
			pr.Out.Host = pr.In.Host
		}}
		front := httptest.NewServer(rp)
		defer front.Close()
		suite := buildConformance(t)
		c := runConformance(t, suite, []string{
			"OCI_REGISTRY=" + strings.TrimPrefix(front.URL, "http://"),
			"OCI_REPO1=conformance/repo1",
			"OCI_REPO2=conformance/repo2",
		})
		c.check(t, "a fleet of three through a round-robin proxy", true)
	})
}

// fleetImage is an image put at the upstream: its digest and blobs.
type fleetImage struct {
	digest string
	blobs  []digest.Digest
}

func pushImageTo(t *testing.T, host, ref string) fleetImage {
	t.Helper()
	up := &fakeUpstream{host: host}
	d := up.push(t, ref, 256<<10, 2)
	img := pullImageFrom(t, host, ref)
	return fleetImage{digest: d, blobs: img}
}

// pullImageFrom lists the blobs of ref at host.
func pullImageFrom(t *testing.T, host, ref string) []digest.Digest {
	t.Helper()
	repo, tag, _ := strings.Cut(ref, ":")
	req, _ := http.NewRequest("GET", "http://"+host+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Config struct{ Digest digest.Digest }
		Layers []struct{ Digest digest.Digest }
	}
	json.NewDecoder(resp.Body).Decode(&m)
	out := []digest.Digest{m.Config.Digest}
	for _, l := range m.Layers {
		out = append(out, l.Digest)
	}
	return out
}

func waitPulledTag(t *testing.T, shared *tier.Client, ns, repo, tag string) {
	t.Helper()
	for range 300 {
		if _, err := shared.GetPulledTag(context.Background(), ns, repo, tag); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the pulled tag %s:%s never reached the shared tier", repo, tag)
}

// countManifestRequests counts the upstream's manifest requests so far.
func countManifestRequests(f *fleetEnv) int {
	f.up.mu.Lock()
	defer f.up.mu.Unlock()
	return f.up.manifestRequests
}
