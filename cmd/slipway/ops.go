package main

import (
	"errors"
	"log/slog"

	"github.com/google/go-containerregistry/pkg/logs"

	"slipway/cache"
	"slipway/mirror"
)

// routeGGCRLogs sends go-containerregistry's loggers (package globals of
// *log.Logger, off by default) through slog: warnings as warnings, progress
// and debug at debug level. Called once, by serve.
func routeGGCRLogs(log *slog.Logger) {
	logs.Warn = slog.NewLogLogger(log.With("component", "ggcr").Handler(), slog.LevelWarn)
	logs.Progress = slog.NewLogLogger(log.With("component", "ggcr").Handler(), slog.LevelDebug)
	logs.Debug = slog.NewLogLogger(log.With("component", "ggcr").Handler(), slog.LevelDebug)
}

// loadAuth reads --htpasswd and the config file's users section; nil when
// there is no htpasswd file (no authentication).
func loadAuth(c *serveConfig) (*mirror.Auth, error) {
	push := map[string][]string{}
	if c.file != nil {
		for user, u := range c.file.Users {
			push[user] = u.Push
		}
	}
	if c.htpasswd == "" {
		if len(push) > 0 {
			return nil, errors.New("config: users needs --htpasswd")
		}
		return nil, nil
	}
	return mirror.LoadAuth(c.htpasswd, push, c.anonymousPull)
}

// storeStats feeds the disk and eviction gauges from the store's running
// totals, and the open uploads gauge from a count of their keys.
func storeStats(s *cache.Store) func() mirror.StoreStats {
	return func() mirror.StoreStats {
		st := s.Stats()
		uploads := int64(-1) // unknown: the gauge is left out
		if n, err := s.UploadsOpen(); err == nil {
			uploads = int64(n)
		}
		return mirror.StoreStats{DiskBytes: st.Bytes, Evictions: uint64(st.Evicted), UploadsOpen: uploads,
			MaxBytes: st.MaxSize, HighWatermarkBytes: st.HighWatermark, LowWatermarkBytes: st.LowWatermark}
	}
}
