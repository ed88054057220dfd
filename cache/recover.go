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
	Blobs       int64 // indexed blobs after recovery
	Bytes       int64
	TempRemoved int           // leftover temp files removed
	Dropped     int           // index entries whose file was missing
	Adopted     int           // files without an entry whose digest verified
	Removed     int           // files without an entry that did not verify
	Dur         time.Duration // how long it took
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
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA512} {
		if err := s.reconcile(alg, &r); err != nil {
			return r, err
		}
	}
	s.life.size.Store(r.Bytes)
	s.life.count.Store(r.Blobs)
	r.Dur = time.Since(start)
	if r.TempRemoved+r.Dropped+r.Adopted+r.Removed > 0 {
		s.log.Warn("recovered the data directory", "temp_removed", r.TempRemoved, "dropped", r.Dropped,
			"adopted", r.Adopted, "removed", r.Removed, "dur", r.Dur)
	}
	s.log.Debug("index loaded", "blobs", r.Blobs, "bytes", r.Bytes, "dur", r.Dur)
	return r, nil
}

func (s *Store) removeOrphanTemps() (int, error) {
	live := map[string]bool{}
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = keyUploadPrefix()
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			id := string(it.Item().Key()[1:])
			it.Item().Value(func(v []byte) error {
				if u, err := decodeUpload(id, v); err == nil {
					live[u.temp] = true
				}
				return nil
			})
		}
		return nil
	})
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

// blobFiles lists the blob files of alg in hex order.
func (s *Store) blobFiles(alg digest.Algorithm) (iter.Seq[string], error) {
	root := filepath.Join(s.dir, "blobs", string(alg))
	dirs, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return func(func(string) bool) {}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	return func(yield func(string) bool) {
		// Directories are listed a few ahead, on another goroutine, while
		// the caller walks the index.
		lists := make(chan []string, 4)
		done := make(chan struct{})
		defer close(done)
		go func() {
			defer close(lists)
			for _, d := range dirs {
				if !d.IsDir() {
					continue
				}
				f, err := os.Open(filepath.Join(root, d.Name()))
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
				slices.Sort(names)
				select {
				case lists <- names:
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

func (s *Store) reconcile(alg digest.Algorithm, r *RecoverReport) error {
	files, err := s.blobFiles(alg)
	if err != nil {
		return err
	}
	next, stop := iter.Pull(files)
	defer stop()
	file, more := next()

	prefix := []byte{prefixBlob}
	prefix = append(prefix, alg...)
	prefix = append(prefix, ':')
	var drop [][]byte
	var adopt []string
	err = s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = prefix
		o.PrefetchValues = false // values are small and inline: read in place
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			hex := string(it.Item().Key()[len(prefix):])
			for more && file < hex {
				adopt = append(adopt, file)
				file, more = next()
			}
			if more && file == hex {
				file, more = next()
				size := int64(-1)
				it.Item().Value(func(v []byte) error {
					if info, err := decodeBlob("", v); err == nil {
						size = info.Size
					}
					return nil
				})
				if size < 0 {
					// An unreadable entry: index the file again if
					// it verifies.
					drop = append(drop, it.Item().KeyCopy(nil))
					adopt = append(adopt, hex)
					continue
				}
				r.Blobs++
				r.Bytes += size
				continue
			}
			drop = append(drop, it.Item().KeyCopy(nil))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for more {
		adopt = append(adopt, file)
		file, more = next()
	}
	if len(drop) > 0 {
		wb := s.db.NewWriteBatch()
		for _, k := range drop {
			wb.Delete(k)
			wb.Delete(keyAccess(digest.Digest(k[1:])))
		}
		if err := wb.Flush(); err != nil {
			return err
		}
		r.Dropped += len(drop)
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
	return n, s.set(keyBlob(d), encodeBlob(BlobInfo{Digest: d, Size: n, Origin: OriginPulled, StoredAt: s.now()}))
}
