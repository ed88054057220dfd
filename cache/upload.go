package cache

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	// boot is the id of the boot in which bytes were last written
	// without an fsync, or empty if every byte of Size is synced. Chunks
	// are not fsynced (OCI asks that of the final PUT only): a process
	// that dies leaves them in the page cache, which is as good, but a
	// machine that goes down may lose them, so an upload whose boot is
	// not this one is checked against its hash state before it goes on.
	boot string
}

// sha256StateLen is the length of a marshaled sha256 state.
const sha256StateLen = 108

// bootIDLen is the length of a boot id as stored: its 16 bytes.
const bootIDLen = 16

// bootID identifies this boot of the machine, or is empty where the
// system does not say (then every chunk is fsynced). A variable so that
// a test can reboot.
var bootID = sync.OnceValue(func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	id, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(string(b)), "-", ""))
	if err != nil || len(id) != bootIDLen {
		return ""
	}
	return string(id)
})

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
	id := hex.EncodeToString(b[:])
	if s.opt.UploadIDPrefix != "" {
		id = s.opt.UploadIDPrefix + "." + id
	}
	u := uploadState{
		Upload: Upload{ID: id, Repo: repo, StartedAt: s.now()},
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
	v, err := encodeUpload(u)
	if err != nil {
		return err
	}
	e := badger.NewEntry(keyUpload(u.ID), v)
	if ttl > 0 {
		// badger keeps expiry in whole seconds, rounded down: add one so
		// an upload lives at least ttl.
		e = e.WithTTL(ttl + time.Second)
	}
	return s.ix.update(func(txn *badger.Txn) error { return txn.SetEntry(e) })
}

func (s *Store) getUpload(id string) (uploadState, error) {
	v, err := s.ix.get(keyUpload(id))
	if err != nil {
		return uploadState{}, err
	}
	return decodeUpload(id, v)
}

// GetUpload returns the state of upload id, or ErrNotFound (also once it
// expired).
func (s *Store) GetUpload(id string) (Upload, error) {
	u, err := s.getUpload(id)
	if err == nil && u.fromEarlierBoot() {
		defer s.uploadLock(id)()
		u, err = s.loadUpload(id)
	}
	return u.Upload, err
}

// fromEarlierBoot reports whether chunks were written unsynced before the
// machine last booted.
func (u uploadState) fromEarlierBoot() bool { return u.boot != "" && u.boot != bootID() }

// loadUpload returns upload id's state, under its lock. An upload whose
// unsynced chunks were written before the machine last booted is checked
// first: if its file still hashes to its state, it is fsynced and the
// upload goes on; if not, chunks were lost with the machine, and the upload is ended
// (ErrNotFound: the client starts again).
func (s *Store) loadUpload(id string) (uploadState, error) {
	u, err := s.getUpload(id)
	if err != nil || !u.fromEarlierBoot() {
		return u, err
	}
	ok, err := s.uploadFileHolds(u)
	if err != nil {
		return uploadState{}, err
	}
	if !ok {
		s.log.Warn("an upload lost chunks when the machine went down; the client must push again", "upload", u.ID, "repository", u.Repo, "bytes", u.Size)
		os.Remove(filepath.Join(s.tmpDir(), u.temp))
		if err := s.deleteUploadKey(u.ID); err != nil {
			return uploadState{}, err
		}
		return uploadState{}, ErrNotFound
	}
	// The state stays as it is (its ttl with it): the next chunk
	// records this boot, and a status check before it hashes again.
	return u, nil
}

// uploadFileHolds reports whether the upload's file starts with Size
// bytes that hash to its state (and fsyncs it if so).
func (s *Store) uploadFileHolds(u uploadState) (bool, error) {
	f, err := os.Open(filepath.Join(s.tmpDir(), u.temp))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("cache: open upload: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(f, u.Size))
	if err != nil {
		return false, fmt.Errorf("cache: read upload: %w", err)
	}
	state, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return false, err
	}
	if n != u.Size || !bytes.Equal(state, u.hash) {
		return false, nil
	}
	if err := f.Sync(); err != nil {
		return false, s.writeErr("fsync", err)
	}
	return true, nil
}

