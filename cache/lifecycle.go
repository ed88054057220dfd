package cache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// The cache lifecycle: running totals of blob and manifest bytes, access
// times batched in memory and flushed to 'a' keys, the files readers hold
// open, and the maintenance loop that flushes, evicts and collects
// garbage.

// lifecycle is the Store's bookkeeping for eviction and stats.
type lifecycle struct {
	size       atomic.Int64 // bytes of indexed blobs
	count      atomic.Int64 // indexed blobs
	mSize      atomic.Int64 // bytes of stored manifests
	mCount     atomic.Int64 // stored manifests
	onGrowth   func()       // called when the totals grew
	budgetHigh int64        // the high mark; 0: no budget

	hits             atomic.Int64 // blobs opened to be served, since Open
	misses           atomic.Int64 // pulled blobs stored by a fill, since Open
	evicted          atomic.Int64 // blobs evicted since Open
	evictedManifests atomic.Int64 // manifests evicted since Open
	evictedBytes     atomic.Int64

	mu       sync.Mutex
	pending  map[digest.Digest]int64      // access times not yet in badger
	flushing map[digest.Digest]int64      // access times a flush is writing now
	readers  map[digest.Digest][]*os.File // files OpenBlob and Follow handed out
	opens    int                          // since the last prune of readers
	flushMu  sync.Mutex                   // one flush of access times at a time

	// fullUntil (unix nanos): after a write found the disk full, new
	// writers fail fast with ErrNoSpace, before a client got any header,
	// until a blob is removed or this time passes.
	fullUntil atomic.Int64

	kick chan struct{} // asks the maintenance loop for an eviction pass
	pass sync.Mutex    // one eviction or GC pass at a time

	planMax int                         // candidates one eviction plan holds (tests lower it)
	plan    atomic.Pointer[EvictReport] // what the last pass toward the budget planned
}

func (l *lifecycle) init() {
	l.pending = map[digest.Digest]int64{}
	l.readers = map[digest.Digest][]*os.File{}
	l.kick = make(chan struct{}, 1)
	l.planMax = planMax
}

// total is what counts against the budget: blobs and manifests.
func (l *lifecycle) total() int64 { return l.size.Load() + l.mSize.Load() }

func (l *lifecycle) addBlob(n int64) {
	l.size.Add(n)
	l.count.Add(1)
	l.grew()
}

func (l *lifecycle) subBlob(n int64) {
	l.size.Add(-n)
	l.count.Add(-1)
}

func (l *lifecycle) addManifest(n int64) {
	l.mSize.Add(n)
	l.mCount.Add(1)
	l.grew()
}

func (l *lifecycle) subManifest(n int64) {
	l.mSize.Add(-n)
	l.mCount.Add(-1)
}

// noteEvicted counts an eviction.
func (l *lifecycle) noteEvicted(r removed) {
	if r.kind == kindBlob {
		l.evicted.Add(1)
	} else {
		l.evictedManifests.Add(1)
	}
	l.evictedBytes.Add(r.bytes)
}

func (l *lifecycle) grew() {
	if l.budgetHigh > 0 && l.total() > l.budgetHigh && l.onGrowth != nil {
		l.onGrowth()
	}
}

// maxPending bounds the access times kept in memory between flushes.
const maxPending = 64 << 10

// Touch records that d (a blob or manifest) was just used. It is cheap: a
// map write; the times reach badger in batches, and until then GC and
// eviction read them from memory.
func (s *Store) Touch(d digest.Digest) {
	now := s.now().UnixNano()
	s.life.mu.Lock()
	if now > s.life.pending[d] {
		s.life.pending[d] = now
	}
	full := len(s.life.pending) >= maxPending
	s.life.mu.Unlock()
	if full {
		s.kickMaintenance()
	}
}

// pendingAccess is d's access time not yet in badger (0: none).
func (s *Store) pendingAccess(d digest.Digest) int64 {
	s.life.mu.Lock()
	defer s.life.mu.Unlock()
	return max(s.life.pending[d], s.life.flushing[d])
}

