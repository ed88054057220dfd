package push

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// Upload is the state of an upload session.
type Upload = cache.Upload

// permit refuses a write to a name outside the push prefixes.
func (m *Manager) permit(repo string) error {
	if m.readOnly {
		return fmt.Errorf("%w: pushes are disabled", ErrDenied)
	}
	if !m.Permits(repo) {
		return fmt.Errorf("%w: %q matches no push prefix (%s)", ErrDenied, repo, strings.Join(m.prefixes, ", "))
	}
	return nil
}

// StartUpload opens an upload session into repo.
func (m *Manager) StartUpload(repo string) (Upload, error) {
	if err := m.permit(repo); err != nil {
		return Upload{}, err
	}
	return m.store.CreateUpload(repo, m.ttl)
}

// Upload returns the state of upload id of repo. An upload of another
// repository, an unknown one and an expired one are all ErrUploadUnknown.
func (m *Manager) Upload(repo, id string) (Upload, error) {
	u, err := m.store.GetUpload(id)
	if errors.Is(err, cache.ErrNotFound) || (err == nil && u.Repo != repo) {
		return Upload{}, fmt.Errorf("%w: %s", ErrUploadUnknown, id)
	}
	return u, err
}

// WriteUpload appends a chunk to upload id. start, unless negative, is where
// the client says the chunk goes (it must be where the upload ends); length,
// unless negative, is how long it says the chunk is. A chunk that does not
// fit changes nothing.
func (m *Manager) WriteUpload(repo, id string, r io.Reader, start, length int64) (Upload, error) {
	if _, err := m.Upload(repo, id); err != nil {
		return Upload{}, err
	}
	u, err := m.store.AppendUpload(id, start, r, length, m.ttl)
	return u, storeErr(err)
}

// FinishUpload appends a last chunk (r may be nil, start and length as for
// WriteUpload) and commits the upload as blob d of repo, through the same
// per-digest guard as fills: bytes that do not match d are not stored, and
// an identical blob already stored means done. The session ends either way.
func (m *Manager) FinishUpload(repo, id string, d digest.Digest, r io.Reader, start, length int64) (cache.BlobInfo, error) {
	if _, err := m.Upload(repo, id); err != nil {
		return cache.BlobInfo{}, err
	}
	info, err := m.store.FinishUpload(id, start, r, length, d, cache.OriginPushed, m.ttl)
	if err != nil {
		return cache.BlobInfo{}, storeErr(err)
	}
	return info, m.linkBlob(repo, d)
}

// CancelUpload ends upload id and removes its bytes.
func (m *Manager) CancelUpload(repo, id string) error {
	if _, err := m.Upload(repo, id); err != nil {
		return err
	}
	return storeErr(m.store.DeleteUpload(id))
}

// PutBlob stores a blob sent whole (a single POST with ?digest=). length is
// -1 if the client did not say.
func (m *Manager) PutBlob(repo string, d digest.Digest, r io.Reader, length int64) (cache.BlobInfo, error) {
	if err := m.permit(repo); err != nil {
		return cache.BlobInfo{}, err
	}
	if !d.Algorithm().Available() {
		return cache.BlobInfo{}, fmt.Errorf("%w: digest algorithm %q is not available", ErrDigestInvalid, d.Algorithm())
	}
	if err := m.store.WriteDeclared(d, r, length, cache.OriginPushed); err != nil {
		return cache.BlobInfo{}, storeErr(err)
	}
	if err := m.linkBlob(repo, d); err != nil {
		return cache.BlobInfo{}, err
	}
	return m.store.StatBlob(d)
}

func (m *Manager) linkBlob(repo string, d digest.Digest) error {
	if err := m.store.Link("", repo, d); err != nil {
		return err
	}
	return m.store.AddRepository(repo)
}

// Source is where a cross-repository mount reads from: a repository under
// its namespace ("" for a local one, else the upstream host).
type Source = cache.MountSource

// Mount links blob d into repo without an upload, if the blob is stored and
// from may read it (from nil: an anonymous mount, allowed for pushed blobs).
// It reports false when it cannot: the client then uploads the blob.
func (m *Manager) Mount(repo string, d digest.Digest, from *Source) (bool, error) {
	if err := m.permit(repo); err != nil {
		return false, err
	}
	ok, err := m.store.Mount(repo, d, from)
	if err != nil || !ok {
		return false, err
	}
	return true, m.store.AddRepository(repo)
}

// storeErr turns cache errors about the content into push sentinels; the
// cache's own error is kept as text only, so callers see one sentinel.
func storeErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cache.ErrNotFound):
		return fmt.Errorf("%w: %v", ErrUploadUnknown, err)
	case errors.Is(err, cache.ErrUploadOffset):
		return fmt.Errorf("%w: %v", ErrRangeInvalid, err)
	case errors.Is(err, cache.ErrSizeMismatch):
		return fmt.Errorf("%w: %v", ErrSizeInvalid, err)
	case errors.Is(err, cache.ErrDigestMismatch), errors.Is(err, digest.ErrDigestInvalidFormat),
		errors.Is(err, digest.ErrDigestInvalidLength), errors.Is(err, digest.ErrDigestUnsupported):
		return fmt.Errorf("%w: %v", ErrDigestInvalid, err)
	case errors.Is(err, os.ErrNotExist):
		// The upload's bytes are gone (reaped): it cannot be finished.
		return fmt.Errorf("%w: %v", ErrUploadUnknown, err)
	}
	return err
}
