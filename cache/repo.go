package cache

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
)

// Local repositories (pushed to, ns ""): their existence, what they hold,
// mounts into them, the referrers of their manifests, and removals.

// AddRepository records that local repository name exists. Adding it again
// keeps the first creation time.
func (s *Store) AddRepository(name string) error {
	if s.shared != nil {
		ctx, cancel := tierCtx()
		defer cancel()
		if err := s.shared.AddRepository(ctx, name); err != nil {
			return sharedErr(err)
		}
		s.absent.forget(name)
	}
	return s.ix.update(func(txn *badger.Txn) error {
		k := keyRepo(name)
		if ok, err := hasIn(txn, k); err != nil || ok {
			return err
		}
		return txn.Set(k, encodeTime(s.now().UnixNano()))
	})
}

// RepositoryExists reports whether local repository name exists.
// In a fleet, one another replica created exists too; a name the shared
// tier does not know is remembered as absent for a moment (routing asks of
// every name).
func (s *Store) RepositoryExists(name string) (bool, error) {
	ok, err := s.repos.get(name, func() (bool, error) { return s.ix.has(keyRepo(name)) })
	if err != nil || ok || s.shared == nil {
		return ok, err
	}
	now := time.Now()
	if s.absent.absent(name, now) {
		return false, nil
	}
	ctx, cancel := tierCtx()
	defer cancel()
	ok, err = s.shared.RepositoryExists(ctx, name)
	if down(err) {
		return false, nil
	}
	if err == nil && !ok {
		s.absent.note(name, now)
	}
	return ok, sharedErr(err)
}

// Repositories lists local repositories in lexical order, at most n of them
// (n <= 0: all) starting after last.
func (s *Store) Repositories(last string, n int) ([]string, error) {
	if s.shared != nil {
		ctx, cancel := tierCtx()
		defer cancel()
		repos, err := s.shared.Repositories(ctx)
		if !down(err) {
			return page(repos, last, n), sharedErr(err)
		}
	}
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
	if s.shared != nil {
		if info, err, ok := s.sharedLocalBlob(repo, d); ok {
			return info, err
		}
	}
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

// sharedLocalBlob is LocalBlob in a fleet: the shared tier says whether
// repo holds d (and, if this replica has no copy, its size). ok is false
// when the tier is down: then this replica's own view answers.
func (s *Store) sharedLocalBlob(repo string, d digest.Digest) (BlobInfo, error, bool) {
	ctx, cancel := tierCtx()
	defer cancel()
	linked, err := s.shared.Linked(ctx, repo, d)
	if down(err) {
		return BlobInfo{}, nil, false
	}
	if err != nil || !linked {
		return BlobInfo{}, errors.Join(sharedErr(err), ErrNotFound), true
	}
	if info, err := s.StatBlob(d); err == nil {
		s.Touch(d)
		return info, nil, true
	}
	ti, err := s.shared.StatBlob(ctx, d)
	if down(err) {
		return BlobInfo{}, nil, false
	}
	if err != nil {
		return BlobInfo{}, sharedErr(err), true
	}
	return BlobInfo{Digest: d, Size: ti.Size, Origin: OriginPushed, StoredAt: ti.Modified}, nil, true
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
	if s.shared != nil {
		return s.sharedMount(repo, d, from)
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

// sharedMount is Mount in a fleet: the source is checked where it lives
// (a local repository in the shared tier, a proxied one here), the blob
// is put into the shared tier if it is not there, and linked there.
func (s *Store) sharedMount(repo string, d digest.Digest, from *MountSource) (bool, error) {
	ctx, cancel := tierCtx()
	defer cancel()
	switch {
	case from == nil:
		// An anonymous mount: only of what some local repository pushed
		// here, as when alone.
		info, err := s.StatBlob(d)
		if err != nil || info.Origin != OriginPushed {
			return false, nil
		}
	case from.NS == "":
		ok, err := s.shared.Linked(ctx, from.Repo, d)
		if err != nil || !ok {
			return false, sharedErr(err)
		}
	default:
		if ok, err := s.ix.has(keyLink(from.NS, from.Repo, d)); err != nil || !ok {
			return false, err
		}
	}
	if _, err := s.shared.StatBlob(ctx, d); errors.Is(err, tier.ErrNotFound) {
		if _, err := os.Stat(s.blobPath(d)); err != nil {
			return false, nil // nowhere to mount it from
		}
		if err := s.ensureShared(d); err != nil {
			return false, err
		}
	} else if err != nil {
		return false, sharedErr(err)
	}
	if err := s.shared.Link(ctx, repo, d); err != nil {
		return false, sharedErr(err)
	}
	if err := s.ix.update(func(txn *badger.Txn) error { return link(txn, "", repo, d) }); err != nil {
		return false, err
	}
	s.Touch(d)
	return true, nil
}

// RemoveFromRepository takes d out of ns/repo: its link, the tags of
// ns/repo that point at it and, if d is a manifest with a subject, its
// referrer entry. It returns the tags it removed; a d the repository does
// not link is ErrNotFound. The content stays while anything else keeps it
// (see live.go); GC reclaims it.
func (s *Store) RemoveFromRepository(ns, repo string, d digest.Digest) ([]string, error) {
	if s.shared != nil && ns == "" {
		if err := s.sharedRemove(repo, d); err != nil {
			return nil, err
		}
	}
	defer s.locks.Lock(string(d))()
	var tags []string
	err := s.ix.update(func(txn *badger.Txn) error {
		tags = tags[:0]
		ok, err := unlink(txn, ns, repo, d)
		if err != nil {
			return err
		}
		if !ok && s.shared == nil {
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

// sharedRemove takes d out of local repository repo in the shared tier:
// its tags, its referrer entry, its link.
func (s *Store) sharedRemove(repo string, d digest.Digest) error {
	ctx, cancel := tierCtx()
	defer cancel()
	linked, err := s.shared.Linked(ctx, repo, d)
	if err != nil {
		return sharedErr(err)
	}
	if !linked {
		return ErrNotFound
	}
	tags, err := s.shared.Tags(ctx, repo)
	if err != nil {
		return sharedErr(err)
	}
	for _, tag := range tags {
		if td, err := s.shared.Tag(ctx, repo, tag); err == nil && td == d {
			if err := s.shared.DeleteTag(ctx, repo, tag); err != nil {
				return sharedErr(err)
			}
		}
	}
	if m, err := s.GetManifest(d); err == nil {
		if subject, _, ok := Referrer(m); ok {
			if err := s.shared.DeleteReferrer(ctx, repo, subject, d); err != nil {
				return sharedErr(err)
			}
		}
	}
	return sharedErr(s.shared.Unlink(ctx, repo, d))
}
