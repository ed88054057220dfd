package cache

import (
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// gcSweepHook, if set, runs between a GC pass's scan of the blobs and
// their removal: tests land writes there.
var gcSweepHook func()

// GCOptions tune one GC pass.
type GCOptions struct {
	// DryRun reports what would be removed and removes nothing. (It
	// reports one round: the blobs a removed manifest alone held show up
	// only in the pass after it.)
	DryRun bool
	// Grace overrides Options.GCGrace when positive. Under
	// Options.MinGCGrace it is ErrGraceTooShort.
	Grace time.Duration
}

// GCReport says what a GC pass removed (or would remove).
type GCReport struct {
	Kept          int           `json:"live_digests"` // blobs and manifests kept
	Blobs         int           `json:"blobs"`
	Bytes         int64         `json:"bytes"`
	Manifests     int           `json:"manifests"`
	ManifestBytes int64         `json:"manifest_bytes"`
	Links         int           `json:"links"`   // links that named nothing stored or held any more
	Fetched       int           `json:"fetched"` // tag lists and referrers indexes of what is gone
	Accesses      int           `json:"stale_access_entries"`
	Dur           time.Duration `json:"duration_ns"`
	Removed       []string      `json:"removed,omitempty"`
	Truncated     bool          `json:"removed_truncated,omitempty"`
}

// GC removes what nothing keeps (see live.go) and was last used before
// the grace: manifests no tag, index or local repository refers to (a
// proxied tag that moved leaves its old manifests behind), then blobs no
// stored manifest holds (a push sends its layers before its manifest; a
// deleted image's layers go), then links to digests that are neither
// stored nor held by anything. Each removal asks the rule again inside the
// digest's lock, so a manifest, tag, mount or push that lands during the
// pass keeps what it needs.
func (s *Store) GC(o GCOptions) (GCReport, error) {
	grace := s.opt.GCGrace
	if o.Grace > 0 {
		grace = o.Grace
	}
	if s.opt.MinGCGrace > 0 && grace < s.opt.MinGCGrace {
		return GCReport{}, fmt.Errorf("%w: %s, the minimum is %s", ErrGraceTooShort, grace, s.opt.MinGCGrace)
	}
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	start := time.Now()
	if err := s.flushAccess(); err != nil {
		return GCReport{}, err
	}
	cutoff := s.now().Add(-grace).UnixNano()
	var r GCReport
	sweep := func(k kind) (int, error) {
		cands, kept, err := s.gcCandidates(k, cutoff)
		r.Kept += kept
		if err != nil {
			return 0, err
		}
		if k == kindBlob && gcSweepHook != nil {
			gcSweepHook()
		}
		n := 0
		for _, c := range cands {
			if o.DryRun {
				r.count(removed{kind: k, d: c.d, bytes: c.size})
				n++
				continue
			}
			rm, err := s.collect(c.d, k, func(txn *badger.Txn, _ Origin, stored int64) (string, error) {
				return s.keepForGC(txn, c.d, k, stored, cutoff)
			}, false)
			if err != nil {
				return n, err
			}
			if rm.kind != 0 {
				r.count(rm)
				n++
			}
		}
		return n, nil
	}
	// Manifests first: what a removed manifest held may go in the same
	// pass. An index goes one round before its children.
	for round := 0; round < 8; round++ {
		kept := r.Kept
		n, err := sweep(kindManifest)
		if err != nil {
			return r, err
		}
		if n == 0 || o.DryRun {
			break
		}
		r.Kept = kept
	}
	if _, err := sweep(kindBlob); err != nil {
		return r, err
	}
	if !o.DryRun {
		n, err := s.pruneLinks()
		r.Links = n
		if err != nil {
			return r, err
		}
	}
	if !o.DryRun {
		n, err := s.pruneFetched(cutoff)
		r.Fetched = n
		if err != nil {
			return r, err
		}
	}
	n, err := s.pruneAccess(o.DryRun)
	r.Accesses = n
	r.Dur = time.Since(start)
	if r.Blobs+r.Manifests+r.Links > 0 && !o.DryRun {
		s.log.Info("gc", "blobs", r.Blobs, "bytes", r.Bytes, "manifests", r.Manifests, "links", r.Links, "dur", r.Dur)
	}
	return r, err
}

func (r *GCReport) count(rm removed) {
	if rm.kind == kindBlob {
		r.Blobs++
		r.Bytes += rm.bytes
	} else {
		r.Manifests++
		r.ManifestBytes += rm.bytes
	}
	r.Links += rm.links
	if len(r.Removed) < 1000 {
		r.Removed = append(r.Removed, string(rm.d))
	} else {
		r.Truncated = true
	}
}

type gcCandidate struct {
	d    digest.Digest
	size int64
}

// gcCandidates lists what of kind k the rule would let go now, and counts
// what it keeps.
func (s *Store) gcCandidates(k kind, cutoff int64) ([]gcCandidate, int, error) {
	var out []gcCandidate
	kept := 0
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(byte(k)), nil, false, func(item *badger.Item) error {
			d := digestKey(item.Key())
			var stored, size int64
			if k == kindBlob {
				if err := item.Value(func(v []byte) error {
					info, err := decodeBlob(d, v)
					stored, size = info.StoredAt.UnixNano(), info.Size
					return err
				}); err != nil {
					return nil // verify deals with unreadable entries
				}
			} else if err := item.Value(func(v []byte) error {
				size = manifestSize(v)
				return nil
			}); err != nil {
				return err
			}
			why, err := s.keepForGC(txn, d, k, stored, cutoff)
			if err != nil {
				return err
			}
			if why != "" {
				kept++
				return nil
			}
			out = append(out, gcCandidate{d: d, size: size})
			return nil
		})
	})
	return out, kept, err
}

