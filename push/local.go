package push

import (
	"errors"
	"fmt"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// Reads, listings and deletes of local repositories. Content is served
// under a repository only if that repository references it.

// Manifest returns manifest ref (a tag or a digest) of repo.
func (m *Manager) Manifest(repo, ref string) (cache.Manifest, error) {
	d, err := m.resolve(repo, ref)
	if err != nil {
		return cache.Manifest{}, err
	}
	man, err := m.store.GetManifest(d)
	if errors.Is(err, cache.ErrNotFound) {
		return cache.Manifest{}, fmt.Errorf("%w: %s", ErrManifestUnknown, ref)
	}
	return man, err
}

// resolve turns ref into the digest of a manifest repo references.
func (m *Manager) resolve(repo, ref string) (digest.Digest, error) {
	d, err := digest.Parse(ref)
	if err != nil {
		t, err := m.store.GetTag("", repo, ref)
		if errors.Is(err, cache.ErrNotFound) {
			return "", fmt.Errorf("%w: tag %s", ErrManifestUnknown, ref)
		}
		return t.Digest, err
	}
	ok, err := m.store.Linked("", repo, d)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("%w: %s", ErrManifestUnknown, d)
	}
	return d, nil
}

// StatBlob returns blob d of repo's index entry: repo must hold it as
// pushed content (see cache.Store.LocalBlob).
func (m *Manager) StatBlob(repo string, d digest.Digest) (cache.BlobInfo, error) {
	info, err := m.store.LocalBlob(repo, d)
	if errors.Is(err, cache.ErrNotFound) {
		return cache.BlobInfo{}, fmt.Errorf("%w: %s", ErrBlobUnknown, d)
	}
	return info, err
}

// Blob opens blob d of repo. The caller closes the file. In a fleet, a
// blob repo holds that this replica has no copy of is ErrBlobNotHere: the
// shared tier has it.
func (m *Manager) Blob(repo string, d digest.Digest) (*os.File, cache.BlobInfo, error) {
	if _, err := m.StatBlob(repo, d); err != nil {
		return nil, cache.BlobInfo{}, err
	}
	f, info, err := m.store.OpenBlob(d)
	if errors.Is(err, cache.ErrNotFound) {
		if m.store.Shared() != nil {
			return nil, cache.BlobInfo{}, fmt.Errorf("%w: %s", ErrBlobNotHere, d)
		}
		return nil, cache.BlobInfo{}, fmt.Errorf("%w: %s", ErrBlobUnknown, d)
	}
	return f, info, err
}

// Tags lists repo's tags in lexical order: at most n (n < 0: all) after
// last.
func (m *Manager) Tags(repo, last string, n int) ([]string, error) {
	if err := m.mustExist(repo); err != nil {
		return nil, err
	}
	if n == 0 {
		return []string{}, nil
	}
	tags, err := m.store.Tags("", repo, last, max(n, 0))
	if tags == nil {
		tags = []string{}
	}
	return tags, err
}

func (m *Manager) mustExist(repo string) error {
	ok, err := m.store.RepositoryExists(repo)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: %s", ErrNameUnknown, repo)
	}
	return nil
}

// Repositories lists the local repositories in lexical order: at most n
// (n < 0: all) after last.
func (m *Manager) Repositories(last string, n int) ([]string, error) {
	if n == 0 {
		return []string{}, nil
	}
	repos, err := m.store.Repositories(last, max(n, 0))
	if repos == nil {
		repos = []string{}
	}
	return repos, err
}

// Referrers returns the OCI index of the manifests in repo whose subject is
// subject, only those of artifactType if it is not empty. A repository or
// subject nobody referred to has an empty list.
func (m *Manager) Referrers(repo string, subject digest.Digest, artifactType string) (v1.IndexManifest, error) {
	descs, err := m.store.ReferrerDescriptors("", repo, subject)
	if err != nil {
		return v1.IndexManifest{}, err
	}
	return cache.ReferrersIndex(descs, artifactType), nil
}

// DeleteManifest removes ref from repo: a tag is untagged; a digest is
// unlinked, with the tags that point at it and its referrer entry.
func (m *Manager) DeleteManifest(repo, ref string) error {
	if err := m.permit(repo); err != nil {
		return err
	}
	d, err := digest.Parse(ref)
	if err != nil {
		if err := m.store.DeleteTag("", repo, ref); errors.Is(err, cache.ErrNotFound) {
			return fmt.Errorf("%w: tag %s", ErrManifestUnknown, ref)
		} else if err != nil {
			return err
		}
		return nil
	}
	if _, err := m.Manifest(repo, ref); err != nil {
		return err
	}
	_, err = m.store.RemoveFromRepository("", repo, d)
	if errors.Is(err, cache.ErrNotFound) {
		return fmt.Errorf("%w: %s", ErrManifestUnknown, d)
	}
	return err
}

// DeleteBlob removes blob d from repo. The bytes stay while anything else
// references them; gc reclaims them.
func (m *Manager) DeleteBlob(repo string, d digest.Digest) error {
	if err := m.permit(repo); err != nil {
		return err
	}
	if _, err := m.StatBlob(repo, d); err != nil {
		return err
	}
	return m.store.Unlink("", repo, d)
}
