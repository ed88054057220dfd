package cache

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Manifest is a stored manifest: its raw bytes (never re-serialized, so its
// digest holds) and the media type it was served or pushed with.
type Manifest struct {
	Digest    digest.Digest
	MediaType string
	Bytes     []byte
	Origin    Origin
}

// Tag points a tag of a repository at a manifest digest. FetchedAt is when
// the upstream last confirmed it, so a stale tag can still be served while the
// upstream is down.
type Tag struct {
	Digest    digest.Digest
	FetchedAt time.Time
}

// ManifestPut is one manifest write with what comes along with it, done in
// one transaction under the locks of the manifest (and, for a push, of
// everything it holds).
type ManifestPut struct {
	// NS and Repo are the repository the manifest is put into: it is
	// linked there. A pulled manifest links what it holds there too (the
	// repository references them). Empty Repo: stored only.
	NS, Repo string
	Manifest Manifest
	// Tags of NS/Repo to point at it.
	Tags []string
	// Local is a push into a local repository: every blob and child
	// manifest the manifest holds must be held by NS/Repo already (pushed
	// or mounted there, and still stored as pushed content), with the size
	// the manifest gives (else ErrRefUnknown, ErrRefSize).
	Local bool

	// FromShared: the manifest comes from the fleet's shared tier, or from
	// the replica that puts it there; nothing to send there.
	FromShared bool
}

// PutManifest stores p.Manifest, keyed by its digest (verified here), with
// its links, tags and, if it has a subject, its entry in the subject's
// referrers list of the repository. Storing the same digest again keeps
// the stored bytes, except that pushed wins over pulled. Either all of it
// is written or none.
func (s *Store) PutManifest(p ManifestPut) error {
	m := p.Manifest
	if err := m.Digest.Validate(); err != nil {
		return err
	}
	if !m.Digest.Algorithm().Available() {
		return digest.ErrDigestUnsupported
	}
	if m.Digest.Algorithm().FromBytes(m.Bytes) != m.Digest {
		return ErrDigestMismatch
	}
	mt, err := MediaType(m.MediaType)
	if err != nil {
		return err
	}
	m.MediaType = mt
	held, subject, err := References(m.Bytes)
	if err != nil {
		return err
	}
	value, err := encodeManifest(m)
	if err != nil {
		return err
	}
	var referrer []byte
	if _, desc, ok := Referrer(m); ok && p.Repo != "" {
		if referrer, err = json.Marshal(desc); err != nil {
			return err
		}
	}
	locked := []string{string(m.Digest)}
	if p.Local {
		for _, h := range held {
			locked = append(locked, string(h.Digest))
		}
	}
	defer s.lockAll(locked)()

	if p.Local && s.shared != nil {
		// In a fleet the shared tier says what the repository holds (a
		// replica may hold nothing of a push another took), and takes
		// the manifest before this replica does.
		ctx, cancel := tierCtx()
		for _, h := range held {
			if err := s.sharedHeld(ctx, p.Repo, h); err != nil {
				cancel()
				return err
			}
		}
		cancel()
		p.Manifest = m
		if err := s.putSharedManifest(p, held); err != nil {
			return err
		}
	}
	now := s.now()
	var added, wrote bool
	err = s.ix.update(func(txn *badger.Txn) error {
		added, wrote = false, false
		if p.Local && s.shared == nil {
			if err := s.checkHeld(txn, p.NS, p.Repo, held); err != nil {
				return err
			}
		}
		old, err := getIn(txn, keyManifest(m.Digest))
		switch {
		case errors.Is(err, ErrNotFound):
			added, wrote = true, true
		case err != nil:
			return err
		default:
			o, err := manifestOrigin(old)
			wrote = err != nil || (o != OriginPushed && m.Origin == OriginPushed)
		}
		if wrote {
			if err := txn.Set(keyManifest(m.Digest), value); err != nil {
				return err
			}
		}
		if added {
			if err := putHolds(txn, m.Digest, held); err != nil {
				return err
			}
			if !p.Local && !p.FromShared {
				if err := s.queueIn(txn, keyQueueManifest(m.Digest)); err != nil {
					return err
				}
			}
		}
		if err := txn.Set(keyAccess(m.Digest), encodeTime(now.UnixNano())); err != nil {
			return err
		}
		if p.Repo == "" {
			return nil
		}
		if err := link(txn, p.NS, p.Repo, m.Digest); err != nil {
			return err
		}
		if !p.Local {
			for _, h := range held {
				if err := link(txn, p.NS, p.Repo, h.Digest); err != nil {
					return err
				}
			}
		}
		for _, tag := range p.Tags {
			if err := setTag(txn, p.NS, p.Repo, tag, Tag{Digest: m.Digest, FetchedAt: now}); err != nil {
				return err
			}
		}
		if referrer != nil {
			return txn.Set(keyReferrer(p.NS, p.Repo, subject, m.Digest), referrer)
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.Touch(m.Digest)
	if added {
		s.life.addManifest(int64(len(m.Bytes)))
	}
	if wrote {
		m.Bytes = bytes.Clone(m.Bytes) // the caller keeps its slice
		s.hot.wrote(m)
	}
	return nil
}

// checkHeld checks that local repository ns/repo holds everything in held:
// each blob linked there and stored as pushed content (a stale link to a
// blob GC removed and a pull brought back does not count), each child
// manifest stored and linked there, with the sizes held gives.
func (s *Store) checkHeld(txn *badger.Txn, ns, repo string, held []Ref) error {
	for _, h := range held {
		linked, err := hasIn(txn, keyLink(ns, repo, h.Digest))
		if err != nil {
			return err
		}
		if !linked {
			return fmt.Errorf("%w: %s", ErrRefUnknown, h.Digest)
		}
		var size int64
		if h.Manifest {
			v, err := getIn(txn, keyManifest(h.Digest))
			if errors.Is(err, ErrNotFound) {
				return fmt.Errorf("%w: manifest %s", ErrRefUnknown, h.Digest)
			}
			if err != nil {
				return err
			}
			m, err := decodeManifest(h.Digest, v)
			if err != nil {
				return err
			}
			size = int64(len(m.Bytes))
		} else {
			info, err := s.blobIn(txn, h.Digest)
			if errors.Is(err, ErrNotFound) || (err == nil && info.Origin != OriginPushed) {
				return fmt.Errorf("%w: blob %s", ErrRefUnknown, h.Digest)
			}
			if err != nil {
				return err
			}
			if _, err := os.Stat(s.blobPath(h.Digest)); err != nil {
				return fmt.Errorf("%w: blob %s: %v", ErrRefUnknown, h.Digest, err)
			}
			size = info.Size
		}
		if h.Size >= 0 && h.Size != size {
			return fmt.Errorf("%w: %s has %d bytes, the manifest says %d", ErrRefSize, h.Digest, size, h.Size)
		}
	}
	return nil
}

// lockAll locks several digests, in one order (sorted) so that two callers
// never wait for each other, and returns the unlock function.
func (s *Store) lockAll(keys []string) func() {
	keys = slices.Clone(keys)
	slices.Sort(keys)
	keys = slices.Compact(keys)
	unlocks := make([]func(), 0, len(keys))
	for _, k := range keys {
		unlocks = append(unlocks, s.locks.Lock(k))
	}
	return func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
}

// GetManifest returns the manifest stored under d, or ErrNotFound. The
// returned bytes are the caller's to keep. In a fleet, a manifest this
// replica lacks is read from the shared tier (and kept here).
func (s *Store) GetManifest(d digest.Digest) (Manifest, error) {
	return s.getManifest(d, true)
}

// GetManifestReadOnly is GetManifest for a caller that only reads the
// bytes (serves or parses them): they may be the copy held in memory,
// shared with every other reader, and must never be changed. A warm pull
// is spared copying the manifest on every request.
func (s *Store) GetManifestReadOnly(d digest.Digest) (Manifest, error) {
	return s.getManifest(d, false)
}

// getManifest is GetManifest; own: the bytes are the caller's to keep.
func (s *Store) getManifest(d digest.Digest, own bool) (Manifest, error) {
	m, err := s.localManifest(d, own)
	if s.shared == nil || !errors.Is(err, ErrNotFound) {
		return m, err
	}
	ctx, cancel := tierCtx()
	defer cancel()
	b, mt, terr := s.shared.Manifest(ctx, d)
	if terr != nil {
		if down(terr) {
			return Manifest{}, err
		}
		return Manifest{}, sharedErr(terr)
	}
	m = Manifest{Digest: d, MediaType: mt, Bytes: b, Origin: OriginPulled}
	if err := s.PutManifest(ManifestPut{Manifest: m, FromShared: true}); err != nil {
		return Manifest{}, err
	}
	return s.localManifest(d, own)
}

// localManifest is getManifest of this replica's own copy.
func (s *Store) localManifest(d digest.Digest, own bool) (Manifest, error) {
	if m, ok := s.hot.get(d); ok {
		if own {
			m.Bytes = bytes.Clone(m.Bytes)
		}
		return m, nil
	}
	gen := s.hot.generation()
	v, err := s.ix.get(keyManifest(d))
	if err != nil {
		return Manifest{}, err
	}
	m, err := decodeManifest(d, v)
	if err == nil {
		held := m
		held.Bytes = bytes.Clone(m.Bytes)
		s.hot.add(held, gen)
	}
	return m, err
}

// SetTag points ns/repo:tag at t; the manifest must be stored (else
// ErrNotFound). In a fleet, a pulled tag goes to the shared tier behind
// the answer, so that any replica can serve it.
func (s *Store) SetTag(ns, repo, tag string, t Tag) error {
	return s.setTagQueued(ns, repo, tag, t, true)
}

// SetTagFromPeer is SetTag for a pulled tag another replica of the fleet
// fetched: that replica sends it to the shared tier.
func (s *Store) SetTagFromPeer(ns, repo, tag string, t Tag) error {
	return s.setTagQueued(ns, repo, tag, t, false)
}

func (s *Store) setTagQueued(ns, repo, tag string, t Tag, queue bool) error {
	defer s.locks.Lock(string(t.Digest))()
	return s.ix.update(func(txn *badger.Txn) error {
		if ok, err := hasIn(txn, keyManifest(t.Digest)); err != nil || !ok {
			return errors.Join(err, fmt.Errorf("%w: manifest %s", ErrNotFound, t.Digest))
		}
		if queue && ns != "" {
			if err := s.queueIn(txn, keyQueueTag(ns, repo, tag)); err != nil {
				return err
			}
		}
		return setTag(txn, ns, repo, tag, t)
	})
}

// GetTag returns what ns/repo:tag points at, or ErrNotFound. In a fleet
// the shared tier has a local repository's tags; a pulled tag this
// replica lacks is read from it too (with the FetchedAt of the replica
// that fetched it).
func (s *Store) GetTag(ns, repo, tag string) (Tag, error) {
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		d, err := s.shared.Tag(ctx, repo, tag)
		if !down(err) {
			return Tag{Digest: d, FetchedAt: s.now()}, sharedErr(err)
		}
	}
	t, err := s.localTag(ns, repo, tag)
	if s.shared == nil || ns == "" || !errors.Is(err, ErrNotFound) {
		return t, err
	}
	ctx, cancel := tierCtx()
	defer cancel()
	pt, terr := s.shared.GetPulledTag(ctx, ns, repo, tag)
	if terr != nil {
		if down(terr) {
			return Tag{}, err
		}
		return Tag{}, sharedErr(terr)
	}
	t = Tag{Digest: pt.Digest, FetchedAt: pt.FetchedAt}
	// The manifest too, linked into the repository with what it holds,
	// as a pull through this replica would have left it.
	b, mt, err := s.shared.Manifest(ctx, t.Digest)
	if err != nil {
		return Tag{}, sharedErr(err)
	}
	m := Manifest{Digest: t.Digest, MediaType: mt, Bytes: b, Origin: OriginPulled}
	if err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Manifest: m, FromShared: true}); err != nil {
		return Tag{}, err
	}
	if err := s.setTagQueued(ns, repo, tag, t, false); err != nil {
		return Tag{}, err
	}
	return t, nil
}

// tagKey names a tag in memory (hotKeys) without building its index key.
type tagKey struct{ ns, repo, tag string }

func (s *Store) localTag(ns, repo, tag string) (Tag, error) {
	return s.tags.get(tagKey{ns, repo, tag}, func() (Tag, error) {
		v, err := s.ix.get(keyTag(ns, repo, tag))
		if err != nil {
			return Tag{}, err
		}
		return decodeTag(v)
	})
}

// DeleteTag removes ns/repo:tag. A missing tag is ErrNotFound.
func (s *Store) DeleteTag(ns, repo, tag string) error {
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		if _, err := s.shared.Tag(ctx, repo, tag); err != nil {
			return sharedErr(err)
		}
		if err := s.shared.DeleteTag(ctx, repo, tag); err != nil {
			return sharedErr(err)
		}
		err := s.ix.update(func(txn *badger.Txn) error {
			_, err := deleteTag(txn, ns, repo, tag)
			return err
		})
		return err
	}
	return s.ix.update(func(txn *badger.Txn) error {
		ok, err := deleteTag(txn, ns, repo, tag)
		if err == nil && !ok {
			err = ErrNotFound
		}
		return err
	})
}

