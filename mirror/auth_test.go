package mirror

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"golang.org/x/crypto/bcrypt"
)

// htpasswd builds an htpasswd file as htpasswd -B writes it.
func htpasswd(t *testing.T, users map[string]string) string {
	t.Helper()
	var b strings.Builder
	for u, p := range users {
		h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s:%s\n", u, h)
	}
	return b.String()
}

func newAuthEnv(t *testing.T, anonymousPull bool) *opsEnv {
	t.Helper()
	a, err := NewAuth(AuthConfig{
		Htpasswd:      strings.NewReader("# comment\n" + htpasswd(t, map[string]string{"ci": "ci-secret", "admin": "admin-secret", "reader": "r"})),
		Push:          map[string][]string{"ci": {"ci/"}, "reader": {}},
		AnonymousPull: anonymousPull,
	})
	if err != nil {
		t.Fatal(err)
	}
	return newOpsEnv(t, func(c *Config) { c.Auth = a })
}

func req(t *testing.T, method, url, user, pass string) *http.Response {
	t.Helper()
	r, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		r.SetBasicAuth(user, pass)
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	return resp
}

// The auth matrix: anonymous pulls allowed or not, writes need a user with
// the right password and a prefix that covers the repository, and /v2/
// always asks (so docker login checks the password).
func TestAuthMatrix(t *testing.T) {
	for _, anon := range []bool{true, false} {
		t.Run(fmt.Sprintf("anonymous-pull=%v", anon), func(t *testing.T) {
			e := newAuthEnv(t, anon)
			img, _ := random.Image(1024, 1)
			e.up.pushImageTo(t, img, "team/app:v1")
			pullDenied := http.StatusOK
			if !anon {
				pullDenied = http.StatusUnauthorized
			}
			manifest := e.url("/v2/up/team/app/manifests/v1")
			upload := func(repo string) string { return e.url("/v2/" + repo + "/blobs/uploads/") }
			for _, c := range []struct {
				name, method, url, user, pass string
				want                          int
			}{
				{"base without credentials asks for them", "GET", e.url("/v2/"), "", "", 401},
				{"base, right password (docker login)", "GET", e.url("/v2/"), "ci", "ci-secret", 200},
				{"base, wrong password", "GET", e.url("/v2/"), "ci", "nope", 401},
				{"base, unknown user", "GET", e.url("/v2/"), "mallory", "ci-secret", 401},
				{"anonymous pull", "GET", manifest, "", "", pullDenied},
				{"anonymous HEAD", "HEAD", manifest, "", "", pullDenied},
				{"pull with a user", "GET", manifest, "reader", "r", 200},
				{"pull with a wrong password", "GET", manifest, "reader", "x", 401},
				{"anonymous push", "POST", upload("ci/app"), "", "", 401},
				{"push with a wrong password", "POST", upload("ci/app"), "ci", "wrong", 401},
				{"push under the user's prefix", "POST", upload("ci/app"), "ci", "ci-secret", 202},
				{"push outside the user's prefix", "POST", upload("team/other"), "ci", "ci-secret", 403},
				{"read-only user pushes", "POST", upload("ci/app"), "reader", "r", 403},
				{"unlimited user pushes anywhere", "POST", upload("team/other"), "admin", "admin-secret", 202},
				{"maintenance without a user", "POST", e.url("/v2/_slipway/gc?dry_run=true"), "", "", 401},
				{"maintenance by a limited user", "POST", e.url("/v2/_slipway/gc?dry_run=true"), "ci", "ci-secret", 403},
				{"prefetch is a pull", "POST", e.url("/v2/_slipway/prefetch"), "", "", map[bool]int{true: 400, false: 401}[anon]},
				{"an odd path is no way around it", "POST", e.url("//v2/ci/app/blobs/uploads/"), "", "", 401},
				{"health needs no login", "GET", e.url("/healthz"), "", "", 200},
				{"metrics need no login", "GET", e.url("/metrics"), "", "", 200},
			} {
				resp := req(t, c.method, c.url, c.user, c.pass)
				if resp.StatusCode != c.want {
					body, _ := io.ReadAll(resp.Body)
					t.Errorf("%s: %s %s: %s %s, want %d", c.name, c.method, c.url, resp.Status, body, c.want)
				}
				if resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") != `Basic realm="slipway"` {
					t.Errorf("%s: 401 with WWW-Authenticate %q", c.name, resp.Header.Get("WWW-Authenticate"))
				}
			}
			expectError(t, "POST", upload("team/app"), nil, 401, "UNAUTHORIZED")
		})
	}
}

// crane pushes and pulls with credentials through the Basic challenge, as
// docker does after docker login.
func TestAuthCranePushPull(t *testing.T) {
	e := newAuthEnv(t, false)
	img, _ := random.Image(4096, 2)
	ci := crane.WithAuth(&authn.Basic{Username: "ci", Password: "ci-secret"})
	if err := crane.Push(img, e.host+"/ci/app:v1", ci); err != nil {
		t.Fatalf("push as ci: %v", err)
	}
	if err := crane.Push(img, e.host+"/team/app:v1", ci); err == nil || !strings.Contains(err.Error(), "DENIED") {
		t.Errorf("push as ci outside its prefix: %v, want DENIED", err)
	}
	if _, err := crane.Pull(e.host + "/ci/app:v1"); err == nil {
		t.Error("anonymous pull with --anonymous-pull=false worked")
	}
	got, err := crane.Pull(e.host+"/ci/app:v1", ci)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if d, _ := got.Digest(); d != want {
		t.Errorf("pulled %s, want %s", d, want)
	}
}

