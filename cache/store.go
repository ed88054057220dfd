// Package cache is slipway's content-addressed store: blob files on disk, a
// badger index of blobs, manifests, tags and repository links, and the
// per-digest guard that makes concurrent writers of one digest (fills and
// pushes, in any mix) leave exactly one file and one index entry.
package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"

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
	// ErrNoSpace is a write that failed because the disk is full. The
	// write's temp file is gone, the index is untouched, and an eviction
	// pass has been asked for.
	ErrNoSpace = errors.New("cache: no space left on device")
	// ErrBadManifest is a manifest whose JSON or digests cannot be read.
	ErrBadManifest = errors.New("cache: manifest cannot be parsed")
	// ErrBadMediaType is a media type that is not one, or too long.
	ErrBadMediaType = errors.New("cache: invalid media type")
	// ErrRefUnknown is a manifest put into a local repository that does
	// not hold one of the blobs or manifests the manifest holds.
	ErrRefUnknown = errors.New("cache: the repository does not hold a referenced blob or manifest")
	// ErrRefSize is a manifest that gives a referenced blob or manifest a
	// size other than the stored one.
	ErrRefSize = errors.New("cache: a referenced blob or manifest has another size")
	// ErrGraceTooShort is a GC grace under Options.MinGCGrace.
	ErrGraceTooShort = errors.New("cache: GC grace is under the minimum")
)

// Options tune a Store. The zero value is usable.
type Options struct {
	Logger *slog.Logger
	// GCInterval is how often badger's value log is garbage collected.
	// Default 10 minutes.
	GCInterval time.Duration
	// Now is the clock; tests inject one. Default time.Now.
	Now func() time.Time

	// MaxSize is the budget for blob bytes; 0: no budget, nothing is
	// evicted. When the blobs pass HighWatermark*MaxSize, the least
	// recently used pulled blobs are evicted down to LowWatermark*MaxSize.
	MaxSize int64
	// LowWatermark and HighWatermark are fractions of MaxSize. Defaults
	// 0.90 and 0.95.
	LowWatermark, HighWatermark float64
	// Pins are never evicted (nor is pushed content).
	Pins []Pin
	// GCGrace is how long a blob or manifest nothing references is kept
	// after its last use before GC removes it (a push sends layers before
	// their manifest). Default 24h.
	GCGrace time.Duration
	// MinGCGrace is the shortest grace a GC pass may use (GCGrace and
	// GCOptions.Grace below it are refused): a short grace removes the
	// layers of pushes whose manifest has not arrived yet. Default 1h;
	// negative: no minimum (tests).
	MinGCGrace time.Duration
	// GCEvery is how often the unreferenced-blob GC runs; default 1 hour,
	// negative: never (slipway gc, or Store.GC, still work).
	GCEvery time.Duration
	// MaintenanceInterval is how often access times are flushed and the
	// budget is checked. Default 30 seconds.
	MaintenanceInterval time.Duration
	// WrapWrite, if set, wraps every file a blob or upload is written to:
	// tests inject failing writers (a full disk) with it.
	WrapWrite func(io.Writer) io.Writer
	// Shared is the shared tier of a fleet (see shared.go); nil: this
	// store is alone.
	Shared *tier.Client
	// UploadIDPrefix starts every upload id, so that any replica of a
	// fleet can tell which one holds an upload session ("<prefix>.<hex>").
	UploadIDPrefix string
}

