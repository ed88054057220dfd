package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// slowBlobs is an upstream that serves a fixed set of blobs, each in small
// pieces with a pause between them, so a kill lands in the middle of fills.
type slowBlobs struct {
	blobs map[digest.Digest][]byte
	order []digest.Digest
}

func newSlowBlobs(t *testing.T, n, size int) (*slowBlobs, string) {
	u := &slowBlobs{blobs: map[digest.Digest][]byte{}}
	for range n {
		b := make([]byte, size)
		rand.Read(b)
		d := digest.FromBytes(b)
		u.blobs[d] = b
		u.order = append(u.order, d)
	}
	srv := httptest.NewServer(u)
	t.Cleanup(srv.Close)
	return u, srv.URL
}

func (u *slowBlobs) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v2/" {
		w.WriteHeader(200)
		return
	}
	i := strings.LastIndex(r.URL.Path, "/blobs/")
	if i < 0 {
		http.NotFound(w, r)
		return
	}
	b, ok := u.blobs[digest.Digest(r.URL.Path[i+len("/blobs/"):])]
	if !ok {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Length", fmt.Sprint(len(b)))
	w.Header().Set("Docker-Content-Digest", string(digest.FromBytes(b)))
	w.WriteHeader(200)
	if r.Method == http.MethodHead {
		return
	}
	for off := 0; off < len(b); off += 8 << 10 {
		if _, err := w.Write(b[off:min(off+8<<10, len(b))]); err != nil {
			return
		}
		w.(http.Flusher).Flush()
		time.Sleep(time.Millisecond)
	}
}

// crashImage is an image a push acknowledged: its manifest and blobs.
type crashImage struct {
	manifest []byte
	blobs    map[digest.Digest][]byte
}

// TestCrashRecovery kills slipway with SIGKILL at random moments while
// clients pull (fills), push images (blobs, then a manifest) and delete
// some, and while GC (with a grace of a few hundred milliseconds) and
// eviction (on a budget far under what is pulled) run, at least 50 times.
// After each kill the data directory must verify clean once reopened,
// every image that had been acknowledged (a 201 for its manifest) and not
// deleted must still be served whole, and no client ever got a complete
// 200 with wrong bytes.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	const iterations = 50
	bin := plainBinary(t)
	up, upURL := newSlowBlobs(t, 400, 48<<10)
	dir := t.TempDir()
	var mu sync.Mutex
	pushed := map[digest.Digest]crashImage{} // acknowledged, not deleted: all iterations
	checked := map[digest.Digest]bool{}      // served after a restart already
	start := time.Now()
	next := 0
	var kills, acks, partial, deletes, gcs int
	for it := range iterations {
		if time.Since(start) > 90*time.Second {
			t.Fatalf("only %d iterations in %s", it, time.Since(start))
		}
		addr := freeAddr(t)
		p := start2(t, bin, addr, upURL, dir)
		// What was pushed before the last kill is served, and a sample
		// of what was pushed before the earlier ones.
		check := map[digest.Digest]crashImage{}
		for d, img := range pushed {
			if !checked[d] || len(check) < 20 {
				check[d] = img
			}
		}
		for d, img := range check {
			checked[d] = true
			if err := pullImage(addr, d, img); err != nil {
				t.Fatalf("iteration %d: acknowledged image %s: %v", it, d, err)
			}
		}

		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for w := range 5 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				client := &http.Client{Timeout: 5 * time.Second}
				for i := 0; ctx.Err() == nil; i++ {
					switch {
					case w == 4: // maintenance: GC now and then, eviction runs by itself
						time.Sleep(time.Duration(5+mrand.IntN(20)) * time.Millisecond)
						req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+addr+"/v2/_slipway/gc?grace=300ms", nil)
						if resp, err := client.Do(req); err == nil {
							resp.Body.Close()
							mu.Lock()
							gcs++
							mu.Unlock()
						}
					case (w+i)%3 == 0:
						mu.Lock()
						d := up.order[next%len(up.order)]
						next++
						mu.Unlock()
						ok, bad := pullOnce(ctx, client, addr, d)
						mu.Lock()
						if bad {
							partial++
						}
						if ok {
							acks++
						}
						mu.Unlock()
					case (w+i)%7 == 1:
						// Delete an acknowledged image: from here on it
						// may be gone, whether the 202 arrives or not.
						mu.Lock()
						var d digest.Digest
						for d = range pushed {
							break
						}
						delete(pushed, d)
						mu.Unlock()
						if d != "" {
							req, _ := http.NewRequestWithContext(ctx, "DELETE", "http://"+addr+"/v2/local/crash/manifests/"+string(d), nil)
							if resp, err := client.Do(req); err == nil {
								resp.Body.Close()
								mu.Lock()
								deletes++
								mu.Unlock()
							}
						}
					default:
						if d, img, ok := pushImageOnce(ctx, client, addr); ok {
							mu.Lock()
							pushed[d] = img
							acks++
							mu.Unlock()
						}
					}
				}
			}()
		}
		time.Sleep(time.Duration(20+mrand.IntN(200)) * time.Millisecond)
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		kills++
		cancel()
		wg.Wait()
		if partial > 0 {
			t.Fatalf("iteration %d: a client got a complete 200 with wrong bytes", it)
		}

		// Every blob of an acknowledged image has its file: a restart
		// keeps it (an entry missing is adopted, since the file
		// verifies).
		mu.Lock()
		for _, img := range pushed {
			for d := range img.blobs {
				if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded())); err != nil {
					t.Fatalf("iteration %d: blob %s of an acknowledged image lost: %v", it, d, err)
				}
			}
		}
		mu.Unlock()
		s, err := cache.Open(dir, cache.Options{GCEvery: -1})
		if err != nil {
			t.Fatalf("iteration %d: reopen: %v", it, err)
		}
		r, err := s.Verify(context.Background(), cache.VerifyOptions{})
		s.Close()
		if err != nil || !r.OK() {
			t.Fatalf("iteration %d: verify after the kill: %+v %v", it, r.Problems, err)
		}
	}
	if gcs == 0 || deletes == 0 {
		t.Errorf("%d GC passes and %d deletes ran: the crashes did not cover them", gcs, deletes)
	}
	t.Logf("%d kills, %d acknowledged requests, %d deletes, %d GC passes, %d images kept, %s",
		kills, acks, deletes, gcs, len(pushed), time.Since(start).Round(time.Millisecond))
}

