package cache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// BlobInfo describes a stored blob.
type BlobInfo struct {
	Digest   digest.Digest
	Size     int64
	Origin   Origin
	StoredAt time.Time
}

// StatBlob returns the index entry of a stored blob, or ErrNotFound.
func (s *Store) StatBlob(d digest.Digest) (BlobInfo, error) {
	v, err := s.ix.get(keyBlob(d))
	if err != nil {
		return BlobInfo{}, err
	}
	return decodeBlob(d, v)
}

// OpenBlob opens a stored blob for reading. The caller closes the file. A
// blob whose index entry exists but whose file is gone is ErrNotFound (the
// next fill stores it again).
//
// Opening a blob counts as a use (Touch), and eviction leaves the blob alone
// until the file is closed.
func (s *Store) OpenBlob(d digest.Digest) (*os.File, BlobInfo, error) {
	info, err := s.StatBlob(d)
	if err != nil {
		return nil, BlobInfo{}, err
	}
	// Under d's lock, eviction cannot remove the file between open and
	// the reader being counted.
	unlock := s.locks.Lock(string(d))
	f, err := os.Open(s.blobPath(d))
	if err == nil {
		s.trackReader(d, f)
	}
	unlock()
	if errors.Is(err, fs.ErrNotExist) {
		return nil, BlobInfo{}, fmt.Errorf("blob file of %s is missing: %w", d, ErrNotFound)
	}
	if err != nil {
		return nil, BlobInfo{}, fmt.Errorf("cache: %w", err)
	}
	s.life.hits.Add(1)
	s.Touch(d)
	return f, info, nil
}

// PutBlob stores r under d: a convenience for small blobs and tests.
func (s *Store) PutBlob(r io.Reader, d digest.Digest, origin Origin) error {
	return s.writeBlob(d, r, -1, origin)
}

// BlobWriter writes one blob into a temp file beside the store. Bytes become
// visible under their digest only through Commit, which verifies them first.
//
// While it is being written, Follow gives readers the bytes written so far,
// all but the last one: the final byte is released only once Commit has
// verified the digest and stored the blob (fsynced, renamed, indexed), so
// nobody ever reads a complete blob with wrong bytes, and a complete read
// means the blob survives a crash.
//
// Write is not safe for concurrent use; Follow, Commit and Cancel are.
// Cancel after Commit is a no-op, so it can be deferred.
type BlobWriter struct {
	s        *Store
	f        *os.File
	out      io.Writer // f, or what Options.WrapWrite made of it, with write-behind
	wb       *writeBehind
	alg      digest.Algorithm
	digester digest.Digester

	mu      sync.Mutex
	path    string        // where the bytes are now: temp path, then final path
	written int64         // bytes written to the file
	visible int64         // bytes followers may be told of: all but the last until Commit
	final   bool          // visible == written and no more bytes will come
	err     error         // set when the write failed or was canceled
	ending  bool          // an Abort is under way
	changed chan struct{} // closed and replaced to tell followers (see grew)
	told    int64         // how far followers may read: visible when they were last told
	flush   *time.Timer   // tells followers of bytes that waited followLinger
	flushOn bool          // flush is set to fire
	readers []*os.File    // followers' files, counted as readers once committed

	// keep: the temp file is the caller's (an upload session's). Commit
	// links it into place instead of renaming it, and nothing removes it:
	// a commit that fails for a reason that may pass can be retried.
	keep bool
	// fromShared: the bytes come from the fleet's shared tier or from the
	// replica that puts them there; nothing to send.
	fromShared bool
}

// FromShared marks a writer whose bytes come from the fleet's shared tier,
// or from a peer replica that sends them there itself: its commit queues
// nothing for the shared tier. Call it before Commit.
func (w *BlobWriter) FromShared() {
	w.mu.Lock()
	w.fromShared = true
	w.mu.Unlock()
}

// NewBlobWriter starts a blob whose digest will use alg (sha256 if empty).
func (s *Store) NewBlobWriter(alg digest.Algorithm) (*BlobWriter, error) {
	if alg == "" {
		alg = digest.SHA256
	}
	if !alg.Available() {
		return nil, fmt.Errorf("cache: digest algorithm %q is not available", alg)
	}
	path, f, err := s.createTemp()
	if err != nil {
		return nil, err
	}
	out, wb := behind(s.wrapWrite(f), f, 0)
	return &BlobWriter{
		s: s, f: f, out: out, wb: wb, alg: alg, digester: alg.Digester(),
		path: path, changed: make(chan struct{}),
	}, nil
}

