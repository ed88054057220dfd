package cache

import (
	"errors"
	"regexp"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Answers of an upstream that are not content: a repository's tag list and
// the referrers index of a subject, each kept with when it was fetched, so
// that they are served within their freshness window and stale while the
// upstream is down. GC drops them once the repository (or the subject in
// it) holds nothing any more and they are older than the grace.

// tagName is the distribution grammar for a tag.
var tagName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// SetTagList records ns/repo's tag list as the upstream gave it at at.
// Names that are not tags are dropped.
func (s *Store) SetTagList(ns, repo string, tags []string, at time.Time) error {
	valid := make([]string, 0, len(tags))
	for _, t := range tags {
		if tagName.MatchString(t) {
			valid = append(valid, t)
		}
	}
	return s.ix.set(keyTagList(ns, repo), encodeTagList(valid, at))
}

// TagList returns ns/repo's recorded tag list and when it was fetched, or
// ErrNotFound.
func (s *Store) TagList(ns, repo string) ([]string, time.Time, error) {
	v, err := s.ix.get(keyTagList(ns, repo))
	if err != nil {
		return nil, time.Time{}, err
	}
	return decodeTagList(v)
}

// SetReferrers records the referrers index the upstream gave for subject
// in ns/repo at at.
func (s *Store) SetReferrers(ns, repo string, subject digest.Digest, index []byte, at time.Time) error {
	return s.ix.set(keyRefIndex(ns, repo, subject), encodeFetched(index, at))
}

// CachedReferrers returns the recorded referrers index of subject in
// ns/repo and when it was fetched, or ErrNotFound.
func (s *Store) CachedReferrers(ns, repo string, subject digest.Digest) ([]byte, time.Time, error) {
	v, err := s.ix.get(keyRefIndex(ns, repo, subject))
	if err != nil {
		return nil, time.Time{}, err
	}
	return decodeFetched(v)
}

// pruneFetched drops tag lists of repositories that hold nothing and
// referrers indexes of subjects their repository does not link, when they
// were fetched before cutoff.
func (s *Store) pruneFetched(cutoff int64) (int, error) {
	var stale [][]byte
	err := s.ix.view(func(txn *badger.Txn) error {
		old := func(item *badger.Item) bool {
			at := int64(-1)
			item.Value(func(v []byte) error {
				if t, ok := decodeTime(v[:min(len(v), 8)]); ok {
					at = t
				}
				return nil
			})
			return at < cutoff
		}
		err := each(txn, keyAll(prefixTagList), nil, false, func(item *badger.Item) error {
			p := splitKey(item.Key())
			if len(p) != 2 || !old(item) {
				return nil
			}
			if !anyWithPrefix(txn, keyTagPrefix(p[0], p[1])) && !anyWithPrefix(txn, keyLinkPrefix(p[0], p[1])) {
				stale = append(stale, item.KeyCopy(nil))
			}
			return nil
		})
		if err != nil {
			return err
		}
		return each(txn, keyAll(prefixRefIndex), nil, false, func(item *badger.Item) error {
			p := splitKey(item.Key())
			if len(p) != 3 || !old(item) {
				return nil
			}
			linked, err := hasIn(txn, keyLink(p[0], p[1], digest.Digest(p[2])))
			if err == nil && !linked {
				stale = append(stale, item.KeyCopy(nil))
			}
			return err
		})
	})
	if err != nil || len(stale) == 0 {
		return 0, err
	}
	err = s.ix.batch(func(wb *badger.WriteBatch) error {
		for _, k := range stale {
			if err := wb.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		err = nil
	}
	return len(stale), err
}
