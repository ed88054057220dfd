package cache

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Resumable uploads. A push session's bytes live in a temp file under tmp/;
// its state (repository, bytes so far, the running sha256 state) lives in
// badger under 'u' with a TTL. So an upload goes on after a restart, an
// abandoned one vanishes by itself, and ReapUploads removes its file. A
// finished upload is committed through the same commitFile as every other
// writer: one per-digest lock, "already stored" means done.

// ErrUploadOffset is returned when a chunk does not start where the upload
// ends.
var ErrUploadOffset = errors.New("cache: chunk does not continue the upload")

// Upload is the state of a resumable upload.
type Upload struct {
	ID        string
	Repo      string // the repository it will be linked into
	Size      int64  // bytes received so far
	StartedAt time.Time
}

type uploadState struct {
	Upload
	temp string // file name under tmp/
	hash []byte // sha256 state after Size bytes (encoding.BinaryMarshaler)
}

// uploadValue: size (8) | started, unix nanos (8) | repo length (2) | repo |
// temp length (1) | temp | sha256 state.
func encodeUpload(u uploadState) []byte {
	v := make([]byte, 0, 19+len(u.Repo)+len(u.temp)+len(u.hash))
	v = binary.BigEndian.AppendUint64(v, uint64(u.Size))
	v = binary.BigEndian.AppendUint64(v, uint64(u.StartedAt.UnixNano()))
	v = binary.BigEndian.AppendUint16(v, uint16(len(u.Repo)))
	v = append(v, u.Repo...)
	v = append(v, byte(len(u.temp)))
	v = append(v, u.temp...)
	return append(v, u.hash...)
}

func decodeUpload(id string, v []byte) (uploadState, error) {
	if len(v) < 19 {
		return uploadState{}, errCorruptValue
	}
	u := uploadState{Upload: Upload{
		ID:        id,
		Size:      int64(binary.BigEndian.Uint64(v[0:8])),
		StartedAt: time.Unix(0, int64(binary.BigEndian.Uint64(v[8:16]))),
	}}
	n := int(binary.BigEndian.Uint16(v[16:18]))
	v = v[18:]
	if len(v) < n+1 {
		return uploadState{}, errCorruptValue
	}
	u.Repo, v = string(v[:n]), v[n:]
	n, v = int(v[0]), v[1:]
	if len(v) < n {
		return uploadState{}, errCorruptValue
	}
	u.temp, u.hash = string(v[:n]), append([]byte(nil), v[n:]...)
	return u, nil
}

// uploadLock serializes the requests of one upload. Its key cannot collide
// with a digest's.
func (s *Store) uploadLock(id string) func() { return s.locks.Lock("u\x00" + id) }

// CreateUpload starts an upload into repo that expires ttl after its last
// write (never, if ttl <= 0). Its id comes from crypto/rand.
func (s *Store) CreateUpload(repo string, ttl time.Duration) (Upload, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return Upload{}, err
	}
	path, f, err := s.createTemp()
	if err != nil {
		return Upload{}, err
	}
	f.Close()
	state, err := sha256.New().(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		os.Remove(path)
		return Upload{}, err
	}
	u := uploadState{
		Upload: Upload{ID: hex.EncodeToString(b[:]), Repo: repo, StartedAt: s.now()},
		temp:   filepath.Base(path),
		hash:   state,
	}
	if err := s.putUpload(u, ttl); err != nil {
		os.Remove(path)
		return Upload{}, err
	}
	return u.Upload, nil
}

func (s *Store) putUpload(u uploadState, ttl time.Duration) error {
	e := badger.NewEntry(keyUpload(u.ID), encodeUpload(u))
	if ttl > 0 {
		// badger keeps expiry in whole seconds, rounded down: add one so
		// an upload lives at least ttl.
		e = e.WithTTL(ttl + time.Second)
	}
	err := s.db.Update(func(txn *badger.Txn) error { return txn.SetEntry(e) })
	if errors.Is(err, badger.ErrDBClosed) {
		return ErrClosed
	}
	return err
}

