package cache

import (
	"errors"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// The graph of references between repositories, tags, manifests and what
// the manifests hold. Each function writes a forward key and its 'R'
// mirror in the caller's transaction, so the two never disagree.

func link(txn *badger.Txn, ns, repo string, d digest.Digest) error {
	if err := txn.Set(keyLink(ns, repo, d), nil); err != nil {
		return err
	}
	return txn.Set(keyLinkRef(ns, repo, d), nil)
}

// unlink removes the link of ns/repo to d; false if there was none.
func unlink(txn *badger.Txn, ns, repo string, d digest.Digest) (bool, error) {
	ok, err := hasIn(txn, keyLink(ns, repo, d))
	if err != nil || !ok {
		return false, err
	}
	if err := txn.Delete(keyLink(ns, repo, d)); err != nil {
		return false, err
	}
	return true, txn.Delete(keyLinkRef(ns, repo, d))
}

// setTag points ns/repo:tag at t.Digest.
func setTag(txn *badger.Txn, ns, repo, tag string, t Tag) error {
	if _, err := deleteTag(txn, ns, repo, tag); err != nil {
		return err
	}
	if err := txn.Set(keyTag(ns, repo, tag), encodeTag(t)); err != nil {
		return err
	}
	return txn.Set(keyTagRef(ns, repo, tag, t.Digest), nil)
}

// deleteTag removes ns/repo:tag; false if there was none.
func deleteTag(txn *badger.Txn, ns, repo, tag string) (bool, error) {
	v, err := getIn(txn, keyTag(ns, repo, tag))
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if old, err := decodeTag(v); err == nil {
		if err := txn.Delete(keyTagRef(ns, repo, tag, old.Digest)); err != nil {
			return false, err
		}
	}
	return true, txn.Delete(keyTag(ns, repo, tag))
}

// putHolds records that manifest m holds each of held.
func putHolds(txn *badger.Txn, m digest.Digest, held []Ref) error {
	for _, r := range held {
		if err := txn.Set(keyHolder(r.Digest, m), nil); err != nil {
			return err
		}
	}
	return nil
}

// refsOf lists what refers to d: the manifests that hold it, the
// repositories that link it, the tags that point at it.
func refsOf(txn *badger.Txn, d digest.Digest) ([]ref, error) {
	var out []ref
	err := each(txn, keyRefsOf(d), nil, false, func(item *badger.Item) error {
		if _, r, ok := parseRefKey(item.Key()); ok {
			out = append(out, r)
		}
		return nil
	})
	return out, err
}
