// Package push is slipway's local push target: upload sessions (single
// POST, POST+PUT, PATCH chunks with Content-Range, status, cancel, cross-repo
// mount), manifest PUT validation, and reads, listings and deletes of local
// repositories. Every finished upload is committed through cache's per-digest
// guard, the same one fills use.
//
// push knows nothing of HTTP: it returns the sentinel errors below, wrapped
// with %w, and the front maps them to OCI codes.
package push

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"slipway/cache"
)

// Sentinel errors. Callers match them with errors.Is.
var (
	ErrUploadUnknown       = errors.New("push: blob upload unknown")
	ErrRangeInvalid        = errors.New("push: chunk does not continue the upload")
	ErrSizeInvalid         = errors.New("push: content length does not match")
	ErrDigestInvalid       = errors.New("push: content does not match digest")
	ErrManifestInvalid     = errors.New("push: manifest invalid")
	ErrManifestTooLarge    = errors.New("push: manifest too large")
	ErrManifestBlobUnknown = errors.New("push: manifest references content this repository does not have")
	ErrManifestUnknown     = errors.New("push: manifest unknown")
	ErrBlobUnknown         = errors.New("push: blob unknown")
	// ErrBlobNotHere: the repository holds the blob, but this replica of a
	// fleet has no copy; the shared tier has it.
	ErrBlobNotHere = errors.New("push: blob not on this replica")
	ErrNameUnknown = errors.New("push: repository unknown")
	ErrDenied      = errors.New("push: denied")
)

// MaxManifestSize caps a pushed manifest.
const MaxManifestSize = 4 << 20

// Config wires a Manager.
type Config struct {
	Store  *cache.Store
	Logger *slog.Logger
	// Prefixes, if any, are the only repository names that may be pushed
	// to ("ci" allows "ci" and "ci/..."); those names are always local.
	Prefixes []string
	// ReadOnly refuses every write; local repositories are still served.
	ReadOnly bool
	// UploadTTL is how long an upload may sit unused before it is reaped.
	// Default 24 hours.
	UploadTTL time.Duration
	// ReapInterval is how often abandoned uploads are looked for. Default
	// UploadTTL/4, at most 10 minutes.
	ReapInterval time.Duration
}

// Manager is the push target. It is safe for concurrent use.
type Manager struct {
	store    *cache.Store
	log      *slog.Logger
	prefixes []string
	readOnly bool
	ttl      time.Duration

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// New returns a Manager and starts its reaper of abandoned uploads.
func New(cfg Config) (*Manager, error) {
	if cfg.Store == nil {
		return nil, errors.New("push: no store")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.UploadTTL <= 0 {
		cfg.UploadTTL = 24 * time.Hour
	}
	if cfg.ReapInterval <= 0 {
		cfg.ReapInterval = min(cfg.UploadTTL/4, 10*time.Minute)
	}
	m := &Manager{store: cfg.Store, log: cfg.Logger, ttl: cfg.UploadTTL, readOnly: cfg.ReadOnly, stop: make(chan struct{})}
	for _, p := range cfg.Prefixes {
		if p = strings.Trim(p, "/ "); p != "" {
			m.prefixes = append(m.prefixes, p)
		}
	}
	m.wg.Add(1)
	go m.reapLoop(cfg.ReapInterval)
	return m, nil
}

// Close stops the reaper. Uploads in progress stay resumable.
func (m *Manager) Close() {
	m.closeOnce.Do(func() {
		close(m.stop)
		m.wg.Wait()
	})
}

func (m *Manager) reapLoop(every time.Duration) {
	defer m.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.Reap()
		}
	}
}

// Reap removes the files of uploads unused for longer than the upload TTL
// (their state expired in the index by then).
func (m *Manager) Reap() int {
	n, err := m.store.ReapUploads(m.ttl)
	if err != nil && !errors.Is(err, cache.ErrClosed) {
		m.log.Warn("reaping abandoned uploads", "err", err)
	}
	if n > 0 {
		m.log.Info(fmt.Sprintf("reaped %d abandoned uploads", n))
	}
	return n
}

// Claims reports whether push prefixes are configured and name matches one:
// such a name is always a local repository, never proxied.
func (m *Manager) Claims(name string) bool {
	return len(m.prefixes) > 0 && m.matches(name)
}

// Permits reports whether name may be pushed to: the Manager is not read
// only, and no prefixes are configured or name matches one.
func (m *Manager) Permits(name string) bool {
	return !m.readOnly && (len(m.prefixes) == 0 || m.matches(name))
}

// ReadOnly reports whether every write is refused.
func (m *Manager) ReadOnly() bool { return m.readOnly }

func (m *Manager) matches(name string) bool {
	for _, p := range m.prefixes {
		if name == p || strings.HasPrefix(name, p+"/") {
			return true
		}
	}
	return false
}

// Exists reports whether local repository name exists.
func (m *Manager) Exists(name string) (bool, error) {
	return m.store.RepositoryExists(name)
}
