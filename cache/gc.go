package cache

import (
	"errors"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// GCOptions tune one GC pass.
type GCOptions struct {
	// DryRun reports what would be removed and removes nothing.
	DryRun bool
	// Grace overrides Options.GCGrace when positive.
	Grace time.Duration
}

// GCReport says what a GC pass removed (or would remove).
type GCReport struct {
	Live      int           `json:"live_digests"`
	Blobs     int           `json:"blobs"`
	Bytes     int64         `json:"bytes"`
	Accesses  int           `json:"stale_access_entries"`
	Dur       time.Duration `json:"duration_ns"`
	Removed   []string      `json:"removed,omitempty"`
	Truncated bool          `json:"removed_truncated,omitempty"`
}

// GC removes blobs that no manifest still in use references, once they
// were neither stored nor used for the grace period (a push sends layers
// before their manifest). A manifest is in use while a repository links it
// or a tag points at it; its references (children of an index included)
// are live. Pushed blobs are collected too once nothing references them:
// the budget never evicts them, but a deleted image's layers go.
func (s *Store) GC(o GCOptions) (GCReport, error) {
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	start := time.Now()
	grace := s.opt.GCGrace
	if o.Grace > 0 {
		grace = o.Grace
	}
	if err := s.flushAccess(); err != nil {
		return GCReport{}, err
	}
	live, err := s.liveSet()
	if err != nil {
		return GCReport{}, err
	}
	r := GCReport{Live: len(live)}
	cutoff := s.now().Add(-grace).UnixNano()
	open := s.inUseSet()
	var dead []digest.Digest
	var stale [][]byte
	err = s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = []byte{prefixBlob}
		it := txn.NewIterator(o)
		defer func() { it.Close() }()
		for it.Rewind(); it.Valid(); it.Next() {
			d := digest.Digest(it.Item().Key()[1:])
			if live[d] || open[d] {
				continue
			}
			var info BlobInfo
			if err := it.Item().Value(func(v []byte) error {
				var err error
				info, err = decodeBlob(d, v)
				return err
			}); err != nil {
				continue
			}
			at := info.StoredAt.UnixNano()
			if a, err := txn.Get(keyAccess(d)); err == nil {
				a.Value(func(v []byte) error { at = lastAccess(at, v); return nil })
			}
			if at < cutoff {
				dead = append(dead, d)
			}
		}
		it.Close()
		// Access times of digests that are neither a blob nor a manifest.
		o.Prefix = []byte{prefixAccess}
		o.PrefetchValues = false
		it = txn.NewIterator(o)
		for it.Rewind(); it.Valid(); it.Next() {
			name := string(it.Item().Key()[1:])
			_, errB := txn.Get(keyBlob(digest.Digest(name)))
			_, errM := txn.Get(keyManifest(digest.Digest(name)))
			if errors.Is(errB, badger.ErrKeyNotFound) && errors.Is(errM, badger.ErrKeyNotFound) {
				stale = append(stale, it.Item().KeyCopy(nil))
			}
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return r, ErrClosed
	}
	if err != nil {
		return r, err
	}
	for _, d := range dead {
		if o.DryRun {
			info, err := s.StatBlob(d)
			if err == nil {
				r.Blobs++
				r.Bytes += info.Size
				r.note(d)
			}
			continue
		}
		unlock := s.locks.Lock(string(d))
		if s.inUse(d) {
			unlock()
			continue
		}
		freed, ok, err := s.deleteBlobLocked(d, nil)
		unlock()
		if err != nil {
			return r, err
		}
		if ok {
			r.Blobs++
			r.Bytes += freed
			r.note(d)
		}
	}
	r.Accesses = len(stale)
	if !o.DryRun && len(stale) > 0 {
		wb := s.db.NewWriteBatch()
		for _, k := range stale {
			wb.Delete(k)
		}
		err = wb.Flush()
	}
	r.Dur = time.Since(start)
	if r.Blobs > 0 && !o.DryRun {
		s.log.Info("gc", "blobs", r.Blobs, "bytes", r.Bytes, "dur", r.Dur)
	}
	return r, err
}

func (r *GCReport) note(d digest.Digest) {
	if len(r.Removed) < 1000 {
		r.Removed = append(r.Removed, string(d))
	} else {
		r.Truncated = true
	}
}

// liveSet is every digest that a linked or tagged manifest references,
// those manifests included.
func (s *Store) liveSet() (map[digest.Digest]bool, error) {
	var roots []digest.Digest
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = []byte{prefixLink}
		o.PrefetchValues = false
		it := txn.NewIterator(o)
		defer func() { it.Close() }()
		for it.Rewind(); it.Valid(); it.Next() {
			p := splitKey(it.Item().Key())
			if len(p) != 3 {
				continue
			}
			d := digest.Digest(p[2])
			if _, err := txn.Get(keyManifest(d)); err == nil {
				roots = append(roots, d)
			}
		}
		it.Close()
		o.Prefix = []byte{prefixTag}
		o.PrefetchValues = true
		it = txn.NewIterator(o)
		for it.Rewind(); it.Valid(); it.Next() {
			it.Item().Value(func(v []byte) error {
				if t, err := decodeTag(v); err == nil {
					roots = append(roots, t.Digest)
				}
				return nil
			})
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, ErrClosed
	}
	if err != nil {
		return nil, err
	}
	live := map[digest.Digest]bool{}
	s.closeOver(roots, live)
	return live, nil
}
