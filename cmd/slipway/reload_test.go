package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"
	"golang.org/x/crypto/bcrypt"
)

// SIGHUP reloads users, upstreams and policies, and a renewed certificate
// is served without one, while clients pull all along: each reload in the
// table changes what it must (checked before and after it), a broken file
// changes nothing, no request in flight fails, and a fill that spans every
// reload completes with the right bytes.
func TestReloadUnderLoad(t *testing.T) {
	t.Parallel()
	upA := newCountingUpstream(t)
	upB := newUpstream(t)
	pushTo := func(host, ref string, size, layers int64) (manifest string, blobs []string) {
		img, err := random.Image(size, layers)
		if err != nil {
			t.Fatal(err)
		}
		if err := crane.Push(img, host+"/"+ref, crane.Insecure); err != nil {
			t.Fatal(err)
		}
		d, _ := img.Digest()
		ls, _ := img.Layers()
		for _, l := range ls {
			ld, _ := l.Digest()
			blobs = append(blobs, ld.String())
		}
		return d.String(), blobs
	}
	appDigest, appBlobs := pushTo(upA.host, "lib/app:1", 256<<10, 2)
	pushTo(upA.host, "lib/secret:1", 1024, 1)
	_, bigBlobs := pushTo(upA.host, "lib/big:1", 2<<20, 1)
	toolDigest, _ := pushTo(upB.host, "tools/x:1", 1024, 1)

	dir := t.TempDir()
	certA, keyA, a := testCertSerial(t, 1)
	certB, keyB, b := testCertSerial(t, 2)
	pool := x509.NewCertPool()
	pool.AddCert(a)
	pool.AddCert(b)
	certPath, keyPath := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	copyFile(t, certA, certPath)
	copyFile(t, keyA, keyPath)

	htpasswd := filepath.Join(dir, "htpasswd")
	users := map[string]string{"alice": "alice-pass"}
	writeUsers := func() {
		var b strings.Builder
		for u, p := range users {
			h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&b, "%s:%s\n", u, h)
		}
		writeAtomic(t, htpasswd, b.String())
	}
	writeUsers()
	cfgPath := filepath.Join(dir, "slipway.yaml")
	withB, denySecret, restartOnly := false, false, false
	writeConfig := func() {
		var b strings.Builder
		if restartOnly {
			b.WriteString("upload_ttl: 2h\n")
		}
		fmt.Fprintf(&b, "htpasswd: %s\nanonymous_pull: true\ndefault_upstream: a\nupstreams:\n", htpasswd)
		fmt.Fprintf(&b, "  - name: a\n    url: %s\n", upA.url)
		if denySecret {
			b.WriteString("    policy: {deny: [\"lib/secret\"]}\n")
		}
		if withB {
			fmt.Fprintf(&b, "  - name: b\n    url: %s\n", upB.url)
		}
		writeAtomic(t, cfgPath, b.String())
	}
	writeConfig()

	addr := freeAddr(t)
	base := "https://" + addr
	p := start(t, nil, "serve", "--listen", addr, "--data-dir", t.TempDir(), "--config", cfgPath,
		"--tls-cert", certPath, "--tls-key", keyPath)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	fresh := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true},
		Timeout: 30 * time.Second}
	waitFor(t, "the mirror to answer", func() bool {
		resp, err := client.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	do := func(c *http.Client, method, path, user string, body []byte) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, bytes.NewReader(body))
		if user != "" {
			req.SetBasicAuth(user, user+"-pass")
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	reloads := func(result string) int {
		_, body := do(client, "GET", "/metrics", "", nil)
		return metricValue(body, `slipway_config_reloads_total{result="`+result+`"}`)
	}
	pushBlob := func(user string) int {
		b := []byte("pushed by " + user + " at " + time.Now().String())
		code, _ := do(client, "POST", "/v2/ci/app/blobs/uploads/?digest="+digest.FromBytes(b).String(), user, b)
		return code
	}
	serial := func() int64 {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serial(); s != 1 {
		t.Fatalf("first certificate's serial %d, want 1", s)
	}

	// A fill that spans every reload: its upstream sends half, then waits.
	upA.mu.Lock()
	upA.hold, upA.release = bigBlobs[0], make(chan struct{})
	upA.mu.Unlock()
	type result struct {
		body []byte
		err  error
	}
	inFlight := make(chan result, 1)
	go func() {
		resp, err := client.Get(base + "/v2/lib/big/blobs/" + bigBlobs[0])
		if err != nil {
			inFlight <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		inFlight <- result{b, err}
	}()

	// Load: anonymous pulls of manifests and blobs over kept-alive and
	// fresh connections (each a new handshake) until the table is done.
	var stop atomic.Bool
	var requests, failures atomic.Int64
	var failMu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for w := range 4 {
		c := client
		if w%2 == 1 {
			c = fresh
		}
		wg.Go(func() {
			paths := []string{"/v2/lib/app/manifests/1", "/v2/lib/app/manifests/" + appDigest,
				"/v2/lib/app/blobs/" + appBlobs[0], "/v2/lib/app/blobs/" + appBlobs[1]}
			for i := 0; !stop.Load() && i < 100_000; i++ {
				path := paths[i%len(paths)]
				req, _ := http.NewRequest("GET", base+path, nil)
				req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json")
				resp, err := c.Do(req)
				requests.Add(1)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failures.Add(1)
					failMu.Lock()
					if len(failed) < 10 {
						failed = append(failed, path+": "+err.Error())
					}
					failMu.Unlock()
				}
			}
		})
	}

	successes := 0
	steps := []struct {
		name   string
		before func() string // "" if the change is not there yet
		change func()
		signal bool
		result string // the reload counter that must move
		after  func() string
	}{
		{
			name: "new user",
			before: func() string {
				if code := pushBlob("bob"); code != http.StatusUnauthorized {
					return fmt.Sprintf("bob pushes: %d, want 401", code)
				}
				return ""
			},
			change: func() { users["bob"] = "bob-pass"; writeUsers() },
			signal: true, result: "success",
			after: func() string {
				if code := pushBlob("bob"); code != http.StatusCreated {
					return fmt.Sprintf("bob pushes: %d, want 201", code)
				}
				return ""
			},
		},
		{
			name: "removed user",
			before: func() string {
				if code := pushBlob("alice"); code != http.StatusCreated {
					return fmt.Sprintf("alice pushes: %d, want 201", code)
				}
				return ""
			},
			change: func() { delete(users, "alice"); writeUsers() },
			signal: true, result: "success",
			after: func() string {
				if code := pushBlob("alice"); code != http.StatusUnauthorized {
					return fmt.Sprintf("alice pushes: %d, want 401", code)
				}
				if code := pushBlob("bob"); code != http.StatusCreated {
					return fmt.Sprintf("bob pushes: %d, want 201", code)
				}
				return ""
			},
		},
		{
			name: "new upstream",
			before: func() string {
				if code, _ := do(client, "GET", "/v2/b/tools/x/manifests/1", "", nil); code == http.StatusOK {
					return "upstream b answered before it was configured"
				}
				return ""
			},
			change: func() { withB = true; writeConfig() },
			signal: true, result: "success",
			after: func() string {
				code, body := do(client, "GET", "/v2/b/tools/x/manifests/1", "", nil)
				if code != http.StatusOK || digest.FromString(body).String() != toolDigest {
					return fmt.Sprintf("b/tools/x:1: %d, digest %s, want 200 and %s", code, digest.FromString(body), toolDigest)
				}
				return ""
			},
		},
		{
			name: "new policy rule",
			before: func() string {
				if code, _ := do(client, "GET", "/v2/lib/secret/manifests/1", "", nil); code != http.StatusOK {
					return fmt.Sprintf("lib/secret:1 before the rule: %d, want 200", code)
				}
				return ""
			},
			change: func() { denySecret = true; writeConfig() },
			signal: true, result: "success",
			after: func() string {
				if code, body := do(client, "GET", "/v2/lib/secret/manifests/1", "", nil); code != http.StatusForbidden || !strings.Contains(body, "DENIED") {
					return fmt.Sprintf("lib/secret:1 after the rule: %d %s, want 403 DENIED", code, body)
				}
				if code, _ := do(client, "GET", "/v2/lib/app/manifests/1", "", nil); code != http.StatusOK {
					return fmt.Sprintf("lib/app:1 after the rule: %d, want 200", code)
				}
				return ""
			},
		},
		{
			name:   "renewed certificate, no signal",
			before: func() string { return "" },
			change: func() {
				copyFile(t, keyB, keyPath)
				copyFile(t, certB, certPath)
			},
			result: "success",
			after: func() string {
				if s := serial(); s != 2 {
					return fmt.Sprintf("a new connection gets serial %d, want the renewed certificate's 2", s)
				}
				return ""
			},
		},
		{
			name:   "broken file",
			before: func() string { return "" },
			change: func() { writeAtomic(t, cfgPath, "upstreams: [\n  - name: a\n") },
			signal: true, result: "failure",
			after: func() string {
				_, body := do(client, "GET", "/metrics", "", nil)
				if v := metricValue(body, "slipway_config_last_reload_successful"); v != 0 {
					return fmt.Sprintf("slipway_config_last_reload_successful %d after a broken file, want 0", v)
				}
				if code := pushBlob("bob"); code != http.StatusCreated {
					return fmt.Sprintf("bob pushes after a broken file: %d, want 201", code)
				}
				if code, _ := do(client, "GET", "/v2/b/tools/x/manifests/1", "", nil); code != http.StatusOK {
					return fmt.Sprintf("upstream b after a broken file: %d, want 200", code)
				}
				if code, _ := do(client, "GET", "/v2/lib/secret/manifests/1", "", nil); code != http.StatusForbidden {
					return fmt.Sprintf("the policy after a broken file: %d, want 403", code)
				}
				return ""
			},
		},
		{
			name:   "fixed file, with a setting that needs a restart",
			before: func() string { return "" },
			change: func() { restartOnly = true; writeConfig() },
			signal: true, result: "success",
			after: func() string {
				_, body := do(client, "GET", "/metrics", "", nil)
				if v := metricValue(body, "slipway_config_last_reload_successful"); v != 1 {
					return fmt.Sprintf("slipway_config_last_reload_successful %d, want 1", v)
				}
				if !strings.Contains(p.stderr.String(), "needs a restart; the running value stays\" setting=upload-ttl") {
					return "the changed restart-only setting is not reported"
				}
				return ""
			},
		},
	}
	for _, st := range steps {
		if msg := st.before(); msg != "" {
			t.Fatalf("%s, before: %s", st.name, msg)
		}
		want := reloads(st.result) + 1
		if st.result == "success" {
			successes++
		}
		st.change()
		if st.signal {
			p.cmd.Process.Signal(syscall.SIGHUP)
		}
		waitFor(t, st.name+": the reload", func() bool {
			if !st.signal {
				serial() // a handshake looks at the files
			}
			return reloads(st.result) >= want
		})
		if msg := st.after(); msg != "" {
			t.Errorf("%s: %s", st.name, msg)
		}
	}
	stop.Store(true)
	wg.Wait()

	close(upA.release)
	select {
	case r := <-inFlight:
		if r.err != nil || digest.FromBytes(r.body).String() != bigBlobs[0] {
			t.Errorf("the fill in flight across the reloads: %v, %d bytes, digest %s", r.err, len(r.body), digest.FromBytes(r.body))
		}
	case <-time.After(30 * time.Second):
		t.Error("the fill in flight did not finish")
	}
	if n := failures.Load(); n > 0 {
		t.Errorf("%d of %d requests in flight failed during reloads: %v", n, requests.Load(), failed)
	}
	if got := upA.blobGETs("lib/big"); got != 1 {
		t.Errorf("upstream blob GETs of lib/big: %d, want 1", got)
	}
	t.Logf("%d requests during %d reloads (%d took), 0 failed", requests.Load(), len(steps), successes)
	if !strings.Contains(p.stderr.String(), "reload failed") {
		t.Error("the broken file's reload is not logged")
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// waitFor polls cond every 50 ms for at most 15 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for i := 0; i < 300 && time.Now().Before(deadline); i++ {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("waited 15 s for %s", what)
}

// metricValue reads one sample of the Prometheus text format; -1 if absent.
func metricValue(body, series string) int {
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if ok && name == series {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return int(f)
			}
		}
	}
	return -1
}

// writeAtomic replaces path's contents in one rename, as configuration
// tools and Kubernetes do, so slipway never reads half a file.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, to, string(b))
}
