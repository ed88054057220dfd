package cache

import (
	"errors"
	"fmt"
	"os"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Local repositories (pushed to, ns ""): their existence, what they hold,
// mounts into them, the referrers of their manifests, and removals.

// AddRepository records that local repository name exists. Adding it again
// keeps the first creation time.
func (s *Store) AddRepository(name string) error {
	return s.ix.update(func(txn *badger.Txn) error {
		k := keyRepo(name)
		if ok, err := hasIn(txn, k); err != nil || ok {
			return err
		}
		return txn.Set(k, encodeTime(s.now().UnixNano()))
	})
}

// RepositoryExists reports whether local repository name exists.
func (s *Store) RepositoryExists(name string) (bool, error) {
	return s.ix.has(keyRepo(name))
}

// Repositories lists local repositories in lexical order, at most n of them
// (n <= 0: all) starting after last.
func (s *Store) Repositories(last string, n int) ([]string, error) {
	return s.ix.keysWithPrefix(keyAll(prefixRepo), last, n)
}

// HasContent reports whether ns/repo has any tag or link: for a proxied
// repository, whether anything was pulled through it.
func (s *Store) HasContent(ns, repo string) (bool, error) {
	found := false
	err := s.ix.view(func(txn *badger.Txn) error {
		found = anyWithPrefix(txn, keyTagPrefix(ns, repo)) || anyWithPrefix(txn, keyLinkPrefix(ns, repo))
		return nil
	})
	return found, err
}

// blobIn reads blob d's entry in txn.
func (s *Store) blobIn(txn *badger.Txn, d digest.Digest) (BlobInfo, error) {
	v, err := getIn(txn, keyBlob(d))
	if err != nil {
		return BlobInfo{}, err
	}
	return decodeBlob(d, v)
}

// LocalBlob returns blob d of local repository repo: it must be linked
// there and stored as pushed content (a link left to a blob that GC
// removed, and that a pull then brought back as pulled content, does not
// count: the budget could evict that). Asking counts as a use, so the
// manifest a client pushes after a HEAD that said "you need not upload
// this" finds it within the grace.
func (s *Store) LocalBlob(repo string, d digest.Digest) (BlobInfo, error) {
	defer s.locks.Lock(string(d))()
	var info BlobInfo
	err := s.ix.view(func(txn *badger.Txn) error {
		linked, err := hasIn(txn, keyLink("", repo, d))
		if err != nil {
			return err
		}
		if !linked {
			return ErrNotFound
		}
		info, err = s.blobIn(txn, d)
		if err == nil && info.Origin != OriginPushed {
			err = ErrNotFound
		}
		return err
	})
	if err != nil {
		return BlobInfo{}, err
	}
	s.Touch(d)
	return info, nil
}

// MountSource is the repository a cross-repository mount reads from: ns ""
// for a local one, else the upstream host.
type MountSource struct {
	NS, Repo string
}

// Mount links stored blob d into local repository repo without an upload,
// if from may read it (from nil: an anonymous mount, allowed for pushed
// blobs). The blob becomes pushed content (never evicted) and the mount
// counts as a use. It reports false when it cannot mount: the client then
// uploads the blob.
func (s *Store) Mount(repo string, d digest.Digest, from *MountSource) (bool, error) {
	if err := d.Validate(); err != nil {
		return false, nil
	}
	defer s.locks.Lock(string(d))()
	if _, err := os.Stat(s.blobPath(d)); err != nil {
		return false, nil
	}
	mounted := false
	err := s.ix.update(func(txn *badger.Txn) error {
		mounted = false
		info, err := s.blobIn(txn, d)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if from == nil || from.NS == "" {
			if info.Origin != OriginPushed {
				return nil
			}
		}
		if from != nil {
			if ok, err := hasIn(txn, keyLink(from.NS, from.Repo, d)); err != nil || !ok {
				return err
			}
		}
		if info.Origin != OriginPushed {
			info.Origin = OriginPushed
			if err := txn.Set(keyBlob(d), encodeBlob(info)); err != nil {
				return err
			}
		}
		if err := link(txn, "", repo, d); err != nil {
			return err
		}
		mounted = true
		return s.renew(txn, d)
	})
	return mounted, err
}

// RemoveFromRepository takes d out of ns/repo: its link, the tags of
// ns/repo that point at it and, if d is a manifest with a subject, its
// referrer entry. It returns the tags it removed; a d the repository does
// not link is ErrNotFound. The content stays while anything else keeps it
// (see live.go); GC reclaims it.
func (s *Store) RemoveFromRepository(ns, repo string, d digest.Digest) ([]string, error) {
	defer s.locks.Lock(string(d))()
	var tags []string
	err := s.ix.update(func(txn *badger.Txn) error {
		tags = tags[:0]
		ok, err := unlink(txn, ns, repo, d)
		if err != nil {
			return err
		}
		if !ok {
			return ErrNotFound
		}
		refs, err := refsOf(txn, d)
		if err != nil {
			return err
		}
		for _, r := range refs {
			if r.kind == refTag && r.ns == ns && r.repo == repo {
				if _, err := deleteTag(txn, ns, repo, r.tag); err != nil {
					return err
				}
				tags = append(tags, r.tag)
			}
		}
		v, err := getIn(txn, keyManifest(d))
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		m, err := decodeManifest(d, v)
		if err != nil {
			return nil
		}
		if _, subject, err := References(m.Bytes); err == nil && subject != "" {
			return txn.Delete(keyReferrer(ns, repo, subject, d))
		}
		return nil
	})
	return tags, err
}

// Referrers returns the descriptors recorded for subject in ns/repo, in
// digest order.
func (s *Store) Referrers(ns, repo string, subject digest.Digest) ([][]byte, error) {
	var out [][]byte
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyReferrerPrefix(ns, repo, subject), nil, true, func(item *badger.Item) error {
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			out = append(out, v)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cache: referrers of %s: %w", subject, err)
	}
	return out, nil
}