func (s *Store) wrapWrite(f *os.File) io.Writer {
	if s.opt.WrapWrite != nil {
		return s.opt.WrapWrite(f)
	}
	return f
}

func (s *Store) createTemp() (string, *os.File, error) { return s.createTempPrefixed("") }

// createTempPrefixed creates a temp file with a random name after prefix.
func (s *Store) createTempPrefixed(prefix string) (string, *os.File, error) {
	if err := s.checkRoom(); err != nil {
		return "", nil, err
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", nil, err
	}
	path := filepath.Join(s.tmpDir(), prefix+hex.EncodeToString(b[:]))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", nil, s.writeErr("create temp file", err)
	}
	return path, f, nil
}

// Write appends p to the blob.
func (w *BlobWriter) Write(p []byte) (int, error) {
	if err := w.writable(); err != nil {
		return 0, err
	}
	n, err := w.out.Write(p)
	w.digester.Hash().Write(p[:n])
	w.grew(n)
	if err != nil {
		err = w.s.writeErr("write temp file", err)
		w.Abort(err)
	}
	return n, err
}

// writable is nil while bytes may still be written.
func (w *BlobWriter) writable() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return w.err
	}
	if w.final {
		return errors.New("cache: write after commit")
	}
	return nil
}

// Size is the number of bytes written so far.
func (w *BlobWriter) Size() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.written
}

// A fill arrives in network reads of a few KiB to 256 KiB. Telling every
// follower of each one would wake 32 waiting clients thousands of times a
// second, each to send a sliver: with 32 clients on one fill that was most
// of the server's CPU besides sending. So followers are told once a
// stretch of followBatch bytes is visible, or once new bytes have waited
// followLinger, whichever comes first; the first bytes they are told of at
// once (time to first byte counts), and the end or a failure at once.
const followBatch = 256 << 10

var followLinger = 2 * time.Millisecond // tests lengthen it

// grew records n more bytes in the file: all but the last written byte
// become visible, and followers are told as the comment above says.
func (w *BlobWriter) grew(n int) {
	if n == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.written += int64(n)
	w.visible = w.written - 1
	switch {
	case w.visible == w.told:
	case w.told == 0 || w.visible-w.told >= followBatch:
		w.notifyLocked()
	case !w.flushOn:
		w.flushOn = true
		if w.flush == nil {
			w.flush = time.AfterFunc(followLinger, w.flushNow)
		} else {
			w.flush.Reset(followLinger)
		}
	}
}

// flushNow tells followers of the bytes that waited followLinger.
func (w *BlobWriter) flushNow() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.flushOn = false
	if w.visible > w.told {
		w.notifyLocked()
	}
}

// notifyLocked tells the followers that what they wait on changed.
func (w *BlobWriter) notifyLocked() {
	w.told = w.visible
	close(w.changed)
	w.changed = make(chan struct{})
}

// stopFlushLocked is for the end of the writing: the commit or abort
// tells the followers itself.
func (w *BlobWriter) stopFlushLocked() {
	if w.flush != nil {
		w.flush.Stop()
		w.flushOn = false
	}
}

// Commit verifies the bytes against want (and size, unless it is negative),
// then makes the blob visible: fsync, rename into place, index. If the blob is
// already stored, the temp file is dropped and Commit succeeds: in a
// content-addressed store, "already there" means done. A pushed blob that was
// stored as pulled becomes pushed (and so pinned).
func (w *BlobWriter) Commit(want digest.Digest, size int64, origin Origin) error {
	if err := want.Validate(); err != nil {
		w.Abort(err)
		return err
	}
	w.mu.Lock()
	err, written := w.err, w.written
	w.mu.Unlock()
	if err != nil {
		return err
	}
	if size >= 0 && written != size {
		err := fmt.Errorf("%w: got %d bytes, want %d", ErrSizeMismatch, written, size)
		w.Abort(err)
		return err
	}
	got, err := w.digest(want.Algorithm())
	if err != nil {
		w.Abort(err)
		return err
	}
	if got != want {
		err := fmt.Errorf("%w: got %s, want %s", ErrDigestMismatch, got, want)
		w.Abort(err)
		return err
	}
	if err := w.s.commitFile(w, want, written, origin); err != nil {
		w.Abort(err)
		return err
	}
	// Verified, fsynced, in place and indexed: followers may have the
	// last byte now. So a client that got a complete 200 got a blob that
	// survives a crash.
	w.mu.Lock()
	w.visible, w.final = w.written, true
	w.stopFlushLocked()
	w.notifyLocked()
	w.mu.Unlock()
	return nil
}