func TestAuthBadHtpasswd(t *testing.T) {
	for _, f := range []string{"ci:{SHA}abc=\n", "ci:$apr1$x$y\n", "nocolon\n", ":$2y$05$abc\n"} {
		if _, err := NewAuth(AuthConfig{Htpasswd: strings.NewReader(f)}); err == nil {
			t.Errorf("htpasswd %q accepted", f)
		}
	}
	if _, err := NewAuth(AuthConfig{Htpasswd: strings.NewReader(htpasswd(t, map[string]string{"a": "b"})),
		Push: map[string][]string{"ghost": {"x"}}}); err == nil {
		t.Error("users entry for a user not in htpasswd accepted")
	}
}

// An unknown user costs a bcrypt comparison too: the answer takes about as
// long as a wrong password, so timing does not tell who exists.
func TestAuthUnknownUserTiming(t *testing.T) {
	// htpasswd -B's cost, 5: the dummy gets the same.
	h, _ := bcrypt.GenerateFromPassword([]byte("x"), 5)
	a, err := NewAuth(AuthConfig{Htpasswd: bytes.NewReader([]byte("ci:" + string(h) + "\n"))})
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := bcrypt.Cost(a.dummy); c != 5 {
		t.Errorf("dummy hash cost %d, want the file's 5", c)
	}
	timeIt := func(user string) time.Duration {
		best := time.Hour
		for range 5 {
			start := time.Now()
			if a.check(user, "wrong") {
				t.Fatal("wrong password accepted")
			}
			best = min(best, time.Since(start))
		}
		return best
	}
	known, unknown := timeIt("ci"), timeIt("mallory")
	if unknown < known/2 {
		t.Errorf("unknown user answered in %v, a known one in %v: timing tells them apart", unknown, known)
	}
}

// A checked password is remembered for verifiedFor, never longer, and a
// flood of other remembered logins, far past the limit, keeps the cache at
// its limit without pushing out the ones in use. "Remembered" shows as a
// right answer after the file's hash changed under it.
func TestAuthRemembersPasswordsBounded(t *testing.T) {
	a, err := NewAuth(AuthConfig{Htpasswd: strings.NewReader(htpasswd(t, map[string]string{"ci": "ci-secret", "ops": "ops-secret"}))})
	if err != nil {
		t.Fatal(err)
	}
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	a.now = func() time.Time { return time.Unix(0, clock.Load()) }
	for u, p := range map[string]string{"ci": "ci-secret", "ops": "ops-secret"} {
		if !a.check(u, p) {
			t.Fatalf("%s: right password refused", u)
		}
	}
	// From now on only the memory can say yes to these passwords.
	other, _ := bcrypt.GenerateFromPassword([]byte("changed"), bcrypt.MinCost)
	a.hashes["ci"], a.hashes["ops"] = other, other

	for i := range 3 * maxVerified {
		a.mu.Lock()
		a.verified.Add(sha256.Sum256(fmt.Appendf(nil, "user%d\x00pass", i)), a.now().Add(verifiedFor))
		n := a.verified.Len()
		a.mu.Unlock()
		if n > maxVerified {
			t.Fatalf("after %d logins: %d remembered, limit %d", i+1, n, maxVerified)
		}
		if i%(maxVerified/4) == 0 && !a.check("ci", "ci-secret") {
			t.Fatalf("after %d other logins: ci, in use all along, was forgotten", i+1)
		}
	}
	if !a.check("ci", "ci-secret") {
		t.Error("ci, in use all along, was forgotten by the flood")
	}
	if a.check("ops", "ops-secret") {
		t.Error("ops, not used during the flood, is still remembered past the limit")
	}
	clock.Add(int64(verifiedFor - time.Second))
	if !a.check("ci", "ci-secret") {
		t.Error("a password forgotten before verifiedFor")
	}
	clock.Add(int64(time.Second))
	if a.check("ci", "ci-secret") {
		t.Error("a password remembered past verifiedFor")
	}
	if !a.check("ci", "changed") {
		t.Error("the new password is refused")
	}
}

func TestAuthCheckConcurrent(t *testing.T) {
	a, err := NewAuth(AuthConfig{Htpasswd: strings.NewReader(htpasswd(t, map[string]string{"ci": "ci-secret", "ops": "ops-secret"}))})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 200 {
				user, pass := "ci", "ci-secret"
				if (w+i)%2 == 1 {
					user, pass = "ops", "ops-secret"
				}
				if !a.check(user, pass) {
					t.Errorf("%s refused", user)
					return
				}
				if i%50 == 0 && a.check(user, "wrong") {
					t.Errorf("%s: wrong password accepted", user)
					return
				}
			}
		})
	}
	wg.Wait()
}
