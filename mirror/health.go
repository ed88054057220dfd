package mirror

import (
	"context"
	"net/http"
	"os"
	"time"

	"github.com/labstack/echo/v4"
)

// Drain marks the server as shutting down: /readyz answers 503 from now
// on, so load balancers stop sending new clients while responses in flight
// finish. Call it before http.Server.Shutdown.
func (s *Server) Drain() { s.draining.Store(true) }

// getHealthz answers 200 while the process runs.
func (s *Server) getHealthz(c echo.Context) error {
	return c.String(http.StatusOK, "ok\n")
}

// getReadyz answers 200 when the server can take traffic: the index is
// open, the data directory is writable, and it is not shutting down.
// Otherwise 503 with the reason.
func (s *Server) getReadyz(c echo.Context) error {
	if err := s.ready(c.Request().Context()); err != nil {
		return c.String(http.StatusServiceUnavailable, "not ready: "+err.Error()+"\n")
	}
	return c.String(http.StatusOK, "ready\n")
}

type notReady string

func (e notReady) Error() string { return string(e) }

func (s *Server) ready(ctx context.Context) error {
	if s.draining.Load() {
		return notReady("shutting down")
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		return notReady("index: " + err.Error())
	}
	f, err := os.CreateTemp(s.store.Dir(), ".readyz-*")
	if err != nil {
		return notReady("data directory is not writable: " + err.Error())
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}
