// Package mirror is slipway's HTTP front: the /v2/ API, path parsing, OCI
// error bodies, and the choice of "local repository or which upstream". It
// is the only package that imports echo; handlers stay thin and call into
// upstream (pull-through) and cache.
package mirror

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// Upstream is one proxied registry and the names clients may use for it.
type Upstream struct {
	Proxy *upstream.Proxy
	// Name is what the status page calls it; "": its host.
	Name string
	// Names are the hosts and aliases that select this upstream in ?ns= or
	// as the first path segment ("docker.io", "hub", "ghcr.io").
	Names []string
	// DockerHub makes one-word repository names official images
	// ("alpine" -> "library/alpine").
	DockerHub bool
	// Policy decides which of its repositories and tags may be pulled
	// through; nil: all.
	Policy *upstream.Policy
}

// Config wires a Server.
type Config struct {
	Store     *cache.Store
	Upstreams []Upstream
	// Default is the index in Upstreams of the upstream for names without
	// a prefix or ?ns=.
	Default int
	Logger  *slog.Logger
	// Push serves local repositories and takes pushes (unless it is read
	// only); nil: no local repositories at all.
	Push *push.Manager
	// Auth checks client credentials; nil: no authentication.
	Auth *Auth
	// OpenAdmin lets anyone call the admin calls that remove content (gc,
	// verify) when Auth is nil; otherwise they are refused.
	OpenAdmin bool
	// Fleet, if set, is this replica's fleet: upload sessions of other
	// replicas are forwarded to them, and PeerHandler serves the peers.
	Fleet *upstream.Fleet
	// Fills, if set, is read for the fills-in-flight gauge.
	Fills *upstream.Filler
	// StoreStats, if set, is read at scrape time for disk, eviction and
	// upload gauges.
	StoreStats func() StoreStats
	// Observer, if set, is the one the Filler and the upstream clients
	// report to; its histograms are served with the rest. Nil: a new one
	// (the fill and upstream histograms stay empty).
	Observer *Observer
}

// Server is the registry front.
type Server struct {
	e         *echo.Echo
	store     *cache.Store
	routing   atomic.Pointer[routing]
	push      *push.Manager
	log       *slog.Logger
	openAdmin bool
	fleet     *upstream.Fleet
	fills     *upstream.Filler
	metrics   *metrics
	draining  atomic.Bool
	counters  statusCounters // the status page's hit ratio and stale answers
	jobs      *prefetchJobs
}

// routing is what a reload replaces in one step: the upstreams with their
// policies, the names that select them, the default, and the users. A
// request reads it once where it decides, so it never sees half of a
// reload; requests in flight finish with what they started with.
type routing struct {
	upstreams []Upstream
	byName    map[string]*Upstream
	def       *Upstream
	auth      *Auth
}

func newRouting(ups []Upstream, def int, auth *Auth) (*routing, error) {
	rt := &routing{upstreams: ups, byName: map[string]*Upstream{}, auth: auth}
	for i := range rt.upstreams {
		u := &rt.upstreams[i]
		names := append([]string{u.Proxy.Upstream().Host()}, u.Names...)
		if u.DockerHub {
			names = append(names, dockerHubNames...)
		}
		for _, n := range names {
			n = strings.ToLower(n)
			if other, dup := rt.byName[n]; dup && other != u {
				return nil, fmt.Errorf("mirror: upstream name %q is used twice", n)
			}
			rt.byName[n] = u
		}
	}
	if len(rt.upstreams) > 0 {
		if def < 0 || def >= len(rt.upstreams) {
			return nil, fmt.Errorf("mirror: default upstream %d out of range", def)
		}
		rt.def = &rt.upstreams[def]
	}
	return rt, nil
}

// Reload replaces the upstreams, their pull-through policies, the default
// and the users at once. Nothing changes if they do not fit together.
// Requests and fills in flight are not disturbed: a fill belongs to the
// filler, not to an upstream's entry here.
func (s *Server) Reload(ups []Upstream, def int, auth *Auth) error {
	rt, err := newRouting(ups, def, auth)
	if err != nil {
		return err
	}
	s.routing.Store(rt)
	return nil
}

// NoteReload counts a reload of the configuration, failed (err) or not,
// for slipway_config_reloads_total and the last-reload gauges.
func (s *Server) NoteReload(err error) { s.metrics.noteReload(err) }

