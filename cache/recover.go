package cache

import (
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// RecoverReport says what startup recovery found.
type RecoverReport struct {
	Blobs         int64 // indexed blobs after recovery
	Bytes         int64
	Manifests     int64 // stored manifests
	ManifestBytes int64
	TempRemoved   int           // leftover temp files removed
	Dropped       int           // index entries whose file was missing
	Adopted       int           // files without an entry whose digest verified
	Removed       int           // files without an entry that did not verify
	Dur           time.Duration // how long it took
}

// recover reconciles the index with the files, without re-hashing indexed
// blobs: temp files no upload session owns are removed (nothing else is
// writing yet), an entry without its file is dropped, a file without an
// entry is adopted if its digest verifies (a crash between rename and
// index) and removed otherwise. It also computes the running totals.
//
// Both sides are walked in digest order, the index by key and the blob
// directories by name, and merged, so memory stays flat with the number of
// blobs.
func (s *Store) recover() (RecoverReport, error) {
	start := time.Now()
	var r RecoverReport
	n, err := s.removeOrphanTemps()
	if err != nil {
		return r, err
	}
	r.TempRemoved = n
	if err := s.migrate(); err != nil {
		return r, err
	}
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA512} {
		if err := s.reconcile(alg, &r); err != nil {
			return r, err
		}
	}
	s.life.size.Store(r.Bytes)
	s.life.count.Store(r.Blobs)
	if err := s.countManifests(&r); err != nil {
		return r, err
	}
	s.life.mSize.Store(r.ManifestBytes)
	s.life.mCount.Store(r.Manifests)
	r.Dur = time.Since(start)
	if r.TempRemoved+r.Dropped+r.Adopted+r.Removed > 0 {
		s.log.Warn("recovered the data directory", "temp_removed", r.TempRemoved, "dropped", r.Dropped,
			"adopted", r.Adopted, "removed", r.Removed, "dur", r.Dur)
	}
	s.log.Debug("index loaded", "blobs", r.Blobs, "bytes", r.Bytes, "dur", r.Dur)
	return r, nil
}

func (s *Store) removeOrphanTemps() (int, error) {
	live, _, err := s.uploadTemps()
	if err != nil {
		return 0, err
	}
	entries, err := os.ReadDir(s.tmpDir())
	if err != nil {
		return 0, fmt.Errorf("cache: %w", err)
	}
	n := 0
	for _, e := range entries {
		if live[e.Name()] {
			continue
		}
		if os.RemoveAll(filepath.Join(s.tmpDir(), e.Name())) == nil {
			n++
		}
	}
	return n, nil
}

// blobFiles lists the blob files of alg in hex order. Anything else in
// the blob directories (a name that is not a digest of alg, a file where a
// directory belongs, a file in the wrong directory) is skipped with a
// warning and left alone: it is not the store's to remove.
func (s *Store) blobFiles(alg digest.Algorithm) (iter.Seq[string], error) {
	root := filepath.Join(s.dir, "blobs", string(alg))
	dirs, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return func(func(string) bool) {}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	junk := func(p string) { s.log.Warn("skipped a file that is not a blob in the blob directories", "path", p) }
	return func(yield func(string) bool) {
		// Directories are listed a few ahead, on another goroutine, while
		// the caller walks the index.
		lists := make(chan []string, 4)
		done := make(chan struct{})
		defer close(done)
		go func() {
			defer close(lists)
			for _, d := range dirs {
				dir := filepath.Join(root, d.Name())
				if !d.IsDir() || !isHex(d.Name(), 2) {
					junk(dir)
					continue
				}
				f, err := os.Open(dir)
				if err != nil {
					s.log.Warn("read blob directory", "err", err)
					continue
				}
				names, err := f.Readdirnames(-1)
				f.Close()
				if err != nil {
					s.log.Warn("read blob directory", "err", err)
					continue
				}
				ok := names[:0]
				for _, n := range names {
					if isHex(n, alg.Size()*2) && n[:2] == d.Name() {
						ok = append(ok, n)
					} else {
						junk(filepath.Join(dir, n))
					}
				}
				slices.Sort(ok)
				select {
				case lists <- ok:
				case <-done:
					return
				}
			}
		}()
		for names := range lists {
			for _, n := range names {
				if !yield(n) {
					return
				}
			}
		}
	}, nil
}