// digest returns the digest of what was written, with alg. The running hash
// is used when it has that algorithm; otherwise the file is read again.
func (w *BlobWriter) digest(alg digest.Algorithm) (digest.Digest, error) {
	if alg == w.alg {
		return w.digester.Digest(), nil
	}
	if !alg.Available() {
		return "", fmt.Errorf("cache: digest algorithm %q is not available", alg)
	}
	d := alg.Digester()
	if _, err := io.Copy(d.Hash(), io.NewSectionReader(w.f, 0, w.Size())); err != nil {
		return "", fmt.Errorf("cache: rehash: %w", err)
	}
	return d.Digest(), nil
}

// commitFile moves a verified temp file into place under the per-digest
// lock, so that concurrent writers of one digest leave one file and one
// index entry whatever their mix.
func (s *Store) commitFile(w *BlobWriter, d digest.Digest, size int64, origin Origin) error {
	unlock := s.locks.Lock(string(d))
	defer unlock()

	final := s.blobPath(d)
	if info, err := s.StatBlob(d); err == nil {
		if _, statErr := os.Stat(final); statErr == nil {
			w.dropTemp(final)
			return s.storedAgain(info, origin)
		}
		// Indexed but the file is gone: store it again below, and keep
		// the pin of content that was pushed.
		if info.Origin == OriginPushed {
			origin = OriginPushed
		}
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}

	w.wb.stop()
	if err := fsync(w.f); err != nil {
		return s.writeErr("fsync", err)
	}
	dir := filepath.Dir(final)
	if err := s.makeBlobDir(dir); err != nil {
		return err
	}
	if err := w.place(final); err != nil {
		return err
	}
	placed := true
	defer func() {
		if placed && w.keep {
			// Not indexed: take the link away, the session keeps its file.
			os.Remove(final)
		}
	}()
	if err := syncDir(dir); err != nil {
		return s.writeErr("fsync blob directory", err)
	}
	_, statErr := s.StatBlob(d)
	err := s.ix.update(func(txn *badger.Txn) error {
		if err := txn.Set(keyBlob(d), encodeBlob(BlobInfo{Digest: d, Size: size, Origin: origin, StoredAt: s.now()})); err != nil {
			return err
		}
		if origin == OriginPulled && !w.fromShared {
			return s.queueIn(txn, keyQueueBlob(d))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if origin == OriginPulled && !w.fromShared && s.shared != nil {
		select {
		case s.queueKick <- struct{}{}:
		default:
		}
	}
	placed = false
	if !w.keep {
		w.f.Close()
	}
	if errors.Is(statErr, ErrNotFound) {
		s.life.addBlob(size)
		if origin == OriginPulled {
			s.life.misses.Add(1) // a fill stored it: one miss
		}
	}
	// Followers read the file now in place: they are its readers.
	w.mu.Lock()
	for _, f := range w.readers {
		s.trackReader(d, f)
	}
	w.readers = nil
	w.mu.Unlock()
	return nil
}

// storedAgain records a write of a blob that was already stored: a push
// makes it pushed content (so pinned), and counts as a use, so that the
// manifest that follows finds it within the grace however old the first
// copy is.
func (s *Store) storedAgain(info BlobInfo, origin Origin) error {
	if origin != OriginPushed {
		return nil
	}
	return s.ix.update(func(txn *badger.Txn) error {
		if info.Origin != OriginPushed {
			info.Origin = OriginPushed
			if err := txn.Set(keyBlob(info.Digest), encodeBlob(info)); err != nil {
				return err
			}
		}
		return s.renew(txn, info.Digest)
	})
}

// place puts the temp file at final: a rename, or for a kept temp file a
// hard link.
func (w *BlobWriter) place(final string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	var err error
	if w.keep {
		err = os.Link(w.path, final)
		if errors.Is(err, fs.ErrExist) {
			// A file nobody indexed (a crash between rename and index):
			// ours is verified, so it replaces it.
			if err = os.Remove(final); err == nil {
				err = os.Link(w.path, final)
			}
		}
	} else if err = os.Rename(w.path, final); err == nil {
		w.path = final
	}
	if err != nil {
		return w.s.writeErr("move blob into place", err)
	}
	return nil
}

// makeBlobDir creates a blob directory, and its algorithm directory, if
// they are missing, and fsyncs the parent of each one it creates: a
// directory's own entry must survive a power cut as its files' do.
func (s *Store) makeBlobDir(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	// One creator at a time, so that nobody goes on before the creator's
	// fsync of the parent.
	s.dirMu.Lock()
	defer s.dirMu.Unlock()
	for _, d := range []string{filepath.Dir(dir), dir} {
		err := os.Mkdir(d, 0o755)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return s.writeErr("create blob directory", err)
		}
		if err := syncDir(filepath.Dir(d)); err != nil {
			return s.writeErr("fsync blob directory", err)
		}
	}
	return nil
}

// dropTemp removes the temp file because an identical blob is already at final.
// Only a temp file is removed: on a writer that was already committed, w.path
// is the stored blob itself; a kept temp file is the caller's.
func (w *BlobWriter) dropTemp(final string) {
	w.mu.Lock()
	tmp := w.path
	w.path = final
	w.mu.Unlock()
	w.wb.stop()
	if w.keep {
		return
	}
	w.f.Close()
	if w.s.isTemp(tmp) {
		os.Remove(tmp)
	}
}

// fsync is f.Sync; tests make it fail.
var fsync = (*os.File).Sync

// syncDirHook, if set, sees every directory syncDir syncs.
var syncDirHook func(dir string)

func syncDir(dir string) error {
	if syncDirHook != nil {
		syncDirHook(dir)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("cache: fsync dir: %w", err)
	}
	return nil
}

// Cancel abandons the blob and removes its temp file. Followers get
// ErrCanceled. Cancel after Commit is a no-op.
func (w *BlobWriter) Cancel() { w.Abort(ErrCanceled) }

// Abort is Cancel with a cause: followers get err, once the temp file is
// gone (their open files still read), so one who learns of the failure
// finds nothing of it left on disk.
func (w *BlobWriter) Abort(err error) {
	w.mu.Lock()
	if w.err != nil || w.ending || (w.final && w.path != "" && !w.isTempLocked()) {
		w.mu.Unlock()
		return
	}
	w.ending = true
	w.final = false
	path := w.path
	w.mu.Unlock()
	w.wb.stop()
	if !w.keep {
		w.f.Close()
		if w.s.isTemp(path) {
			os.Remove(path)
		}
	}
	w.mu.Lock()
	w.err = err
	w.stopFlushLocked()
	w.notifyLocked()
	w.mu.Unlock()
}

func (w *BlobWriter) isTempLocked() bool { return w.s.isTemp(w.path) }

func (s *Store) isTemp(path string) bool { return filepath.Dir(path) == s.tmpDir() }

// Follow returns a reader of the blob as it is being written. Read blocks
// until more bytes are visible, the blob is committed (then io.EOF at its
// end), it fails (then that error), or ctx is done.
func (w *BlobWriter) Follow(ctx context.Context) (io.ReadCloser, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return nil, w.err
	}
	if w.ending {
		return nil, fmt.Errorf("%w: the write is ending", ErrCanceled)
	}
	f, err := os.Open(w.path)
	if err != nil {
		return nil, fmt.Errorf("cache: follow: %w", err)
	}
	w.readers = append(w.readers, f)
	return &follower{w: w, f: f, ctx: ctx}, nil
}

type follower struct {
	w   *BlobWriter
	f   *os.File
	ctx context.Context
	off int64
}

func (r *follower) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	visible, err := r.wait()
	if err != nil {
		return 0, err
	}
	n := int64(len(p))
	if rest := visible - r.off; rest < n {
		n = rest
	}
	m, err := r.f.ReadAt(p[:n], r.off)
	r.off += int64(m)
	if err == io.EOF && m > 0 {
		err = nil
	}
	return m, err
}