// pruneLinks removes links to digests that are neither stored nor held by
// a stored manifest: the proxied layers of manifests GC or eviction took,
// that were never pulled (or were evicted since).
func (s *Store) pruneLinks() (int, error) {
	type dangling struct {
		ns, repo string
		d        digest.Digest
	}
	var cands []dangling
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixLink), nil, false, func(item *badger.Item) error {
			ns, repo, d, ok := parseLinkKey(item.Key())
			if !ok {
				return nil
			}
			dead, err := danglingIn(txn, d)
			if err == nil && dead {
				cands = append(cands, dangling{ns, repo, d})
			}
			return err
		})
	})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, c := range cands {
		unlock := s.locks.Lock(string(c.d))
		var gone bool
		err := s.ix.update(func(txn *badger.Txn) error {
			gone = false
			dead, err := danglingIn(txn, c.d)
			if err != nil || !dead {
				return err
			}
			gone, err = unlink(txn, c.ns, c.repo, c.d)
			return err
		})
		unlock()
		if err != nil {
			return n, err
		}
		if gone {
			n++
		}
	}
	return n, nil
}

// danglingIn reports whether d is neither a blob nor a manifest, and no
// stored manifest holds it.
func danglingIn(txn *badger.Txn, d digest.Digest) (bool, error) {
	for _, k := range []kind{kindBlob, kindManifest} {
		if ok, err := hasIn(txn, k.key(d)); err != nil || ok {
			return false, err
		}
	}
	refs, err := refsOf(txn, d)
	for _, r := range refs {
		if r.kind == refHolder {
			return false, err
		}
	}
	return true, err
}

// pruneAccess removes access times of digests that are neither a blob nor
// a manifest (a use recorded after a removal).
func (s *Store) pruneAccess(dryRun bool) (int, error) {
	var stale [][]byte
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixAccess), nil, false, func(item *badger.Item) error {
			d := digestKey(item.Key())
			b, errB := hasIn(txn, keyBlob(d))
			m, errM := hasIn(txn, keyManifest(d))
			if err := errors.Join(errB, errM); err != nil {
				return err
			}
			if !b && !m {
				stale = append(stale, item.KeyCopy(nil))
			}
			return nil
		})
	})
	if err != nil || dryRun || len(stale) == 0 {
		return len(stale), err
	}
	return len(stale), s.ix.batch(func(wb *badger.WriteBatch) error {
		for _, k := range stale {
			if err := wb.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}