// pendingAccessOf is pendingAccess of a digest as its key holds it (a
// pass asks it for every index entry, without making a string of each).
func (s *Store) pendingAccessOf(name []byte) int64 {
	s.life.mu.Lock()
	defer s.life.mu.Unlock()
	return max(s.life.pending[digest.Digest(name)], s.life.flushing[digest.Digest(name)])
}

// flushHook, if set, runs in flushAccess between taking the pending
// times and writing them: tests hold a flush there.
var flushHook func()

// flushAccess writes the pending access times to badger. One flush runs
// at a time, and until its batch is written the times it took stay
// visible to pendingAccess: a pass that flushes first, then scans, sees
// every use that came before it.
func (s *Store) flushAccess() error {
	s.life.flushMu.Lock()
	defer s.life.flushMu.Unlock()
	s.life.mu.Lock()
	p := s.life.pending
	if len(p) == 0 {
		s.life.mu.Unlock()
		return nil
	}
	s.life.pending = make(map[digest.Digest]int64, len(p))
	s.life.flushing = p
	s.life.mu.Unlock()
	defer func() {
		s.life.mu.Lock()
		s.life.flushing = nil
		s.life.mu.Unlock()
	}()
	if flushHook != nil {
		flushHook()
	}
	return s.ix.batch(func(wb *badger.WriteBatch) error {
		for d, t := range p {
			if err := wb.Set(keyAccess(d), encodeTime(t)); err != nil {
				return err
			}
		}
		return nil
	})
}

// renew records a use of d that must outlast a crash (a push of a blob
// that was already stored, a mount): in txn, and in memory, so that a
// flush of an older time cannot hide it.
func (s *Store) renew(txn *badger.Txn, d digest.Digest) error {
	s.Touch(d)
	return txn.Set(keyAccess(d), encodeTime(s.now().UnixNano()))
}

// trackReader records that f holds blob d open, so eviction leaves d alone
// until f is closed.
func (s *Store) trackReader(d digest.Digest, f *os.File) {
	s.life.mu.Lock()
	defer s.life.mu.Unlock()
	s.life.readers[d] = append(s.life.readers[d], f)
	s.life.opens++
	if s.life.opens >= 1024 {
		s.life.opens = 0
		for d := range s.life.readers {
			s.pruneReadersLocked(d)
		}
	}
}

// inUse reports whether a reader still holds blob d open.
func (s *Store) inUse(d digest.Digest) bool {
	s.life.mu.Lock()
	defer s.life.mu.Unlock()
	return s.pruneReadersLocked(d)
}

// inUseSet is the set of blobs readers hold open now.
func (s *Store) inUseSet() map[digest.Digest]bool {
	s.life.mu.Lock()
	defer s.life.mu.Unlock()
	out := map[digest.Digest]bool{}
	for d := range s.life.readers {
		if s.pruneReadersLocked(d) {
			out[d] = true
		}
	}
	return out
}

// pruneReadersLocked drops the closed files of d and reports whether any
// is still open. A closed *os.File refuses Control (the poller's reference
// count says so, without a data race).
func (s *Store) pruneReadersLocked(d digest.Digest) bool {
	fs := s.life.readers[d]
	live := fs[:0]
	for _, f := range fs {
		if isOpen(f) {
			live = append(live, f)
		}
	}
	clear(fs[len(live):])
	if len(live) == 0 {
		delete(s.life.readers, d)
		return false
	}
	s.life.readers[d] = live
	return true
}

func isOpen(f *os.File) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	return rc.Control(func(uintptr) {}) == nil
}

func (s *Store) highMark() int64 { return int64(float64(s.opt.MaxSize) * s.opt.HighWatermark) }
func (s *Store) lowMark() int64  { return int64(float64(s.opt.MaxSize) * s.opt.LowWatermark) }

func (s *Store) kickMaintenance() {
	select {
	case s.life.kick <- struct{}{}:
	default:
	}
}