// wait blocks until followers were told of bytes past r.off, and returns
// how far they go; io.EOF once the blob is complete and read. A follower
// reads only as far as it was told, not as far as is visible: one that
// caught up waits for the next stretch rather than chase each write.
func (r *follower) wait() (int64, error) {
	for {
		r.w.mu.Lock()
		told, final, err, changed := r.w.told, r.w.final, r.w.err, r.w.changed
		r.w.mu.Unlock()
		if err != nil {
			return 0, err
		}
		if r.off < told {
			return told, nil
		}
		if final {
			return 0, io.EOF
		}
		select {
		case <-changed:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// WriteTo sends the blob to w as it grows. When w can read from a file
// (an http.ResponseWriter), each stretch goes out as a file section, which
// the kernel copies with sendfile(2).
func (r *follower) WriteTo(w io.Writer) (int64, error) {
	rf, ok := w.(io.ReaderFrom)
	if !ok {
		return io.Copy(w, struct{ io.Reader }{r})
	}
	var total int64
	for {
		visible, err := r.wait()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if _, err := r.f.Seek(r.off, io.SeekStart); err != nil {
			return total, err
		}
		n, err := rf.ReadFrom(&io.LimitedReader{R: r.f, N: visible - r.off})
		r.off += n
		total += n
		if err != nil {
			return total, err
		}
	}
}

func (r *follower) Close() error { return r.f.Close() }