// AppendUpload appends r to upload id and renews its ttl. offset, unless
// negative, must be where the upload ends (else ErrUploadOffset); want,
// unless negative, is how many bytes r must yield (else ErrSizeMismatch).
// Either the whole chunk is recorded or none of it: a failed or short chunk
// leaves the upload as it was.
func (s *Store) AppendUpload(id string, offset int64, r io.Reader, want int64, ttl time.Duration) (Upload, error) {
	defer s.uploadLock(id)()
	u, err := s.loadUpload(id)
	if err != nil {
		return Upload{}, err
	}
	if err := s.appendLocked(&u, offset, r, want, ttl, true); err != nil {
		return Upload{}, err
	}
	return u.Upload, nil
}

// appendLocked writes a chunk. With persist, the new state is stored, so
// that the upload resumes after a restart; the chunk is not fsynced (where
// the boot id is known: see uploadState.boot). A last chunk, committed at
// once, is not stored either: the commit fsyncs the file if it is the
// first copy of its blob and drops it, unsynced, if it is not, so a
// duplicate of a stored blob costs no fsync.
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
	next := *u
	n, err := s.appendChunk(&next, r, h, persist)
	if err == nil && want >= 0 && n != want {
		err = fmt.Errorf("%w: chunk has %d bytes, want %d", ErrSizeMismatch, n, want)
	}
	boot := bootID()
	if err == nil && persist && boot == "" {
		// No boot id to tell a reboot by: the state says Size bytes
		// are there, so make that true across a crash.
		err = s.syncTemp(next.temp)
	}
	var state []byte
	if err == nil {
		state, err = h.(encoding.BinaryMarshaler).MarshalBinary()
	}
	next.Size, next.hash, next.boot = u.Size+n, state, boot
	if err == nil && persist {
		err = s.putUpload(next, ttl)
	}
	if err != nil {
		// The upload stays as it was: a file the chunk moved it to is
		// given up (its own file keeps bytes past Size, which the next
		// chunk drops; a shared file keeps them for whoever agrees).
		if next.temp != u.temp {
			s.releaseTemp(u.ID, next.temp)
		}
		return err
	}
	if persist && next.temp != u.temp {
		s.releaseTemp(u.ID, u.temp)
	}
	*u = next
	return nil
}

