package mirror

import (
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"slipway/cache"
)

// Admin endpoints of the cache lifecycle, under /v2/_slipway/ (a name the
// distribution grammar cannot produce, so no repository shadows them). They
// answer JSON, and go through the same authentication as everything else.
// The ones that remove content (gc, verify) need a user whose pushes are
// not limited; without authentication, an operator who said so
// (Config.OpenAdmin), or they are refused.

func (s *Server) adminRoutes(e *echo.Echo) {
	e.GET("/v2/_slipway/stats", s.getStats)
	e.POST("/v2/_slipway/verify", s.postVerify, s.destructive)
	e.POST("/v2/_slipway/gc", s.postGC, s.destructive)
}

// destructive refuses calls that remove content when nobody authenticates
// clients and the operator did not open them to everyone.
func (s *Server) destructive(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if s.routing.Load().auth == nil && !s.openAdmin {
			return newError(codeDenied, "maintenance calls that remove content need --htpasswd (or --open-admin, to let anyone who can reach the mirror call them)")
		}
		return next(c)
	}
}

type statsBody struct {
	cache.Stats
	// Eviction is what the next eviction pass would do: nothing under the
	// high mark, else the last pass's plan (see cache.Store.EvictPlan).
	Eviction cache.EvictReport `json:"eviction"`
}

// getStats reports the cache's size, entries, hit ratio and what eviction
// would do now. Both are running totals or the last plan: it reads no
// index, and never waits for an eviction pass.
func (s *Server) getStats(c echo.Context) error {
	return c.JSON(http.StatusOK, statsBody{Stats: s.store.Stats(), Eviction: s.store.EvictPlan()})
}

// postVerify re-hashes every blob (?quick=1: presence and size only) and
// takes the bad ones out of the index. It answers when it is done: 200 with
// "ok": true, or 200 with the problems it found and dealt with.
func (s *Server) postVerify(c echo.Context) error {
	quick, _ := strconv.ParseBool(c.QueryParam("quick"))
	r, err := s.store.Verify(c.Request().Context(), cache.VerifyOptions{Quick: quick})
	if err != nil {
		return err
	}
	if !r.OK() {
		s.log.Error("verify found problems", "problems", len(r.Problems), "blobs", r.Blobs, "bytes", r.Bytes)
	}
	return c.JSON(http.StatusOK, struct {
		OK bool `json:"ok"`
		cache.VerifyReport
	}{r.OK(), r})
}

// postGC removes blobs no manifest references any more (?dry_run=1: only
// report them; ?grace=1h: override the grace period).
func (s *Server) postGC(c echo.Context) error {
	dry, _ := strconv.ParseBool(c.QueryParam("dry_run"))
	var grace time.Duration
	if g := c.QueryParam("grace"); g != "" {
		d, err := time.ParseDuration(g)
		if err != nil || d <= 0 {
			return newError(codeAdminInvalid, "grace: want a positive duration such as 1h")
		}
		grace = d
	}
	o := cache.GCOptions{DryRun: dry, Grace: grace}
	r, err := s.store.GC(o)
	if err != nil {
		return err
	}
	if s.store.Shared() == nil {
		return c.JSON(http.StatusOK, r)
	}
	// In a fleet, the shared tier too, if no other replica is at it.
	sr, err := s.store.SharedGC(c.Request().Context(), o)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, struct {
		cache.GCReport
		Shared cache.SharedGCReport `json:"shared"`
	}{r, sr})
}