// pullImage GETs manifest d of local/crash and every blob of img.
func pullImage(addr string, d digest.Digest, img crashImage) error {
	get := func(path string) ([]byte, error) {
		resp, err := http.Get("http://" + addr + "/v2/local/crash/" + path)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || err != nil {
			return nil, fmt.Errorf("GET %s: status %d, %v", path, resp.StatusCode, err)
		}
		return b, nil
	}
	b, err := get("manifests/" + string(d))
	if err != nil {
		return err
	}
	if !bytes.Equal(b, img.manifest) {
		return fmt.Errorf("manifest %s: other bytes", d)
	}
	for bd, want := range img.blobs {
		b, err := get("blobs/" + string(bd))
		if err != nil {
			return err
		}
		if !bytes.Equal(b, want) {
			return fmt.Errorf("blob %s: %d wrong bytes", bd, len(b))
		}
	}
	return nil
}

// pushImageOnce pushes a config and a layer to local/crash, then a
// manifest of them by digest; ok is its 201.
func pushImageOnce(ctx context.Context, c *http.Client, addr string) (digest.Digest, crashImage, bool) {
	config := []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","n":%d}`, mrand.Uint64()))
	layer := make([]byte, 16<<10+mrand.IntN(32<<10))
	rand.Read(layer)
	img := crashImage{blobs: map[digest.Digest][]byte{digest.FromBytes(config): config, digest.FromBytes(layer): layer}}
	for _, b := range [][]byte{config, layer} {
		if !pushOnce(ctx, c, addr, b) {
			return "", img, false
		}
	}
	img.manifest = []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},`+
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":%d}]}`,
		digest.FromBytes(config), len(config), digest.FromBytes(layer), len(layer)))
	d := digest.FromBytes(img.manifest)
	req, _ := http.NewRequestWithContext(ctx, "PUT", "http://"+addr+"/v2/local/crash/manifests/"+string(d), bytes.NewReader(img.manifest))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	resp, err := c.Do(req)
	if err != nil {
		return "", img, false
	}
	resp.Body.Close()
	return d, img, resp.StatusCode == http.StatusCreated
}

func keys(m map[digest.Digest][]byte) []digest.Digest {
	var out []digest.Digest
	for d := range m {
		out = append(out, d)
	}
	return out
}

// plainBinary builds slipway without -race for the crash test: a race
// binary takes a second to start, fifty times over, and what is tested here
// is what a kill leaves on disk (the race-built binary runs in every other
// end-to-end test).
func plainBinary(t *testing.T) string {
	t.Helper()
	if !raceEnabled() {
		return binPath
	}
	bin := filepath.Join(t.TempDir(), "slipway-norace")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-buildvcs=false", "-o", bin, ".")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("build: %v", err)
	}
	return bin
}

func start2(t *testing.T, bin, addr, upURL, dir string) *proc {
	t.Helper()
	p := startCmd(t, nil, bin, "serve", "--listen", addr, "--upstream", upURL, "--data-dir", dir,
		"--log-level", "error", "--push-prefix", "local",
		// Eviction and GC run during the crashes: a budget of a few pulls,
		// and GC calls with a short grace.
		"--max-size", "2MB", "--low-watermark", "0.5", "--open-admin", "--gc-min-grace", "0")
	p.waitReady(t, addr)
	return p
}

// pullOnce GETs blob d: ok when a complete 200 arrived, bad when it was
// complete but had the wrong bytes.
func pullOnce(ctx context.Context, c *http.Client, addr string, d digest.Digest) (ok, bad bool) {
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/v2/lib/app/blobs/"+string(d), nil)
	resp, err := c.Do(req)
	if err != nil {
		return false, false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || err != nil || int64(len(b)) != resp.ContentLength {
		return false, false
	}
	if digest.FromBytes(b) != d {
		return false, true
	}
	return true, false
}

// pushOnce pushes b to local/crash, by a single POST or POST then PUT; it
// reports a 201.
func pushOnce(ctx context.Context, c *http.Client, addr string, b []byte) bool {
	d := digest.FromBytes(b)
	base := "http://" + addr + "/v2/local/crash/blobs/uploads/"
	if len(b)%2 == 0 {
		req, _ := http.NewRequestWithContext(ctx, "POST", base+"?digest="+string(d), bytes.NewReader(b))
		resp, err := c.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusCreated
	}
	req, _ := http.NewRequestWithContext(ctx, "POST", base, nil)
	resp, err := c.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || loc == "" {
		return false
	}
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + addr + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ = http.NewRequestWithContext(ctx, "PUT", loc+sep+"digest="+string(d), bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = c.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusCreated
}