// request is the echo.Context a request is served with (echo's "custom
// context"), holding what its handlers leave for its log line, its metrics
// and the error handler. logRequest makes it: values in echo's own store
// cost a map for every request and an allocation each.
type request struct {
	echo.Context
	route     route
	hasRoute  bool
	target    target // where the name resolved to, for the log
	hasTarget bool
	src       upstream.Source // how a proxied request was answered
	hasSrc    bool
	user      string // who authenticated
	hasUser   bool
	err       error // what the error handler answered, or why a response was cut
}

// requestOf is c's request: c itself when logRequest made it. A context
// that did not come through logRequest (echo hands the error handler its
// own when the middleware fails) gets one of its own, kept by nobody.
func requestOf(c echo.Context) *request {
	if rq, ok := c.(*request); ok {
		return rq
	}
	return &request{Context: c}
}

// New builds the server.
func New(cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Store == nil {
		return nil, errors.New("mirror: no store")
	}
	s := &Server{store: cfg.Store, push: cfg.Push, log: cfg.Logger, openAdmin: cfg.OpenAdmin,
		fleet: cfg.Fleet, fills: cfg.Fills, jobs: newPrefetchJobs()}
	if err := s.Reload(cfg.Upstreams, cfg.Default, cfg.Auth); err != nil {
		return nil, err
	}
	s.metrics = newMetrics(s, cfg.Fills, cfg.StoreStats, cfg.Observer)

	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.handleError
	e.Use(s.front)
	e.GET("/healthz", s.getHealthz)
	e.GET("/readyz", s.getReadyz)
	e.GET("/metrics", echo.WrapHandler(s.metrics.handler()))
	e.POST("/v2/_slipway/prefetch", s.postPrefetch)
	s.adminRoutes(e)
	s.uiRoutes(e)
	e.GET("/v2", s.getBase)
	e.HEAD("/v2", s.getBase)
	e.GET("/v2/", s.getBase)
	e.HEAD("/v2/", s.getBase)
	e.Any("/v2/*", s.dispatch)
	s.e = e
	return s, nil
}

// dockerHubNames all name Docker Hub.
var dockerHubNames = []string{"docker.io", "index.docker.io", "registry-1.docker.io"}

// Handler is the server's http.Handler.
func (s *Server) Handler() http.Handler { return s.e }

// MetricsHandler serves /metrics alone, for a separate listener.
func (s *Server) MetricsHandler() http.Handler { return s.metrics.handler() }

// getBase answers the API version check.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#determining-support
func (s *Server) getBase(c echo.Context) error {
	c.Response().Header().Set(echo.HeaderContentType, echo.MIMEApplicationJSON)
	return c.String(http.StatusOK, "{}")
}

// dispatch parses the path from its tail and calls the handler for the
// route and method.
func (s *Server) dispatch(c echo.Context) error {
	r, err := parseRoute(c.Request().URL.Path)
	if err != nil {
		return err
	}
	rq := requestOf(c)
	rq.route, rq.hasRoute = r, true
	m := c.Request().Method
	if b := c.Request().Body; b != nil && b != http.NoBody {
		c.Request().Body = bodyReader{b}
	}
	switch r.kind {
	case routeBase:
		if m == http.MethodGet || m == http.MethodHead {
			return s.getBase(c)
		}
	case routeManifest:
		switch m {
		case http.MethodGet:
			return s.getManifest(c, r)
		case http.MethodHead:
			return s.headManifest(c, r)
		case http.MethodPut:
			return s.putManifest(c, r)
		case http.MethodDelete:
			return s.deleteManifest(c, r)
		}
	case routeBlob:
		switch m {
		case http.MethodGet:
			return s.getBlob(c, r)
		case http.MethodHead:
			return s.headBlob(c, r)
		case http.MethodDelete:
			return s.deleteBlob(c, r)
		}
	case routeUploads:
		if m == http.MethodPost {
			return s.postUpload(c, r)
		}
	case routeUpload:
		if s.fleet != nil && !upstream.IsHop(c.Request().Context()) {
			if owner, _, _ := strings.Cut(r.upload, "."); owner != s.fleet.ID() {
				return s.forwardUpload(c, owner)
			}
		}
		switch m {
		case http.MethodGet:
			return s.getUpload(c, r)
		case http.MethodPatch:
			return s.patchUpload(c, r)
		case http.MethodPut:
			return s.putUpload(c, r)
		case http.MethodDelete:
			return s.deleteUpload(c, r)
		}
	case routeTags:
		if m == http.MethodGet {
			return s.getTags(c, r)
		}
	case routeReferrers:
		if m == http.MethodGet {
			return s.getReferrers(c, r)
		}
	case routeCatalog:
		if m == http.MethodGet {
			return s.getCatalog(c, r)
		}
	}
	return errMethod
}

