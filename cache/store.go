// Package cache is slipway's content-addressed store: blob files on disk, a
// badger index of blobs, manifests, tags and repository links, and the
// per-digest guard that makes concurrent writers of one digest (fills and
// pushes, in any mix) leave exactly one file and one index entry.
package cache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"

	_ "crypto/sha256" // digest algorithms the store accepts
	_ "crypto/sha512"
)

// Sentinel errors. Callers match them with errors.Is.
var (
	ErrNotFound       = errors.New("cache: not found")
	ErrDigestMismatch = errors.New("cache: content does not match digest")
	ErrSizeMismatch   = errors.New("cache: content does not match size")
	ErrClosed         = errors.New("cache: store is closed")
	ErrCanceled       = errors.New("cache: write canceled")
)

// Options tune a Store. The zero value is usable.
type Options struct {
	Logger *slog.Logger
	// GCInterval is how often badger's value log is garbage collected.
	// Default 10 minutes.
	GCInterval time.Duration
	// Now is the clock; tests inject one. Default time.Now.
	Now func() time.Time
}

// Store is the content-addressed store. It is safe for concurrent use.
type Store struct {
	dir   string
	db    *badger.DB
	log   *slog.Logger
	now   func() time.Time
	locks keyedMutex

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Open opens (creating if needed) the store in dir.
func Open(dir string, opt Options) (*Store, error) {
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.GCInterval <= 0 {
		opt.GCInterval = 10 * time.Minute
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	for _, sub := range []string{"blobs", "tmp", "index"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	bo := badger.DefaultOptions(filepath.Join(dir, "index")).
		WithLogger(badgerLogger{opt.Logger}).
		// An acknowledged push or fill must survive a crash of the machine,
		// not only of the process.
		WithSyncWrites(true).
		// Keep the index's memory small: blobs are on disk, the index holds
		// only keys, small values and manifests.
		WithMemTableSize(16 << 20).
		WithNumMemtables(2).
		WithBlockCacheSize(32 << 20).
		WithIndexCacheSize(16 << 20).
		WithNumCompactors(2).
		WithValueLogFileSize(256 << 20).
		WithMetricsEnabled(false)
	db, err := badger.Open(bo)
	if err != nil {
		return nil, fmt.Errorf("cache: open index: %w", err)
	}
	s := &Store{dir: dir, db: db, log: opt.Logger, now: opt.Now, stop: make(chan struct{})}
	s.wg.Add(1)
	go s.gcLoop(opt.GCInterval)
	return s, nil
}

// Close stops the maintenance loop and closes the index. It is safe to call
// more than once; later calls return the first call's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.wg.Wait()
		s.closeErr = s.db.Close()
	})
	return s.closeErr
}

// Dir is the data directory.
func (s *Store) Dir() string { return s.dir }

// gcLoop runs badger's value-log GC until Close.
func (s *Store) gcLoop(every time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			// Each successful run rewrites one file; stop at the first
			// "nothing to do" (or any error) and wait for the next tick.
			for i := 0; i < 16; i++ {
				select {
				case <-s.stop:
					return
				default:
				}
				if s.db.RunValueLogGC(0.5) != nil {
					break
				}
			}
		}
	}
}

func (s *Store) blobPath(d digest.Digest) string {
	hex := d.Encoded()
	return filepath.Join(s.dir, "blobs", string(d.Algorithm()), hex[:2], hex)
}

func (s *Store) tmpDir() string { return filepath.Join(s.dir, "tmp") }

// get reads one key's value; a missing key is ErrNotFound.
func (s *Store) get(key []byte) ([]byte, error) {
	var v []byte
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		v, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, ErrClosed
	}
	return v, err
}

func (s *Store) set(key, value []byte) error {
	err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, value) })
	if errors.Is(err, badger.ErrDBClosed) {
		return ErrClosed
	}
	return err
}

func (s *Store) exists(key []byte) (bool, error) {
	err := s.db.View(func(txn *badger.Txn) error {
		_, err := txn.Get(key)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	return err == nil, err
}

// Ping reports whether the index is open and usable.
func (s *Store) Ping(ctx context.Context) error {
	_, err := s.exists([]byte{0})
	return err
}

type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any) {
	b.l.Error(trim(fmt.Sprintf(f, a...)), "component", "badger")
}
func (b badgerLogger) Warningf(f string, a ...any) {
	b.l.Warn(trim(fmt.Sprintf(f, a...)), "component", "badger")
}
func (b badgerLogger) Infof(f string, a ...any) {
	b.l.Debug(trim(fmt.Sprintf(f, a...)), "component", "badger")
}
func (b badgerLogger) Debugf(f string, a ...any) {
	b.l.Debug(trim(fmt.Sprintf(f, a...)), "component", "badger")
}

func trim(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == ' ') {
		s = s[:len(s)-1]
	}
	return s
}