// Store is the content-addressed store. It is safe for concurrent use.
type Store struct {
	dir   string
	ix    index
	log   *slog.Logger
	now   func() time.Time
	locks keyedMutex
	dirMu sync.Mutex // creating blob directories
	opt   Options

	life     lifecycle
	hot      hotManifests          // manifests read last, in memory
	tags     hotKeys[tagKey, Tag]  // tags read lately
	repos    hotKeys[string, bool] // local repositories, and names that are none
	declared declaredWrites        // pushes of a declared digest in flight
	chunks   chunkGroups           // chunked uploads sharing a file

	shared    *tier.Client  // the fleet's shared tier; nil: alone
	queueKick chan struct{} // asks the drain loop to send the queue now
	absent    existsCache   // local repositories the shared tier does not have

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
	if opt.LowWatermark <= 0 || opt.LowWatermark > 1 {
		opt.LowWatermark = 0.90
	}
	if opt.HighWatermark <= 0 || opt.HighWatermark > 1 {
		opt.HighWatermark = 0.95
	}
	if opt.LowWatermark > opt.HighWatermark {
		opt.LowWatermark = opt.HighWatermark
	}
	if opt.GCGrace <= 0 {
		opt.GCGrace = 24 * time.Hour
	}
	if opt.MinGCGrace == 0 {
		opt.MinGCGrace = time.Hour
	}
	if opt.MinGCGrace > 0 && opt.GCGrace < opt.MinGCGrace {
		return nil, fmt.Errorf("%w: %s, the minimum is %s", ErrGraceTooShort, opt.GCGrace, opt.MinGCGrace)
	}
	if opt.GCEvery == 0 {
		opt.GCEvery = time.Hour
	}
	if opt.MaintenanceInterval <= 0 {
		opt.MaintenanceInterval = 30 * time.Second
	}
	for _, sub := range []string{"blobs", "tmp", "index"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	if err := syncDir(dir); err != nil { // their entries
		return nil, err
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
		// Tables are not compressed, so that reads (each Get, and the
		// scans of eviction, GC and recovery over every entry) use the
		// mapped file in place. With Snappy every block read was a new
		// buffer: a pass over 1M entries made 130 MiB of garbage, kept a
		// 32 MiB block cache full, and peaked at about 120 MiB of heap
		// instead of 52. The index is mostly hex digests and numbers, which
		// Snappy barely shrinks: 1M blobs and 100k manifests take 270 MiB
		// of tables instead of 189. Tables an older slipway wrote keep
		// their compression (badger records it per table) until a
		// compaction rewrites them.
		WithCompression(options.None).
		WithBlockCacheSize(0). // nothing to decompress, so nothing to cache
		WithIndexCacheSize(16 << 20).
		WithNumCompactors(2).
		WithValueLogFileSize(256 << 20).
		WithMetricsEnabled(false)
	db, err := badger.Open(bo)
	if err != nil {
		return nil, fmt.Errorf("cache: open index: %w", err)
	}
	s := &Store{dir: dir, ix: index{db: db}, log: opt.Logger, now: opt.Now, opt: opt, stop: make(chan struct{}),
		shared: opt.Shared, queueKick: make(chan struct{}, 1)}
	s.life.init()
	s.tags.writes, s.tags.max = &s.ix.writes, hotTags
	s.repos.writes, s.repos.max = &s.ix.writes, hotRepos
	if opt.MaxSize > 0 {
		s.life.budgetHigh = s.highMark()
		s.life.onGrowth = s.kickMaintenance
	}
	// Recovery runs before anything can write: no fill or push is live, so
	// every temp file that no upload session owns is a leftover.
	if _, err := s.recover(); err != nil {
		db.Close()
		return nil, err
	}
	s.wg.Add(2)
	go s.gcLoop(opt.GCInterval)
	go s.maintain()
	if s.shared != nil {
		s.wg.Add(1)
		go s.drain()
	}
	return s, nil
}

// Close stops the maintenance loops (waiting for a pass in progress),
// flushes access times and closes the index. It is safe to call
// more than once; later calls return the first call's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.wg.Wait()
		if err := s.flushAccess(); err != nil {
			s.log.Warn("flush access times", "err", err)
		}
		s.closeErr = s.ix.db.Close()
		s.closeGroups()
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
				if s.ix.db.RunValueLogGC(0.5) != nil {
					break
				}
			}
		}
	}
}

// blobPath is where blob d's file lives. d must be valid (digest.Validate):
// its encoded part is then long enough to name a directory.
func (s *Store) blobPath(d digest.Digest) string {
	hex := d.Encoded()
	return filepath.Join(s.dir, "blobs", string(d.Algorithm()), hex[:2], hex)
}

func (s *Store) tmpDir() string { return filepath.Join(s.dir, "tmp") }

// Ping reports whether the index is open and usable.
func (s *Store) Ping(ctx context.Context) error {
	_, err := s.ix.has([]byte{0})
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