// isHex reports whether s is n lower-case hex digits.
func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func (s *Store) reconcile(alg digest.Algorithm, r *RecoverReport) error {
	files, err := s.blobFiles(alg)
	if err != nil {
		return err
	}
	next, stop := iter.Pull(files)
	defer stop()
	file, more := next()

	prefix := keyBlobsOf(alg)
	var drop [][]byte
	var adopt []string
	err = s.ix.view(func(txn *badger.Txn) error {
		// Values are small and inline: read in place.
		return each(txn, prefix, nil, false, func(item *badger.Item) error {
			hex := string(item.Key()[len(prefix):])
			for more && file < hex {
				adopt = append(adopt, file)
				file, more = next()
			}
			if more && file == hex {
				file, more = next()
				size := int64(-1)
				item.Value(func(v []byte) error {
					if info, err := decodeBlob("", v); err == nil {
						size = info.Size
					}
					return nil
				})
				if size < 0 {
					// An unreadable entry: index the file again if
					// it verifies.
					drop = append(drop, item.KeyCopy(nil))
					adopt = append(adopt, hex)
					return nil
				}
				r.Blobs++
				r.Bytes += size
				return nil
			}
			drop = append(drop, item.KeyCopy(nil))
			return nil
		})
	})
	if err != nil {
		return err
	}
	for more {
		adopt = append(adopt, file)
		file, more = next()
	}
	for _, k := range drop {
		// The file is gone: the entry goes, as an eviction would take it
		// (the links stay: a pull refills what a repository references).
		d := digestKey(k)
		err := s.ix.update(func(txn *badger.Txn) error {
			info, err := s.blobIn(txn, d)
			if err != nil {
				return txn.Delete(k)
			}
			_, err = dropBlob(txn, info, false)
			return err
		})
		if err != nil {
			return err
		}
		r.Dropped++
	}
	for _, hex := range adopt {
		d := digest.NewDigestFromEncoded(alg, hex)
		size, err := s.adopt(d)
		if err != nil {
			s.log.Warn("removed a blob file that was not indexed and does not verify", "digest", d, "err", err)
			os.Remove(s.blobPath(d))
			r.Removed++
			continue
		}
		r.Adopted++
		r.Blobs++
		r.Bytes += size
	}
	return nil
}

// adopt indexes a blob file that has no entry if its bytes match its name.
func (s *Store) adopt(d digest.Digest) (int64, error) {
	if err := d.Validate(); err != nil || strings.ToLower(d.Encoded()) != d.Encoded() {
		return 0, fmt.Errorf("not a digest: %q", d)
	}
	f, err := os.Open(s.blobPath(d))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	h := d.Algorithm().Hash()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, err
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return 0, fmt.Errorf("%w: got %s", ErrDigestMismatch, got)
	}
	return n, s.ix.set(keyBlob(d), encodeBlob(BlobInfo{Digest: d, Size: n, Origin: OriginPulled, StoredAt: s.now()}))
}

// countManifests adds up the stored manifests for the running totals,
// reading each value's header (in place: values are inline, but for
// manifests over a MiB).
func (s *Store) countManifests(r *RecoverReport) error {
	return s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixManifest), nil, false, func(item *badger.Item) error {
			r.Manifests++
			return item.Value(func(v []byte) error {
				r.ManifestBytes += manifestSize(v)
				return nil
			})
		})
	})
}

// migrate brings an index written by an older slipway up to indexVersion:
// version 2 added the 'R' keys, which are rebuilt from the 'l', 't' and
// 'm' keys they mirror. Until it is done nothing is collected, since
// nothing else writes yet.
func (s *Store) migrate() error {
	v, err := s.ix.get(keyVersion())
	if err == nil && len(v) == 1 && v[0] >= indexVersion {
		return nil
	}
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	start := time.Now()
	var refs [][]byte
	err = s.ix.view(func(txn *badger.Txn) error {
		if err := each(txn, keyAll(prefixLink), nil, false, func(item *badger.Item) error {
			if ns, repo, d, ok := parseLinkKey(item.Key()); ok {
				refs = append(refs, keyLinkRef(ns, repo, d))
			}
			return nil
		}); err != nil {
			return err
		}
		if err := each(txn, keyAll(prefixTag), nil, true, func(item *badger.Item) error {
			ns, repo, tag, ok := parseTagKey(item.Key())
			if !ok {
				return nil
			}
			return item.Value(func(v []byte) error {
				if t, err := decodeTag(v); err == nil {
					refs = append(refs, keyTagRef(ns, repo, tag, t.Digest))
				}
				return nil
			})
		}); err != nil {
			return err
		}
		return each(txn, keyAll(prefixManifest), nil, true, func(item *badger.Item) error {
			d := digestKey(item.Key())
			return item.Value(func(v []byte) error {
				m, err := decodeManifest(d, v)
				if err != nil {
					return nil
				}
				held, _, err := References(m.Bytes)
				if err != nil {
					return nil
				}
				for _, h := range held {
					refs = append(refs, keyHolder(h.Digest, d))
				}
				return nil
			})
		})
	})
	if err != nil {
		return err
	}
	err = s.ix.batch(func(wb *badger.WriteBatch) error {
		for _, k := range refs {
			if err := wb.Set(k, nil); err != nil {
				return err
			}
		}
		return wb.Set(keyVersion(), []byte{indexVersion})
	})
	if err != nil {
		return fmt.Errorf("cache: migrate the index to version %d: %w", indexVersion, err)
	}
	if len(refs) > 0 {
		s.log.Info("index migrated", "version", indexVersion, "references", len(refs), "dur", time.Since(start))
	}
	return nil
}