func (s *Store) getUpload(id string) (uploadState, error) {
	v, err := s.get(keyUpload(id))
	if err != nil {
		return uploadState{}, err
	}
	return decodeUpload(id, v)
}

// GetUpload returns the state of upload id, or ErrNotFound (also once it
// expired).
func (s *Store) GetUpload(id string) (Upload, error) {
	u, err := s.getUpload(id)
	return u.Upload, err
}

// AppendUpload appends r to upload id and renews its ttl. offset, unless
// negative, must be where the upload ends (else ErrUploadOffset); want,
// unless negative, is how many bytes r must yield (else ErrSizeMismatch).
// Either the whole chunk is recorded or none of it: a failed or short chunk
// leaves the upload as it was.
func (s *Store) AppendUpload(id string, offset int64, r io.Reader, want int64, ttl time.Duration) (Upload, error) {
	defer s.uploadLock(id)()
	u, err := s.getUpload(id)
	if err != nil {
		return Upload{}, err
	}
	if err := s.appendLocked(&u, offset, r, want, ttl, true); err != nil {
		return Upload{}, err
	}
	return u.Upload, nil
}

// appendLocked writes a chunk. With persist, the chunk is fsynced and the
// new state stored, so that the upload resumes after a crash; a last
// chunk, committed at once, skips both: the commit fsyncs the file if it
// is the first copy of its blob and drops it, unsynced, if it is not.
func (s *Store) appendLocked(u *uploadState, offset int64, r io.Reader, want int64, ttl time.Duration, persist bool) error {
	if offset >= 0 && offset != u.Size {
		return fmt.Errorf("%w: chunk starts at %d, upload has %d bytes", ErrUploadOffset, offset, u.Size)
	}
	if err := s.checkRoom(); err != nil {
		return err
	}
	h, err := restoreSHA256(u.hash)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(s.tmpDir(), u.temp), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	defer f.Close()
	// Bytes past Size are from a chunk that failed (or a crash): drop them.
	if err := f.Truncate(u.Size); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	if _, err := f.Seek(u.Size, io.SeekStart); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	out, wb := behind(s.wrapWrite(f), f, u.Size)
	defer wb.stop()
	n, err := io.CopyBuffer(io.MultiWriter(out, h), r, *bufp)
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		// The upload stays as it was (the next chunk truncates what
		// this one left); the disk needs room first.
		return s.writeErr("append upload", err)
	}
	if err != nil {
		return err
	}
	if want >= 0 && n != want {
		return fmt.Errorf("%w: chunk has %d bytes, want %d", ErrSizeMismatch, n, want)
	}
	// The state says Size bytes are there: make it true across a crash.
	if persist {
		wb.stop()
		if err := f.Sync(); err != nil {
			return s.writeErr("fsync", err)
		}
	}
	state, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return err
	}
	next := *u
	next.Size, next.hash = u.Size+n, state
	if persist {
		if err := s.putUpload(next, ttl); err != nil {
			return err
		}
	}
	*u = next
	return nil
}

var uploadBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

func restoreSHA256(state []byte) (hash.Hash, error) {
	h := sha256.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(state); err != nil {
		return nil, fmt.Errorf("cache: upload hash state: %w", err)
	}
	return h, nil
}