// syncTemp fsyncs an upload's file.
func (s *Store) syncTemp(temp string) error {
	f, err := os.Open(filepath.Join(s.tmpDir(), temp))
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	defer f.Close()
	if err := fsync(f); err != nil {
		return s.writeErr("fsync", err)
	}
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
// placed under d's lock, indexed. A commit that stored the blob, or found
// that the bytes are not d, ends the upload (a mismatch stores nothing). A
// chunk that does not fit, or a commit that failed for a reason that may
// pass (a full disk, a failed fsync), leaves the upload as it was: every
// chunk acknowledged with a 202 is still there, and the client may retry
// the PUT.
func (s *Store) FinishUpload(id string, offset int64, r io.Reader, want int64, d digest.Digest, origin Origin, ttl time.Duration) (BlobInfo, error) {
	defer s.uploadLock(id)()
	u, err := s.loadUpload(id)
	if err != nil {
		return BlobInfo{}, err
	}
	if r != nil && want != 0 && u.Size == 0 && offset <= 0 {
		// The whole blob in one request, its digest named first. As
		// below: a body that does not arrive whole, or does not land,
		// leaves the upload as it was; a wrong digest ends it.
		err := s.writeDeclared(d, r, want, origin)
		if err == nil {
			if err := s.toShared(d, origin); err != nil {
				return BlobInfo{}, err
			}
		}
		if err != nil && !endsUpload(err) {
			return BlobInfo{}, err
		}
		return s.endUpload(u, d, err)
	}
	stored := u // as the upload's state has it
	if r != nil && want != 0 {
		if err := s.appendLocked(&u, offset, r, want, ttl, false); err != nil {
			return BlobInfo{}, err
		}
	} else if offset >= 0 && offset != u.Size {
		return BlobInfo{}, fmt.Errorf("%w: chunk starts at %d, upload has %d bytes", ErrUploadOffset, offset, u.Size)
	}
	err = s.commitUpload(u, d, origin)
	if err == nil {
		err = s.toShared(d, origin)
	}
	if err != nil && !endsUpload(err) {
		// The upload stays as its state has it; a file the last chunk
		// moved it to is given up.
		if u.temp != stored.temp {
			s.releaseTemp(u.ID, u.temp)
		}
		return BlobInfo{}, err
	}
	if u.temp != stored.temp {
		s.releaseTemp(u.ID, stored.temp)
	}
	return s.endUpload(u, d, err)
}

// endsUpload reports whether a commit's error ends the upload: its bytes
// are not the digest's, and no retry can change that.
func endsUpload(err error) bool {
	return errors.Is(err, ErrDigestMismatch) || errors.Is(err, digest.ErrDigestInvalidFormat) || errors.Is(err, digest.ErrDigestInvalidLength) ||
		errors.Is(err, digest.ErrDigestUnsupported)
}

// endUpload removes the upload's state and bytes after a commit that ended
// it (commitErr: the commit's own error, returned).
func (s *Store) endUpload(u uploadState, d digest.Digest, commitErr error) (BlobInfo, error) {
	s.releaseTemp(u.ID, u.temp)
	if err := s.deleteUploadKey(u.ID); err != nil && commitErr == nil {
		return BlobInfo{}, err
	}
	if commitErr != nil {
		return BlobInfo{}, commitErr
	}
	return s.StatBlob(d)
}

// toShared puts a committed pushed blob into the fleet's shared tier: the
// upload is acknowledged only once it is there. Until then the upload
// stays, as after any failure that may pass, and the client may retry.
func (s *Store) toShared(d digest.Digest, origin Origin) error {
	if origin != OriginPushed || s.shared == nil {
		return nil
	}
	return s.ensureShared(d)
}

// commitUpload commits the upload's file as blob d. The file stays the
// upload's: it is linked into place, so a commit that fails leaves it.
func (s *Store) commitUpload(u uploadState, d digest.Digest, origin Origin) error {
	if g := s.group(u.ID, u.temp); g != nil {
		if err := s.commitGroup(u, g, d, origin); !errors.Is(err, errGoAlone) {
			return err
		}
	}
	if isSharedChunks(u.temp) {
		return s.commitAlone(u, d, origin)
	}
	path := filepath.Join(s.tmpDir(), u.temp)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	defer f.Close()
	// Bytes past Size are from a last chunk whose commit failed: the
	// state is what was acknowledged.
	if err := f.Truncate(u.Size); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	h, err := restoreSHA256(u.hash)
	if err != nil {
		return err
	}
	w := &BlobWriter{
		s: s, f: f, out: f, alg: digest.SHA256, digester: hashDigester{digest.SHA256, h},
		path: path, written: u.Size, changed: make(chan struct{}), keep: true,
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
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixUpload), nil, false, func(*badger.Item) error {
			n++
			return nil
		})
	})
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
	if !isSharedChunks(u.temp) {
		if err := os.Remove(filepath.Join(s.tmpDir(), u.temp)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cache: %w", err)
		}
	}
	s.releaseTemp(id, u.temp)
	return s.deleteUploadKey(id)
}

func (s *Store) deleteUploadKey(id string) error {
	return s.ix.update(func(txn *badger.Txn) error { return txn.Delete(keyUpload(id)) })
}

// uploadTemps is the set of temp file names live uploads own, and the set
// of their ids.
func (s *Store) uploadTemps() (temps, ids map[string]bool, err error) {
	temps, ids = map[string]bool{}, map[string]bool{}
	err = s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixUpload), nil, true, func(item *badger.Item) error {
			id := string(item.Key()[1:])
			ids[id] = true
			return item.Value(func(v []byte) error {
				if u, err := decodeUpload(id, v); err == nil {
					temps[u.temp] = true
				}
				return nil
			})
		})
	})
	return temps, ids, err
}

// ReapUploads removes temp files that no live upload owns and that nobody
// wrote for olderThan: the bytes of uploads whose state expired, and
// leftovers of a crash. Files being written (fills, pushes) are fresh, so
// they stay. It returns how many files it removed.
func (s *Store) ReapUploads(olderThan time.Duration) (int, error) {
	live, ids, err := s.uploadTemps()
	if err != nil {
		return 0, err
	}
	// Uploads that expired leave the files they shared; a file still
	// shared stays (an upload that just joined it names it only once
	// its chunk is in).
	s.pruneGroups(ids)
	s.chunks.mu.Lock()
	for name := range s.chunks.byName {
		live[name] = true
	}
	s.chunks.mu.Unlock()
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
