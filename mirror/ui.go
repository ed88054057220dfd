package mirror

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"slipway/cache"
)

// The status page: server-rendered with html/template from files embedded
// in the binary (mirror/ui), with a small script that polls
// /v2/_slipway/status for the live parts and runs prefetch jobs. Nothing
// is loaded from anywhere but this server. It sits behind the same
// authentication as pulls (authenticate treats its GETs as reads).
//
//	GET /, /_slipway/ui          the page (?q= search, ?cursor= page)
//	GET /_slipway/ui/static/*    its stylesheet, script and icon
//	GET /v2/_slipway/status      the live parts, JSON
//	GET /v2/_slipway/repos       a page of tags, JSON (?q=, ?cursor=, ?n=)
//	POST /v2/_slipway/prefetch/jobs, GET .../jobs/<id>   prefetch jobs (prefetchjobs.go)

//go:embed ui/index.html
var uiIndex string

//go:embed ui/static
var uiStaticFS embed.FS

// uiAsset is an embedded file with its type and a validator.
type uiAsset struct {
	body        []byte
	contentType string
	etag        string
}

var uiAssets = func() map[string]uiAsset {
	types := map[string]string{".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
	out := map[string]uiAsset{}
	err := fs.WalkDir(uiStaticFS, "ui/static", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := uiStaticFS.ReadFile(p)
		if err != nil {
			return err
		}
		ct, ok := types[path.Ext(p)]
		if !ok {
			return fmt.Errorf("mirror/ui: no content type for %s", p)
		}
		sum := sha256.Sum256(b)
		out[strings.TrimPrefix(p, "ui/static/")] = uiAsset{body: b, contentType: ct, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
		return nil
	})
	if err != nil {
		panic(err)
	}
	return out
}()

var uiTemplate = template.Must(template.New("index.html").Funcs(template.FuncMap{
	"bytes":   humanBytes,
	"ago":     ago,
	"rfc3339": func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"pct":     func(r float64) string { return strconv.FormatFloat(r*100, 'f', 1, 64) + " %" },
	"short":   shortDigest,
	"state":   stateText,
	"ratio":   ratioText,
	"rate":    func(r float64) string { return humanBytes(int64(r)) + "/s" },
	"progress": func(n, of int64) string {
		if of < 0 {
			return humanBytes(n) + " of ?"
		}
		return humanBytes(n) + " of " + humanBytes(of)
	},
}).Parse(uiIndex))

// uiCSP allows what the page uses and nothing else: its own script,
// stylesheet, icon and JSON calls. No inline script or style, no frames,
// no other hosts.
const uiCSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

func uiHeaders(c echo.Context) {
	h := c.Response().Header()
	h.Set("Content-Security-Policy", uiCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
}

func (s *Server) uiRoutes(e *echo.Echo) {
	e.GET("/", s.getUI)
	e.GET("/_slipway/ui", s.getUI)
	e.GET("/_slipway/ui/static/*", s.getUIStatic)
	e.GET("/v2/_slipway/status", s.getStatus)
	e.GET("/v2/_slipway/repos", s.getRepos)
	e.POST("/v2/_slipway/prefetch/jobs", s.postPrefetchJob)
	e.GET("/v2/_slipway/prefetch/jobs/:id", s.getPrefetchJob)
}

// uiPolled reports whether path is one an open status page polls every
// second or two (the live state, a prefetch job): its request log lines
// are at debug level, as probes' are.
func uiPolled(path string) bool {
	return path == "/v2/_slipway/status" || strings.HasPrefix(path, "/v2/_slipway/prefetch/jobs/")
}

// uiPage is what the template renders.
type uiPage struct {
	Status      statusBody
	Repos       reposBody
	ReposError  string
	Query       string
	Cursor      string
	CanPrefetch bool
	User        string
}

// getUI renders the status page.
func (s *Server) getUI(c echo.Context) error {
	uiHeaders(c)
	c.Response().Header().Set("Cache-Control", "no-store")
	p := uiPage{Status: s.status(), Query: c.QueryParam("q"), Cursor: c.QueryParam("cursor"),
		CanPrefetch: s.mayPull(c)}
	p.User = requestOf(c).user
	status := http.StatusOK
	var oe *ociError
	repos, err := s.repos(c)
	switch {
	case err == nil:
		p.Repos = repos
	case errors.As(err, &oe):
		status, p.ReposError = oe.code.status, oe.message
		p.Repos = reposBody{Rows: []repoRow{}}
	default:
		return err
	}
	var buf bytes.Buffer
	if err := uiTemplate.Execute(&buf, p); err != nil {
		return err
	}
	return c.HTMLBlob(status, buf.Bytes())
}

// getUIStatic serves the page's embedded assets.
func (s *Server) getUIStatic(c echo.Context) error {
	a, ok := uiAssets[c.Param("*")]
	if !ok {
		return errRouteUnknown
	}
	uiHeaders(c)
	h := c.Response().Header()
	h.Set(echo.HeaderContentType, a.contentType)
	h.Set("ETag", a.etag)
	h.Set("Cache-Control", "no-cache") // revalidated: a new binary may bring new ones
	http.ServeContent(c.Response(), c.Request(), "", time.Time{}, bytes.NewReader(a.body))
	return nil
}

// mayPull reports whether the client may pull: the page shows the
// prefetch form (a prefetch is a pull) only then.
func (s *Server) mayPull(c echo.Context) bool {
	a := s.routing.Load().auth
	return a == nil || requestOf(c).hasUser || a.anonymousPull
}

// A page of tags, as GET /v2/_slipway/repos answers it and the page
// shows it.
type reposBody struct {
	Rows    []repoRow `json:"rows"`
	Next    string    `json:"next,omitempty"`
	Partial bool      `json:"partial,omitempty"` // the page stopped at its bound on work; Next goes on
	Scanned int       `json:"scanned"`
	Search  string    `json:"search,omitempty"`
}

type repoRow struct {
	// Upstream is the upstream's name; "" for a pushed (local) repository.
	Upstream  string    `json:"upstream"`
	Repo      string    `json:"repo"`
	Tag       string    `json:"tag"`
	Digest    string    `json:"digest"`
	MediaType string    `json:"media_type,omitempty"`
	Pushed    bool      `json:"pushed"`
	Stored    bool      `json:"stored"` // false: the manifest was evicted; the next pull fetches it
	Size      int64     `json:"size"`
	FetchedAt time.Time `json:"fetched_at,omitzero"`
	LastUse   time.Time `json:"last_use,omitzero"`
}

// Bounds of a repository query from a client.
const maxSearch = 256

// repos reads ?q=, ?cursor= and ?n= and lists that page.
func (s *Server) repos(c echo.Context) (reposBody, error) {
	q := cache.TagQuery{Search: c.QueryParam("q"), After: c.QueryParam("cursor")}
	if len(q.Search) > maxSearch {
		return reposBody{}, newError(codeAdminInvalid, fmt.Sprintf("search: at most %d bytes", maxSearch))
	}
	if n := c.QueryParam("n"); n != "" {
		v, err := strconv.Atoi(n)
		if err != nil || v < 1 || v > cache.MaxTagPage {
			return reposBody{}, newError(codePaginationInvalid, fmt.Sprintf("n: want a number from 1 to %d", cache.MaxTagPage))
		}
		q.Limit = v
	}
	page, err := s.store.TagPage(q)
	if errors.Is(err, cache.ErrBadCursor) {
		return reposBody{}, newError(codeAdminInvalid, "cursor: not one this server gave; start again from the first page")
	}
	if err != nil {
		return reposBody{}, err
	}
	names := hostNames(s.routing.Load())
	b := reposBody{Rows: make([]repoRow, 0, len(page.Rows)), Next: page.Next, Partial: page.Partial,
		Scanned: page.Scanned, Search: q.Search}
	for _, r := range page.Rows {
		row := repoRow{Repo: r.Repo, Tag: r.Tag, Digest: string(r.Digest), MediaType: r.MediaType, Pushed: r.NS == "",
			Stored: r.Stored, Size: r.Size, FetchedAt: r.FetchedAt, LastUse: r.LastUse}
		if r.NS != "" {
			if row.Upstream = names[r.NS]; row.Upstream == "" {
				row.Upstream = r.NS // an upstream no longer configured
			}
		}
		b.Rows = append(b.Rows, row)
	}
	return b, nil
}

// getRepos answers a page of tags as JSON.
func (s *Server) getRepos(c echo.Context) error {
	uiHeaders(c)
	b, err := s.repos(c)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, b)
}

// humanBytes writes n with a binary unit.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	f, i := float64(n)/unit, 0
	for f >= unit && i < 5 {
		f /= unit
		i++
	}
	return strconv.FormatFloat(f, 'f', 1, 64) + " " + []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}[i]
}

// ago says how long before the page was rendered t was, or "never".
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "in " + (-d).Round(time.Second).String()
	case d < time.Minute:
		return strconv.Itoa(int(d.Seconds())) + " s ago"
	case d < time.Hour:
		return strconv.Itoa(int(d.Minutes())) + " min ago"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d.Hours())) + " h ago"
	}
	return strconv.Itoa(int(d.Hours()/24)) + " days ago"
}

func shortDigest(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return hex[:12]
	}
	return d
}

func stateText(s string) string {
	switch s {
	case "ok":
		return "OK"
	case "failing":
		return "Failing"
	case "rate_limited":
		return "Rate limited"
	}
	return "Not used yet"
}

func ratioText(r hitRatio) string {
	if r.Ratio == nil {
		return "no requests"
	}
	return fmt.Sprintf("%.1f %% (%d of %d)", *r.Ratio*100, r.Hits, r.Total)
}
