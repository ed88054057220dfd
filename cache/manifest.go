package cache

import (
	"bytes"
	"errors"
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

// PutManifest stores m, keyed by its digest (verified here). Storing the
// same digest again is a no-op, except that pushed wins over pulled.
func (s *Store) PutManifest(m Manifest) error {
	if err := m.Digest.Validate(); err != nil {
		return err
	}
	if !m.Digest.Algorithm().Available() {
		return digest.ErrDigestUnsupported
	}
	if m.Digest.Algorithm().FromBytes(m.Bytes) != m.Digest {
		return ErrDigestMismatch
	}
	unlock := s.locks.Lock(string(m.Digest))
	defer unlock()
	if old, err := s.GetManifest(m.Digest); err == nil {
		if old.Origin == OriginPushed || m.Origin != OriginPushed {
			return nil
		}
	}
	if err := s.set(keyManifest(m.Digest), encodeManifest(m)); err != nil {
		return err
	}
	m.Bytes = bytes.Clone(m.Bytes) // the caller keeps its slice
	s.hot.wrote(m)
	return nil
}

// GetManifest returns the manifest stored under d, or ErrNotFound. The
// returned bytes are the caller's to keep.
func (s *Store) GetManifest(d digest.Digest) (Manifest, error) {
	if m, ok := s.hot.get(d); ok {
		m.Bytes = bytes.Clone(m.Bytes)
		return m, nil
	}
	gen := s.hot.generation()
	v, err := s.get(keyManifest(d))
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

// SetTag points ns/repo:tag at t.
func (s *Store) SetTag(ns, repo, tag string, t Tag) error {
	return s.set(keyTag(ns, repo, tag), encodeTag(t))
}

// GetTag returns what ns/repo:tag points at, or ErrNotFound.
func (s *Store) GetTag(ns, repo, tag string) (Tag, error) {
	v, err := s.get(keyTag(ns, repo, tag))
	if err != nil {
		return Tag{}, err
	}
	return decodeTag(v)
}

// DeleteTag removes ns/repo:tag. A missing tag is ErrNotFound.
func (s *Store) DeleteTag(ns, repo, tag string) error {
	return s.db.Update(func(txn *badger.Txn) error {
		k := keyTag(ns, repo, tag)
		if _, err := txn.Get(k); errors.Is(err, badger.ErrKeyNotFound) {
			return ErrNotFound
		} else if err != nil {
			return err
		}
		return txn.Delete(k)
	})
}

// Tags lists the tags of ns/repo in lexical order, at most n of them
// (n <= 0: all) starting after last.
func (s *Store) Tags(ns, repo string, last string, n int) ([]string, error) {
	return s.list(keyTagPrefix(ns, repo), last, n)
}

// Link records that ns/repo references digests (a blob or manifest it
// fetched, pushed or mounted). Only linked content is served under a
// repository.
func (s *Store) Link(ns, repo string, digests ...digest.Digest) error {
	if len(digests) == 0 {
		return nil
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, d := range digests {
		if err := wb.Set(keyLink(ns, repo, d), nil); err != nil {
			return err
		}
	}
	return wb.Flush()
}

// Linked reports whether ns/repo references d.
func (s *Store) Linked(ns, repo string, d digest.Digest) (bool, error) {
	return s.exists(keyLink(ns, repo, d))
}

// Unlink removes the reference from ns/repo to d.
func (s *Store) Unlink(ns, repo string, d digest.Digest) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(keyLink(ns, repo, d)) })
}