// target is what a repository name resolves to.
type target struct {
	up    *Upstream
	repo  string // repository name on the upstream, or the local name
	local bool   // a local (pushed) repository: served from the store only
}

// resolve maps the route's name (and ?ns=) to an upstream repository:
// ?ns=<host> names the upstream; else a first path segment that names a
// configured upstream selects it; else a local repository, if the name
// matches a push prefix or was pushed to; else the default upstream. Hosts
// that are not configured are never contacted. A proxied repository must
// pass its upstream's pull-through policy, whatever spelling of the name
// brought it here. Where it went is noted for the request's log line.
func (s *Server) resolve(c echo.Context, r route) (target, error) {
	t, err := s.resolveNS(nsParam(c), r.name)
	if err != nil {
		return t, err
	}
	rq := requestOf(c)
	rq.target, rq.hasTarget = t, true
	tag := ""
	if r.kind == routeManifest && r.digest == "" {
		tag = r.ref
	}
	return t, s.permit(t, tag)
}

// nsParam is the request's ?ns=, "" without one. A request with no query
// has none: echo's QueryParam would parse the empty query into a map.
func nsParam(c echo.Context) string {
	if c.Request().URL.RawQuery == "" {
		return ""
	}
	return c.QueryParam("ns")
}

// permit applies t's pull-through policy: to repo:tag, or with tag empty
// to what no tag names (a digest, a blob, referrers, the tag list).
func (s *Server) permit(t target, tag string) error {
	if t.local || t.up.Policy == nil {
		return nil
	}
	p, host := t.up.Policy, t.up.Proxy.Upstream().Host()
	what := t.repo
	ok := p.AllowsRepo(t.repo)
	if tag != "" {
		what, ok = t.repo+":"+tag, p.Allows(t.repo, tag)
	}
	if ok {
		return nil
	}
	s.metrics.denied.WithLabelValues(host).Inc()
	return newError(codeDenied, fmt.Sprintf("%s of %s is not pulled through this mirror (its pull-through policy)", what, host))
}

// resolveNS is resolve with the ?ns= value given.
func (s *Server) resolveNS(ns, name string) (target, error) {
	rt := s.routing.Load()
	if ns != "" {
		u, ok := rt.byName[strings.ToLower(ns)]
		if !ok {
			// 404 lets containerd fall back to its next host.
			return target{}, newError(codeNameUnknown, fmt.Sprintf("upstream %q is not configured on this mirror", ns))
		}
		return s.targetOf(u, name)
	}
	if first, rest, ok := strings.Cut(name, "/"); ok {
		if u, ok := rt.byName[first]; ok {
			return s.targetOf(u, rest)
		}
	}
	if s.push != nil {
		if s.push.Claims(name) || rt.def == nil {
			return target{repo: name, local: true}, nil
		}
		local, err := s.push.Exists(name)
		if err != nil {
			return target{}, err
		}
		if local {
			return target{repo: name, local: true}, nil
		}
	}
	if rt.def == nil {
		return target{}, newError(codeNameUnknown, "no upstream is configured for this name")
	}
	return s.targetOf(rt.def, name)
}

func (s *Server) targetOf(u *Upstream, repo string) (target, error) {
	if u.DockerHub && !strings.Contains(repo, "/") {
		repo = "library/" + repo
	}
	if err := validateName(repo); err != nil {
		return target{}, err
	}
	return target{up: u, repo: repo}, nil
}

// front is the middleware of every route. Echo builds the chain anew for
// each request, so it is one closure rather than one per step: a panic
// becomes a 500 (recoverPanic), then logRequest serves the request through
// serveAPI (the API version header, authentication) and writes its log
// line and metrics.
func (s *Server) front(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) (err error) {
		defer recoverPanic(&err)
		s.logRequest(c, next)
		return nil
	}
}

