package mirror

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/labstack/echo/v4"
	"golang.org/x/crypto/bcrypt"
)

// Auth checks clients' Basic credentials against an htpasswd file and
// decides who may pull and push. Reads may be anonymous (Docker's daemon
// mirror sends no credentials); writes always need a user, and a user's
// writes may be limited to repository prefixes.
type Auth struct {
	hashes        map[string][]byte   // user -> bcrypt hash
	push          map[string][]string // user -> prefixes; absent: any repository
	anonymousPull bool
	// dummy is compared against for unknown users, so an answer takes as
	// long whether or not the user exists. Its cost is the highest of the
	// file's (htpasswd -B uses 5, not bcrypt.DefaultCost's 10): a cheaper or
	// dearer dummy would itself tell unknown users apart.
	dummy []byte
	now   func() time.Time // time.Now; tests move it

	// verified remembers passwords checked in the last verifiedFor, at most
	// maxVerified of them, least recently used first out: a burst of
	// logins pushes out old pairs one at a time, not the ones in use.
	mu       sync.Mutex
	verified *simplelru.LRU[[32]byte, time.Time] // sha256(user, password) -> until
}

// AuthConfig configures Auth.
type AuthConfig struct {
	// Htpasswd is the contents of an htpasswd file with bcrypt entries
	// (htpasswd -B). Other hash kinds are refused.
	Htpasswd io.Reader
	// Push limits users' writes to repository prefixes ("ci" allows "ci"
	// and "ci/..."; "*" allows all). A user not listed may write anywhere;
	// an empty list makes the user read only.
	Push map[string][]string
	// AnonymousPull lets clients without credentials pull.
	AnonymousPull bool
}

// verifiedFor is how long a checked password is remembered, so a pull of
// many blobs costs one bcrypt comparison, not one per request.
const verifiedFor = 5 * time.Minute

// maxVerified bounds the remembered passwords.
const maxVerified = 4096

// NewAuth parses the htpasswd contents.
func NewAuth(c AuthConfig) (*Auth, error) {
	verified, err := simplelru.NewLRU[[32]byte, time.Time](maxVerified, nil)
	if err != nil {
		return nil, err
	}
	a := &Auth{hashes: map[string][]byte{}, push: map[string][]string{}, anonymousPull: c.AnonymousPull,
		now: time.Now, verified: verified}
	sc := bufio.NewScanner(c.Htpasswd)
	maxCost := bcrypt.MinCost
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("htpasswd line %d: want user:hash", n)
		}
		cost, err := bcrypt.Cost([]byte(hash))
		if err != nil {
			return nil, fmt.Errorf("htpasswd line %d (user %q): not a bcrypt hash (create it with htpasswd -B)", n, user)
		}
		maxCost = max(maxCost, cost)
		a.hashes[user] = []byte(hash)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("htpasswd: %w", err)
	}
	dummy, err := bcrypt.GenerateFromPassword([]byte("slipway-no-such-user"), maxCost)
	if err != nil {
		return nil, err
	}
	a.dummy = dummy
	for user, prefixes := range c.Push {
		if _, ok := a.hashes[user]; !ok {
			return nil, fmt.Errorf("users: %q is not in the htpasswd file", user)
		}
		ps := []string{}
		for _, p := range prefixes {
			if p = strings.Trim(p, "/ "); p != "" {
				ps = append(ps, p)
			}
		}
		a.push[user] = ps
	}
	return a, nil
}

// LoadAuth reads an htpasswd file.
func LoadAuth(path string, push map[string][]string, anonymousPull bool) (*Auth, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return NewAuth(AuthConfig{Htpasswd: f, Push: push, AnonymousPull: anonymousPull})
}

// Users is the number of users in the htpasswd file.
func (a *Auth) Users() int { return len(a.hashes) }

// check reports whether user's password is right. It always runs one
// bcrypt comparison unless this pair was verified recently.
func (a *Auth) check(user, pass string) bool {
	key := sha256.Sum256([]byte(user + "\x00" + pass))
	now := a.now()
	a.mu.Lock()
	until, ok := a.verified.Get(key)
	if ok && !now.Before(until) {
		a.verified.Remove(key)
	}
	a.mu.Unlock()
	if ok && now.Before(until) {
		return true
	}
	hash, known := a.hashes[user]
	if !known {
		hash = a.dummy
	}
	if bcrypt.CompareHashAndPassword(hash, []byte(pass)) != nil || !known {
		return false
	}
	a.mu.Lock()
	a.verified.Add(key, now.Add(verifiedFor))
	a.mu.Unlock()
	return true
}

// mayPush reports whether user may write to repository name.
func (a *Auth) mayPush(user, name string) bool {
	prefixes, limited := a.push[user]
	if !limited {
		return true
	}
	for _, p := range prefixes {
		if p == "*" || name == p || strings.HasPrefix(name, p+"/") {
			return true
		}
	}
	return false
}

var errAuthRequired = &ociError{code: codeUnauthorized, message: "authentication required",
	header: http.Header{"Www-Authenticate": {`Basic realm="slipway"`}}}

var errAuthFailed = &ociError{code: codeUnauthorized, message: "wrong user name or password",
	header: http.Header{"Www-Authenticate": {`Basic realm="slipway"`}}}

// publicPaths need no login: probes and scrapers carry no credentials.
// Everything else is checked, whatever its shape (default deny).
var publicPaths = map[string]bool{"/healthz": true, "/readyz": true, "/metrics": true}

// authenticate checks a request to /v2/ (nil: serve it): credentials, if
// sent, must be right; /v2/ itself always asks for them (so docker login
// checks the password); reads without credentials pass if anonymous pulls
// are allowed; writes need a user whose prefixes cover the repository; the
// admin POSTs (verify, gc) need a user whose pushes are not limited.
// Prefetch counts as a pull: it stores nothing a pull could not.
func (s *Server) authenticate(c echo.Context) error {
	a := s.routing.Load().auth
	req := c.Request()
	if a == nil || publicPaths[req.URL.Path] {
		return nil
	}
	user, pass, hasCreds := req.BasicAuth()
	if hasCreds {
		if !a.check(user, pass) {
			return errAuthFailed
		}
		rq := requestOf(c)
		rq.user, rq.hasUser = user, true
	}
	base := req.URL.Path == "/v2" || req.URL.Path == "/v2/"
	write := !base && req.Method != http.MethodGet && req.Method != http.MethodHead &&
		!strings.HasPrefix(req.URL.Path, "/v2/_slipway/prefetch")
	switch {
	case !hasCreds && (base || write || !a.anonymousPull):
		return errAuthRequired
	case write && strings.HasPrefix(req.URL.Path, "/v2/_slipway/"):
		// verify, gc: for users whose pushes are not limited.
		if _, limited := a.push[user]; limited {
			return newError(codeDenied, fmt.Sprintf("user %q may not run maintenance (its pushes are limited to prefixes)", user))
		}
	case write:
		r, err := parseRoute(req.URL.Path)
		if err != nil {
			return err
		}
		if !a.mayPush(user, r.name) {
			return newError(codeDenied, fmt.Sprintf("user %q may not push to %q", user, r.name))
		}
	}
	return nil
}