// FinishUpload appends a last chunk (r may be nil; offset and want as for
// AppendUpload), then commits the upload as blob d: verified, fsynced,
// renamed into place under d's lock, indexed. The upload ends whether the
// commit succeeds or not (a digest mismatch stores nothing); a chunk that
// does not fit leaves it as it was.
func (s *Store) FinishUpload(id string, offset int64, r io.Reader, want int64, d digest.Digest, origin Origin, ttl time.Duration) (BlobInfo, error) {
	defer s.uploadLock(id)()
	u, err := s.getUpload(id)
	if err != nil {
		return BlobInfo{}, err
	}
	if r != nil && want != 0 && u.Size == 0 && offset <= 0 {
		// The whole blob in one request, its digest named first.
		// As below: a body that does not arrive whole leaves the upload
		// as it was; a wrong digest ends it.
		err := s.WriteDeclared(d, r, want, origin)
		if err != nil && !errors.Is(err, ErrDigestMismatch) {
			return BlobInfo{}, err
		}
		os.Remove(filepath.Join(s.tmpDir(), u.temp))
		if derr := s.deleteUploadKey(id); derr != nil && err == nil {
			return BlobInfo{}, derr
		}
		if err != nil {
			return BlobInfo{}, err
		}
		return s.StatBlob(d)
	}
	if r != nil && want != 0 {
		if err := s.appendLocked(&u, offset, r, want, ttl, false); err != nil {
			return BlobInfo{}, err
		}
	} else if offset >= 0 && offset != u.Size {
		return BlobInfo{}, fmt.Errorf("%w: chunk starts at %d, upload has %d bytes", ErrUploadOffset, offset, u.Size)
	}
	commitErr := s.commitUpload(u, d, origin)
	if err := s.deleteUploadKey(id); err != nil && commitErr == nil {
		return BlobInfo{}, err
	}
	if commitErr != nil {
		return BlobInfo{}, commitErr
	}
	return s.StatBlob(d)
}

func (s *Store) commitUpload(u uploadState, d digest.Digest, origin Origin) error {
	path := filepath.Join(s.tmpDir(), u.temp)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	if err := f.Truncate(u.Size); err != nil {
		f.Close()
		return fmt.Errorf("cache: %w", err)
	}
	h, err := restoreSHA256(u.hash)
	if err != nil {
		f.Close()
		return err
	}
	w := &BlobWriter{
		s: s, f: f, out: f, alg: digest.SHA256, digester: hashDigester{digest.SHA256, h},
		path: path, written: u.Size, changed: make(chan struct{}),
	}
	defer w.Cancel()
	return w.Commit(d, u.Size, origin)
}

// hashDigester is a digest.Digester around a hash restored from its state.
type hashDigester struct {
	alg digest.Algorithm
	h   hash.Hash
}

func (d hashDigester) Hash() hash.Hash       { return d.h }
func (d hashDigester) Digest() digest.Digest { return digest.NewDigest(d.alg, d.h) }

// UploadsOpen counts the upload sessions started and not yet finished,
// canceled or expired. It reads only keys: a scrape's worth of work.
func (s *Store) UploadsOpen() (int, error) {
	n := 0
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.PrefetchValues = false
		o.Prefix = keyUploadPrefix()
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return 0, ErrClosed
	}
	return n, err
}

// DeleteUpload cancels upload id and removes its bytes. A missing upload is
// ErrNotFound.
func (s *Store) DeleteUpload(id string) error {
	defer s.uploadLock(id)()
	u, err := s.getUpload(id)
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(s.tmpDir(), u.temp)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cache: %w", err)
	}
	return s.deleteUploadKey(id)
}

func (s *Store) deleteUploadKey(id string) error {
	err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(keyUpload(id)) })
	if errors.Is(err, badger.ErrDBClosed) {
		return ErrClosed
	}
	return err
}

// ReapUploads removes temp files that no live upload owns and that nobody
// wrote for olderThan: the bytes of uploads whose state expired, and
// leftovers of a crash. Files being written (fills, pushes) are fresh, so
// they stay. It returns how many files it removed.
func (s *Store) ReapUploads(olderThan time.Duration) (int, error) {
	live := map[string]bool{}
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = keyUploadPrefix()
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			id := string(item.Key()[1:])
			err := item.Value(func(v []byte) error {
				u, err := decodeUpload(id, v)
				if err == nil {
					live[u.temp] = true
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return 0, ErrClosed
	}
	if err != nil {
		return 0, err
	}
	entries, err := os.ReadDir(s.tmpDir())
	if err != nil {
		return 0, fmt.Errorf("cache: %w", err)
	}
	cutoff := s.now().Add(-olderThan)
	n := 0
	for _, e := range entries {
		if live[e.Name()] || e.IsDir() {
			continue
		}
		fi, err := e.Info()
		if err != nil || !fi.ModTime().Before(cutoff) {
			continue
		}
		if os.Remove(filepath.Join(s.tmpDir(), e.Name())) == nil {
			n++
		}
	}
	return n, nil
}