// recoverPanic, deferred, turns a handler panic into a 500 OCI error (in
// *err) instead of a dropped connection. http.ErrAbortHandler passes
// through: it is how a handler cuts a connection on purpose.
func recoverPanic(err *error) {
	if p := recover(); p != nil {
		if p == http.ErrAbortHandler {
			panic(p)
		}
		*err = fmt.Errorf("panic: %v", p)
	}
}

// apiVersion is the header every answer carries. Its value is shared by
// every response: net/http copies the header map when it writes it, and
// nothing appends to it in place (its capacity is its length).
var apiVersion = []string{"registry/2.0"}

// serveAPI sets the API version header, authenticates, and serves.
func (s *Server) serveAPI(c echo.Context, next echo.HandlerFunc) error {
	c.Response().Header()["Docker-Distribution-Api-Version"] = apiVersion
	if err := s.authenticate(c); err != nil {
		return err
	}
	return next(c)
}

// newRequestID is 16 random hex digits. It names a request in the logs and
// guards nothing, so it comes from math/rand/v2 (ChaCha8, seeded by the
// runtime), not crypto/rand: a tenth of a warm manifest GET went to
// crypto/rand's DRBG.
func newRequestID() string {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], rand.Uint64())
	return hex.EncodeToString(b[:])
}

// logRequest serves a request with its own context (request), answers its
// error, counts it in the metrics and writes one line for it: the line's
// attributes are built only if its level is logged.
func (s *Server) logRequest(ec echo.Context, next echo.HandlerFunc) {
	start := time.Now()
	rq := &request{Context: ec}
	c := echo.Context(rq)
	req := c.Request()
	id := req.Header.Get(echo.HeaderXRequestID)
	if id == "" || len(id) > 64 {
		id = newRequestID()
	}
	c.Response().Header()["X-Request-Id"] = []string{id}
	aborted := true
	defer func() {
		if !aborted {
			return
		}
		// A handler cut the connection (http.ErrAbortHandler).
		s.log.Warn("request aborted", "request_id", id, "method", req.Method,
			"path", req.URL.Path, "bytes", c.Response().Size, "dur", time.Since(start))
	}()
	if err := s.serveAPI(c, next); err != nil {
		s.handleError(err, c) // not c.Error: it hands echo's own context on
	}
	aborted = false
	dur := time.Since(start)
	rl := routeLabel(c, rq)
	s.metrics.observe(c, rq, rl, dur)
	s.counters.observe(rq, rl)
	status := c.Response().Status
	level := slog.LevelInfo
	if quiet := req.URL.Path; (publicPaths[quiet] || uiPolled(quiet)) && status == http.StatusOK {
		level = slog.LevelDebug // probes, scrapes and status pages, every few seconds
	}
	if rq.err != nil {
		switch {
		case status >= 500:
			level = slog.LevelError
		case status == http.StatusRequestTimeout:
			level = slog.LevelWarn // a client that stalled: worth seeing, not an alarm
		}
	}
	if !s.log.Enabled(req.Context(), level) {
		return
	}
	// slog.Attr values, not key-value pairs: no value is boxed.
	var buf [14]slog.Attr
	attrs := append(buf[:0], slog.String("request_id", id), slog.String("method", req.Method), slog.String("path", req.URL.Path))
	if q := req.URL.RawQuery; q != "" {
		attrs = append(attrs, slog.String("query", q[:min(len(q), 256)]))
	}
	attrs = append(attrs, slog.String("route", rl), slog.Int("status", status), slog.Int64("bytes", c.Response().Size),
		slog.Duration("dur", dur))
	if t := rq.target; rq.hasTarget {
		up := "local"
		if !t.local {
			up = t.up.Proxy.Upstream().Host()
		}
		attrs = append(attrs, slog.String("upstream", up), slog.String("repo", t.repo))
	}
	if rq.hasSrc {
		attrs = append(attrs, slog.String("cache", string(rq.src)))
	}
	if rq.hasUser {
		attrs = append(attrs, slog.String("user", rq.user))
	}
	if rq.err != nil {
		attrs = append(attrs, slog.String("err", rq.err.Error()))
	}
	s.log.LogAttrs(req.Context(), level, "request", attrs...)
}
