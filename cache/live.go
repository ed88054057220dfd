package cache

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Liveness: one rule says what keeps a blob or manifest, and GC and
// eviction ask it inside the digest's lock, in the transaction that would
// remove it, at the moment they act. Whatever a push, a manifest PUT, a
// tag or a mount did before that moment, the rule sees; whatever it does
// after, it does under the same lock on a store where the digest is
// either still there or already gone (and then it answers "unknown").
//
// What keeps a digest:
//   - a reader holds the blob open (a pull, a follower of a fill, a push
//     that only verifies its body against the stored blob);
//   - a stored manifest holds it (config, layer, child of an index);
//   - for a manifest: a tag points at it, or a local repository links it
//     (it was pushed there);
//   - it was stored, pushed again, mounted, pulled or HEADed within the
//     grace (GC only): its last use, in the index or still in memory;
//   - for eviction (the budget), which removes only pulled content: it is
//     pushed, or used since the pass planned to evict it, or a pin covers
//     it. In a fleet the shared tier keeps pushed content, so a replica
//     evicts its copy like any other; but not a blob still queued for the
//     shared tier.
//
// What does not: a proxied repository's link (proxied content comes back
// with a pull), and a subject (see References).

// what is stored under a digest: a blob or a manifest (a digest may be
// both: a manifest pushed as a blob too).
type kind byte

const (
	kindBlob     kind = 'b'
	kindManifest kind = 'm'
)

func (k kind) key(d digest.Digest) []byte {
	if k == kindBlob {
		return keyBlob(d)
	}
	return keyManifest(d)
}

func (k kind) String() string {
	if k == kindBlob {
		return "blob"
	}
	return "manifest"
}

// lastUse is d's last use: the newest of stored (a blob's StoredAt; 0 for
// a manifest), its access time in the index and one still in memory.
func (s *Store) lastUse(txn *badger.Txn, d digest.Digest, stored int64) int64 {
	at := stored
	if item, err := txn.Get(keyAccess(d)); err == nil {
		item.Value(func(v []byte) error {
			if t, ok := decodeTime(v); ok && t > at {
				at = t
			}
			return nil
		})
	}
	return max(at, s.pendingAccess(d))
}

// keepForGC says why d of kind k must stay through a GC pass that removes
// what was last used before cutoff, or "" if it may go. stored is a blob's
// StoredAt (unix nanos). The caller holds d's lock.
func (s *Store) keepForGC(txn *badger.Txn, d digest.Digest, k kind, stored, cutoff int64) (string, error) {
	if k == kindBlob && s.inUse(d) {
		return "open", nil
	}
	refs, err := refsOf(txn, d)
	if err != nil {
		return "", err
	}
	for _, r := range refs {
		switch {
		case r.kind == refHolder:
			return "held by " + string(r.holder), nil
		case k == kindManifest && r.kind == refTag:
			return "tagged", nil
		case k == kindManifest && r.kind == refLink && r.ns == "":
			return "in local repository " + r.repo, nil
		}
	}
	if s.lastUse(txn, d, stored) >= cutoff {
		return "used within the grace", nil
	}
	return "", nil
}

// keepForEviction says why pulled d of kind k must stay through an
// eviction pass that planned it with last use plannedAt, or "" if it may
// go. The caller holds d's lock.
func (s *Store) keepForEviction(txn *badger.Txn, d digest.Digest, k kind, origin Origin, stored, plannedAt int64) (string, error) {
	switch {
	case origin != OriginPulled && s.shared == nil: // in a fleet the shared tier keeps it
		return "pushed", nil
	case k == kindBlob && s.shared != nil && queuedIn(txn, d):
		return "still to go to the shared tier", nil
	case k == kindBlob && s.inUse(d):
		return "open", nil
	case s.lastUse(txn, d, stored) > plannedAt:
		return "used since the pass planned it", nil
	}
	pinned, err := s.pinnedNow(txn, d)
	if err != nil || !pinned {
		return "", err
	}
	return "pinned", nil
}

// pinnedNow reports whether a pin covers d, walking up from d through the
// manifests that hold it to the tags and repositories that name them.
func (s *Store) pinnedNow(txn *badger.Txn, d digest.Digest) (bool, error) {
	if len(s.opt.Pins) == 0 {
		return false, nil
	}
	frontier, seen := []digest.Digest{d}, map[digest.Digest]bool{d: true}
	// An image's blobs sit at most three levels under a tag (index,
	// manifest, blob); the bound keeps a hostile graph from costing more.
	for depth := 0; depth < 4 && len(frontier) > 0; depth++ {
		var next []digest.Digest
		for _, x := range frontier {
			refs, err := refsOf(txn, x)
			if err != nil {
				return false, err
			}
			for _, r := range refs {
				switch r.kind {
				case refTag:
					for _, p := range s.opt.Pins {
						if p.matchTag(r.ns, r.repo, r.tag) {
							return true, nil
						}
					}
				case refLink:
					for _, p := range s.opt.Pins {
						if p.Tag == "" && p.matchRepo(r.ns, r.repo) {
							return true, nil
						}
					}
				case refHolder:
					if !seen[r.holder] && len(seen) < 4096 {
						seen[r.holder] = true
						next = append(next, r.holder)
					}
				}
			}
		}
		frontier = next
	}
	return false, nil
}

