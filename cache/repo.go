package cache

import (
	"bytes"
	"encoding/binary"
	"errors"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Local repositories (pushed to, ns ""), the referrers of a manifest, and
// the listings and deletes that pushes need.

// AddRepository records that local repository name exists. Adding it again
// keeps the first creation time.
func (s *Store) AddRepository(name string) error {
	return s.update(func(txn *badger.Txn) error {
		k := keyRepo(name)
		if _, err := txn.Get(k); err == nil {
			return nil
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		return txn.Set(k, binary.BigEndian.AppendUint64(nil, uint64(s.now().UnixNano())))
	})
}

// update runs a read-modify-write transaction, again when a concurrent one
// conflicted with it (it read a key another wrote).
func (s *Store) update(fn func(txn *badger.Txn) error) error {
	var err error
	for range 16 {
		err = s.db.Update(fn)
		if !errors.Is(err, badger.ErrConflict) {
			break
		}
	}
	if errors.Is(err, badger.ErrDBClosed) {
		return ErrClosed
	}
	return err
}

// RepositoryExists reports whether local repository name exists.
func (s *Store) RepositoryExists(name string) (bool, error) {
	return s.exists(keyRepo(name))
}

// Repositories lists local repositories in lexical order, at most n of them
// (n <= 0: all) starting after last.
func (s *Store) Repositories(last string, n int) ([]string, error) {
	return s.list(keyRepoPrefix(), last, n)
}

// list returns the key suffixes after prefix, in order, after last.
func (s *Store) list(prefix []byte, last string, n int) ([]string, error) {
	var out []string
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.PrefetchValues = false
		o.Prefix = prefix
		it := txn.NewIterator(o)
		defer it.Close()
		start := prefix
		if last != "" {
			start = append(append(bytes.Clone(prefix), last...), 0) // first key after last
		}
		for it.Seek(start); it.ValidForPrefix(prefix); it.Next() {
			out = append(out, string(it.Item().Key()[len(prefix):]))
			if n > 0 && len(out) == n {
				break
			}
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, ErrClosed
	}
	return out, err
}

// HasContent reports whether ns/repo has any tag or link: for a proxied
// repository, whether anything was pulled through it.
func (s *Store) HasContent(ns, repo string) (bool, error) {
	found := false
	err := s.db.View(func(txn *badger.Txn) error {
		for _, prefix := range [][]byte{keyTagPrefix(ns, repo), keyLinkPrefix(ns, repo)} {
			o := badger.DefaultIteratorOptions
			o.PrefetchValues = false
			o.Prefix = prefix
			it := txn.NewIterator(o)
			it.Rewind()
			found = it.Valid()
			it.Close()
			if found {
				return nil
			}
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return false, ErrClosed
	}
	return found, err
}

// DeleteTagsOf removes the tags of ns/repo that point at d, and returns them.
func (s *Store) DeleteTagsOf(ns, repo string, d digest.Digest) ([]string, error) {
	prefix := keyTagPrefix(ns, repo)
	var deleted []string
	err := s.update(func(txn *badger.Txn) error {
		deleted = deleted[:0]
		o := badger.DefaultIteratorOptions
		o.Prefix = prefix
		it := txn.NewIterator(o)
		var keys [][]byte
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			err := item.Value(func(v []byte) error {
				t, err := decodeTag(v)
				if err == nil && t.Digest == d {
					keys = append(keys, item.KeyCopy(nil))
				}
				return nil
			})
			if err != nil {
				it.Close()
				return err
			}
		}
		it.Close()
		for _, k := range keys {
			if err := txn.Delete(k); err != nil {
				return err
			}
			deleted = append(deleted, string(k[len(prefix):]))
		}
		return nil
	})
	return deleted, err
}

// PutReferrer records that manifest d of ns/repo refers to subject; desc is
// d's descriptor as the referrers API lists it (JSON, kept as given).
func (s *Store) PutReferrer(ns, repo string, subject, d digest.Digest, desc []byte) error {
	return s.set(keyReferrer(ns, repo, subject, d), desc)
}

// DeleteReferrer removes what PutReferrer recorded. A missing entry is not
// an error.
func (s *Store) DeleteReferrer(ns, repo string, subject, d digest.Digest) error {
	err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(keyReferrer(ns, repo, subject, d)) })
	if errors.Is(err, badger.ErrDBClosed) {
		return ErrClosed
	}
	return err
}

// Referrers returns the descriptors recorded for subject in ns/repo, in
// digest order.
func (s *Store) Referrers(ns, repo string, subject digest.Digest) ([][]byte, error) {
	prefix := keyReferrerPrefix(ns, repo, subject)
	var out [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = prefix
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			out = append(out, v)
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, ErrClosed
	}
	return out, err
}

// PinBlob marks stored blob d as pushed: a local repository references it
// (through a mount), so the cache budget must never evict it.
func (s *Store) PinBlob(d digest.Digest) error {
	unlock := s.locks.Lock(string(d))
	defer unlock()
	info, err := s.StatBlob(d)
	if err != nil || info.Origin == OriginPushed {
		return err
	}
	info.Origin = OriginPushed
	return s.set(keyBlob(d), encodeBlob(info))
}