// maintain flushes access times and keeps the budget, on a ticker and
// whenever a commit passes the high mark or a write finds the disk full;
// it runs the unreferenced-blob GC every GCEvery. Close waits for it.
func (s *Store) maintain() {
	defer s.wg.Done()
	tick := time.NewTicker(s.opt.MaintenanceInterval)
	defer tick.Stop()
	var gcTick <-chan time.Time
	if s.opt.GCEvery > 0 {
		t := time.NewTicker(s.opt.GCEvery)
		defer t.Stop()
		gcTick = t.C
	}
	for {
		select {
		case <-s.stop:
			return
		case <-tick.C:
		case <-s.life.kick:
		case <-gcTick:
			if _, err := s.GC(GCOptions{}); err != nil && !errors.Is(err, ErrClosed) {
				s.log.Warn("gc failed", "err", err)
			}
			if s.shared != nil { // one replica of the fleet wins the lease
				ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
				if _, err := s.SharedGC(ctx, GCOptions{}); err != nil {
					s.log.Warn("shared gc failed", "err", err)
				}
				cancel()
			}
			continue
		}
		if err := s.flushAccess(); err != nil && !errors.Is(err, ErrClosed) {
			s.log.Warn("flush access times", "err", err)
		}
		if _, err := s.EvictToBudget(); err != nil && !errors.Is(err, ErrClosed) {
			s.log.Warn("eviction failed", "err", err)
		}
	}
}

// writeErr marks a write error: a full disk becomes ErrNoSpace and asks for
// an eviction pass.
func (s *Store) writeErr(op string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		s.life.fullUntil.Store(s.now().Add(fullBackoff).UnixNano())
		s.kickMaintenance()
		return fmt.Errorf("%w: %s: %v", ErrNoSpace, op, err)
	}
	return fmt.Errorf("cache: %s: %w", op, err)
}

// fullBackoff is how long new writes fail fast after the disk was found
// full, unless a removal frees space first.
const fullBackoff = 5 * time.Second

// checkRoom fails fast while the disk is known to be full.
func (s *Store) checkRoom() error {
	if s.now().UnixNano() < s.life.fullUntil.Load() {
		return fmt.Errorf("%w: a recent write found the disk full", ErrNoSpace)
	}
	return nil
}

// Stats is a snapshot of the store.
type Stats struct {
	Blobs            int64   `json:"blobs"`
	Bytes            int64   `json:"bytes"` // what counts against the budget: blobs and manifests
	BlobBytes        int64   `json:"blob_bytes"`
	Manifests        int64   `json:"manifests"`
	ManifestBytes    int64   `json:"manifest_bytes"`
	MaxSize          int64   `json:"max_size,omitempty"`
	HighWatermark    int64   `json:"high_watermark_bytes,omitempty"`
	LowWatermark     int64   `json:"low_watermark_bytes,omitempty"`
	Hits             int64   `json:"blob_hits"`      // blobs served from disk
	Misses           int64   `json:"blob_misses"`    // blobs a fill had to store
	HitRatio         float64 `json:"blob_hit_ratio"` // hits / (hits + misses)
	Evicted          int64   `json:"evicted_blobs"`
	EvictedManifests int64   `json:"evicted_manifests"`
	EvictedBytes     int64   `json:"evicted_bytes"` // of both
	OpenReaders      int     `json:"open_readers"`
}

// Stats returns the running totals; it reads no index.
func (s *Store) Stats() Stats {
	st := Stats{
		Blobs: s.life.count.Load(), BlobBytes: s.life.size.Load(),
		Manifests: s.life.mCount.Load(), ManifestBytes: s.life.mSize.Load(),
		Hits: s.life.hits.Load(), Misses: s.life.misses.Load(),
		Evicted: s.life.evicted.Load(), EvictedManifests: s.life.evictedManifests.Load(),
		EvictedBytes: s.life.evictedBytes.Load(),
		OpenReaders:  len(s.inUseSet()),
	}
	st.Bytes = st.BlobBytes + st.ManifestBytes
	if s.opt.MaxSize > 0 {
		st.MaxSize, st.HighWatermark, st.LowWatermark = s.opt.MaxSize, s.highMark(), s.lowMark()
	}
	if n := st.Hits + st.Misses; n > 0 {
		st.HitRatio = float64(st.Hits) / float64(n)
	}
	return st
}