// removed is what a removal took out of the index; the caller finishes it
// (file, totals, hot manifests) once the transaction committed.
type removed struct {
	kind  kind
	d     digest.Digest
	bytes int64
	links int
	tags  int
}

// dropBlob takes blob d out of the index in txn. links: the links to it
// go too (GC: the repositories no longer hold it), unless d is also a
// manifest, whose links they are as well.
func dropBlob(txn *badger.Txn, info BlobInfo, links bool) (removed, error) {
	d := info.Digest
	r := removed{kind: kindBlob, d: d, bytes: info.Size}
	alsoManifest, err := hasIn(txn, keyManifest(d))
	if err != nil {
		return r, err
	}
	if err := txn.Delete(keyBlob(d)); err != nil {
		return r, err
	}
	if alsoManifest {
		return r, nil
	}
	if err := txn.Delete(keyAccess(d)); err != nil {
		return r, err
	}
	if links {
		n, err := dropRefs(txn, d, refLink)
		r.links = n
		return r, err
	}
	return r, nil
}

// dropManifest takes manifest m out of the index in txn: its value, what
// it holds, and the tags that point at it. links: the links to it go too,
// unless d is also a blob.
func dropManifest(txn *badger.Txn, m Manifest, links bool) (removed, error) {
	d := m.Digest
	r := removed{kind: kindManifest, d: d, bytes: int64(len(m.Bytes))}
	held, _, err := References(m.Bytes)
	if err != nil {
		held = nil // stored before References checked it: nothing to undo
	}
	for _, h := range held {
		if err := txn.Delete(keyHolder(h.Digest, d)); err != nil {
			return r, err
		}
	}
	if err := txn.Delete(keyManifest(d)); err != nil {
		return r, err
	}
	alsoBlob, err := hasIn(txn, keyBlob(d))
	if err != nil {
		return r, err
	}
	if r.tags, err = dropRefs(txn, d, refTag); err != nil {
		return r, err
	}
	if alsoBlob {
		return r, nil
	}
	if err := txn.Delete(keyAccess(d)); err != nil {
		return r, err
	}
	if links {
		r.links, err = dropRefs(txn, d, refLink)
	}
	return r, err
}

// dropRefs deletes the links (refLink) or tags (refTag) that name d, with
// their mirrors, and counts them.
func dropRefs(txn *badger.Txn, d digest.Digest, kind byte) (int, error) {
	refs, err := refsOf(txn, d)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range refs {
		switch {
		case r.kind != kind:
			continue
		case kind == refLink:
			_, err = unlink(txn, r.ns, r.repo, d)
		default:
			_, err = deleteTag(txn, r.ns, r.repo, r.tag)
		}
		if err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// finish does what a committed removal leaves: the blob's file, the
// running totals, the manifest held in memory. The caller holds d's lock.
func (s *Store) finish(r removed) {
	switch r.kind {
	case kindBlob:
		s.life.subBlob(r.bytes)
		s.life.fullUntil.Store(0)
		// The index no longer names the file, so a crash from here on
		// leaves an orphan that recovery adopts or removes: never a
		// wrong blob.
		if err := os.Remove(s.blobPath(r.d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("remove blob file", "digest", r.d, "err", err)
		}
	case kindManifest:
		s.life.subManifest(r.bytes)
		s.hot.forget(r.d)
	}
}

// collect removes d of kind k if decide, asked inside d's lock and the
// removing transaction, lets it go. evict: an eviction, which leaves the
// links (a pull refills what a repository references) and counts as one;
// else GC, which takes the links too. It reports what it removed (kind 0:
// nothing).
func (s *Store) collect(d digest.Digest, k kind, decide func(txn *badger.Txn, origin Origin, stored int64) (string, error), evict bool) (removed, error) {
	unlock := s.locks.Lock(string(d))
	defer unlock()
	var r removed
	err := s.ix.update(func(txn *badger.Txn) error {
		r = removed{}
		v, err := getIn(txn, k.key(d))
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		switch k {
		case kindBlob:
			info, err := decodeBlob(d, v)
			if err != nil {
				return nil // verify deals with unreadable entries
			}
			if why, err := decide(txn, info.Origin, info.StoredAt.UnixNano()); err != nil || why != "" {
				return err
			}
			r, err = dropBlob(txn, info, !evict)
			return err
		default:
			m, err := decodeManifest(d, v)
			if err != nil {
				return nil
			}
			if why, err := decide(txn, m.Origin, 0); err != nil || why != "" {
				return err
			}
			r, err = dropManifest(txn, m, !evict)
			return err
		}
	})
	if err != nil {
		return removed{}, fmt.Errorf("cache: remove %s %s: %w", k, d, err)
	}
	if r.kind != 0 {
		if evict {
			// Counted before the totals drop: whoever sees them lower
			// sees the eviction too.
			s.life.noteEvicted(r)
		}
		s.finish(r)
	}
	return r, nil
}