// Tags lists the tags of ns/repo in lexical order, at most n of them
// (n <= 0: all) starting after last.
func (s *Store) Tags(ns, repo string, last string, n int) ([]string, error) {
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		tags, err := s.shared.Tags(ctx, repo)
		if !down(err) {
			return page(tags, last, n), sharedErr(err)
		}
	}
	return s.ix.keysWithPrefix(keyTagPrefix(ns, repo), last, n)
}

// Link records that ns/repo references digests (a blob or manifest it
// fetched, pushed or mounted). Only linked content is served under a
// repository.
func (s *Store) Link(ns, repo string, digests ...digest.Digest) error {
	if len(digests) == 0 {
		return nil
	}
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		for _, d := range digests {
			if err := s.shared.Link(ctx, repo, d); err != nil {
				return sharedErr(err)
			}
		}
	}
	return s.ix.update(func(txn *badger.Txn) error {
		for _, d := range digests {
			if err := link(txn, ns, repo, d); err != nil {
				return err
			}
		}
		return nil
	})
}

// Linked reports whether ns/repo references d.
func (s *Store) Linked(ns, repo string, d digest.Digest) (bool, error) {
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		ok, err := s.shared.Linked(ctx, repo, d)
		if !down(err) {
			return ok, sharedErr(err)
		}
	}
	return s.ix.has(keyLink(ns, repo, d))
}

// Unlink removes the reference from ns/repo to d. A missing link is not an
// error.
func (s *Store) Unlink(ns, repo string, d digest.Digest) error {
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		if err := s.shared.Unlink(ctx, repo, d); err != nil {
			return sharedErr(err)
		}
	}
	return s.ix.update(func(txn *badger.Txn) error {
		_, err := unlink(txn, ns, repo, d)
		return err
	})
}
