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

// TestCrashRecovery kills slipway with SIGKILL at random moments while
// clients pull (fills) and push, at least 50 times. After each kill the
// data directory must verify clean once reopened, every blob that had been
// acknowledged (a 201 for a push, a complete 200 for a pull) must be stored,
// every acknowledged push must still be served, and no client ever got a
// complete 200 with wrong bytes.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	const iterations = 50
	bin := plainBinary(t)
	up, upURL := newSlowBlobs(t, 400, 48<<10)
	dir := t.TempDir()
	var mu sync.Mutex
	pushed := map[digest.Digest][]byte{} // acknowledged pushes, all iterations
	checked := map[digest.Digest]bool{}  // served after a restart already
	var pulled []digest.Digest           // acknowledged pulls, this iteration
	start := time.Now()
	next := 0
	var kills, acks, partial int
	for it := range iterations {
		if time.Since(start) > 60*time.Second {
			t.Fatalf("only %d iterations in %s", it, time.Since(start))
		}
		addr := freeAddr(t)
		p := start2(t, bin, addr, upURL, dir)
		// What was pushed before the last kill is served, and a sample
		// of what was pushed before the earlier ones.
		check := map[digest.Digest][]byte{}
		for d, b := range pushed {
			if !checked[d] || len(check) < 20 {
				check[d] = b
			}
		}
		for d, b := range check {
			checked[d] = true
			resp, err := http.Get("http://" + addr + "/v2/local/crash/blobs/" + string(d))
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || err != nil || !bytes.Equal(got, b) {
				t.Fatalf("iteration %d: acknowledged push %s: status %d, %d bytes, %v", it, d, resp.StatusCode, len(got), err)
			}
		}

		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		pulled = pulled[:0]
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				client := &http.Client{Timeout: 5 * time.Second}
				for i := 0; ctx.Err() == nil; i++ {
					if (w+i)%2 == 0 {
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
							pulled = append(pulled, d)
							acks++
						}
						mu.Unlock()
						continue
					}
					b := make([]byte, 16<<10+mrand.IntN(32<<10))
					rand.Read(b)
					if pushOnce(ctx, client, addr, b) {
						mu.Lock()
						pushed[digest.FromBytes(b)] = b
						acks++
						mu.Unlock()
					}
				}
			}()
		}
		time.Sleep(time.Duration(20+mrand.IntN(120)) * time.Millisecond)
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		kills++
		cancel()
		wg.Wait()
		if partial > 0 {
			t.Fatalf("iteration %d: a client got a complete 200 with wrong bytes", it)
		}

		// Every acknowledged blob has its file: a restart keeps it (an
		// entry missing is adopted, since the file verifies).
		mu.Lock()
		for _, d := range append(append([]digest.Digest{}, pulled...), keys(pushed)...) {
			if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded())); err != nil {
				t.Fatalf("iteration %d: acknowledged blob %s lost: %v", it, d, err)
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
	t.Logf("%d kills, %d acknowledged requests, %d pushes kept, %s", kills, acks, len(pushed), time.Since(start).Round(time.Millisecond))
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
		"--log-level", "error", "--push-prefix", "local")
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
