package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// Pushes that name their digest before their body (a monolithic PUT, a
// POST with ?digest=) share one temp file however many arrive together.
// CI jobs push the same base layers at the same moment: of 16 pushes of
// one layer, the bytes reach the disk once and are fsynced once.
//
// Every push reads its own body at its own pace, so none waits for
// another and no client's body stalls (a stall guard would cut it off):
// bytes the file already has are compared with the push's own, bytes past
// the file's end are appended by whichever push is ahead. So the file's
// first n bytes always equal the first n bytes of every push still on it.
// A push whose bytes differ (a wrong or hostile body, or a file that a
// failed write left unsure) goes on alone in its own temp file, copying
// the prefix it had agreed with. The first push whose whole body hashes
// to the digest commits the file; after that nobody writes to it.

// sharedFile is a temp file that pushes of the same bytes write together:
// each compares the bytes the file has with its own and appends the ones
// past its end, so its first end bytes are every writer's still on it.
type sharedFile struct {
	f    *os.File
	path string
	out  io.Writer // f, with write-behind
	wb   *writeBehind

	end atomic.Int64 // bytes in the file; grows under mu

	mu     sync.Mutex
	done   bool // committed: the blob is stored, the file is frozen
	broken bool // a write failed or wrong bytes were appended: no new push joins, nobody appends
}

// create creates e's temp file, with a name that starts with prefix.
func (e *sharedFile) create(s *Store, prefix string) error {
	path, f, err := s.createTempPrefixed(prefix)
	if err != nil {
		return err
	}
	e.f, e.path = f, path
	e.out, e.wb = behind(s.wrapWrite(f), f, 0)
	return nil
}

// close stops the file's write-behind, closes it and removes it (a
// committed blob lives on in its own link).
func (e *sharedFile) close() {
	e.wb.stop()
	e.f.Close()
	os.Remove(e.path)
}

// declaredWrite is the shared temp file of one declared digest.
type declaredWrite struct {
	sharedFile
	d     digest.Digest
	users int // pushes on it (under mu)
}

type declaredWrites struct {
	mu sync.Mutex
	m  map[digest.Digest]*declaredWrite
}

// WriteDeclared stores what r yields as blob d, which the client declared
// (size is its declared length, or negative). It verifies the size and the
// digest, like Commit, and errs with ErrSizeMismatch or ErrDigestMismatch.
// A blob already stored is not written again: the body is only hashed, and
// the push counts as a use of the blob.
func (s *Store) WriteDeclared(d digest.Digest, r io.Reader, size int64, origin Origin) error {
	err := s.writeDeclared(d, r, size, origin)
	if err == nil && origin == OriginPushed && s.shared != nil {
		err = s.ensureShared(d) // acknowledged once the fleet has it
	}
	return err
}

func (s *Store) writeDeclared(d digest.Digest, r io.Reader, size int64, origin Origin) error {
	if err := d.Validate(); err != nil {
		return err
	}
	var e *declaredWrite
	for round := 0; e == nil; round++ {
		if f, err := s.holdBlob(d); err == nil {
			defer f.Close()
			return s.verifyOnly(d, r, size, origin)
		}
		if round == 3 {
			// Indexed, yet holdBlob finds no file: write it again
			// (Commit stores it where it belongs).
			return s.writeBlob(d, r, size, origin)
		}
		var err error
		if e, err = s.joinDeclared(d); err != nil && !errors.Is(err, errStoredNow) {
			return err
		}
	}
	defer s.leaveDeclared(e)
	p := declaredPush{s: s, e: e, h: d.Algorithm().Digester()}
	defer p.cancel()
	if err := p.read(r, size); err != nil {
		if errors.Is(err, ErrDigestMismatch) && p.appended {
			e.mu.Lock()
			e.broken = true
			e.mu.Unlock()
		}
		return err
	}
	if p.own != nil {
		return p.own.Commit(d, p.off, origin)
	}
	if err := e.commit(s, p.off, origin); err != nil {
		if errors.Is(err, errNotAgreed) {
			return p.goAlone(d, origin)
		}
		return err
	}
	return nil
}

// declaredPush is one push on a shared write.
type declaredPush struct {
	s        *Store
	e        *declaredWrite
	h        digest.Digester
	off      int64       // bytes of the body read
	appended bool        // it wrote bytes to the shared file
	own      *BlobWriter // set once it went on alone
}

// read reads the body to its end, verifying size and digest.
func (p *declaredPush) read(r io.Reader, size int64) error {
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	cmpp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(cmpp)
	buf := *bufp
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			p.h.Hash().Write(chunk)
			if err := p.take(chunk, *cmpp); err != nil {
				return err
			}
			p.off += int64(n)
			if size >= 0 && p.off > size {
				return fmt.Errorf("%w: more than the %d bytes declared", ErrSizeMismatch, size)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if size >= 0 && p.off != size {
		return fmt.Errorf("%w: got %d bytes, want %d", ErrSizeMismatch, p.off, size)
	}
	if got := p.h.Digest(); got != p.e.d {
		return fmt.Errorf("%w: got %s, want %s", ErrDigestMismatch, got, p.e.d)
	}
	return nil
}

// take puts chunk, the body's bytes at p.off, where they belong: the
// push's own file, or the shared one (compared or appended).
func (p *declaredPush) take(chunk, cmp []byte) error {
	if p.own == nil {
		agreed, appended, err := p.e.apply(p.off, chunk, cmp)
		p.appended = p.appended || appended
		if err != nil {
			return err
		}
		if agreed {
			return nil
		}
		if err := p.split(); err != nil {
			return err
		}
	}
	_, err := p.own.Write(chunk)
	return err
}

// split starts the push's own file with the prefix it agreed on.
func (p *declaredPush) split() error {
	w, err := p.s.NewBlobWriter(p.e.d.Algorithm())
	if err != nil {
		return err
	}
	p.own = w
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	_, err = io.CopyBuffer(w, io.NewSectionReader(p.e.f, 0, p.off), *bufp)
	return err
}

// goAlone commits the push's own copy of a body that was read whole and
// verified, when the shared file cannot be committed as it.
func (p *declaredPush) goAlone(d digest.Digest, origin Origin) error {
	if err := p.split(); err != nil {
		return err
	}
	return p.own.Commit(d, p.off, origin)
}

func (p *declaredPush) cancel() {
	if p.own != nil {
		p.own.Cancel()
	}
}

// apply checks chunk, a push's bytes at off, against the shared file and
// appends what lies past its end. agreed: the file's first off+len(chunk)
// bytes are now the push's; false: they differ, or the file is frozen or
// broken before the push could append (it must go on alone).
func (e *sharedFile) apply(off int64, chunk, cmp []byte) (agreed, appended bool, err error) {
	n := int64(len(chunk))
	if off+n <= e.end.Load() {
		// Below end the file never changes: compare without the lock
		// (which a commit holds while it fsyncs).
		return e.same(off, chunk, cmp), false, nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	end := e.end.Load()
	if off+n <= end { // another push appended it meanwhile
		return e.same(off, chunk, cmp), false, nil
	}
	if e.done || e.broken {
		return false, false, nil
	}
	overlap := end - off
	if overlap > 0 && !e.same(off, chunk[:overlap], cmp) {
		return false, false, nil
	}
	if _, err := e.out.Write(chunk[overlap:]); err != nil {
		e.broken = true // the file's tail is unsure now
		return false, true, err
	}
	e.end.Store(off + n)
	return true, true, nil
}

// same reports whether the file's bytes at off are chunk.
func (e *sharedFile) same(off int64, chunk, cmp []byte) bool {
	got := cmp[:len(chunk)]
	n, err := e.f.ReadAt(got, off)
	return n == len(chunk) && (err == nil || err == io.EOF) && bytes.Equal(got, chunk)
}

// errStoredNow: the blob was stored while the push looked for a shared
// write; it only verifies its body.
var errStoredNow = errors.New("cache: stored meanwhile")

// errNotAgreed: the shared file is not exactly a push's body (a longer,
// wrong body appended past it), so the push stores its own copy.
var errNotAgreed = errors.New("cache: the shared file is not this push's body")

// commit stores the shared file as the blob, once: a push whose body of
// size bytes hashed to the digest and agreed with the file all along calls
// it. Later calls find it done.
func (e *declaredWrite) commit(s *Store, size int64, origin Origin) error {
	e.mu.Lock()
	if e.done {
		e.mu.Unlock()
		return s.storedAgainNow(e.d, origin)
	}
	if e.end.Load() != size {
		e.mu.Unlock()
		return errNotAgreed
	}
	w := &BlobWriter{s: s, f: e.f, out: e.out, wb: e.wb, alg: e.d.Algorithm(), path: e.path,
		written: size, changed: make(chan struct{}), keep: true}
	err := s.commitFile(w, e.d, size, origin)
	e.done = err == nil
	e.mu.Unlock()
	if err != nil {
		return err
	}
	s.declared.mu.Lock()
	if s.declared.m[e.d] == e {
		delete(s.declared.m, e.d) // new pushes find the blob stored
	}
	s.declared.mu.Unlock()
	return nil
}

// storedAgainNow is storedAgain for a blob that a push sharing the file
// committed a moment ago.
func (s *Store) storedAgainNow(d digest.Digest, origin Origin) error {
	defer s.locks.Lock(string(d))()
	info, err := s.StatBlob(d)
	if err != nil {
		return err
	}
	return s.storedAgain(info, origin)
}

// joinDeclared returns the shared write of d, starting one if there is
// none (or only a broken one).
func (s *Store) joinDeclared(d digest.Digest) (*declaredWrite, error) {
	s.declared.mu.Lock()
	defer s.declared.mu.Unlock()
	if e := s.declared.m[d]; e != nil {
		e.mu.Lock()
		ok, done := !e.broken && !e.done, e.done
		if ok {
			e.users++
		}
		e.mu.Unlock()
		if ok {
			return e, nil
		}
		if done {
			return nil, errStoredNow
		}
	}
	// A shared write leaves the map only after its blob is indexed: a
	// push that missed both finds the blob here.
	if _, err := s.StatBlob(d); err == nil {
		return nil, errStoredNow
	}
	e := &declaredWrite{d: d, users: 1}
	if err := e.create(s, ""); err != nil {
		return nil, err
	}
	if s.declared.m == nil {
		s.declared.m = map[digest.Digest]*declaredWrite{}
	}
	s.declared.m[d] = e
	return e, nil
}

// leaveDeclared ends a push's use of the shared write; the last one out
// closes and removes the temp file (a committed blob lives on in its own
// link).
func (s *Store) leaveDeclared(e *declaredWrite) {
	s.declared.mu.Lock()
	e.mu.Lock()
	e.users--
	last := e.users == 0
	if last && s.declared.m[e.d] == e {
		delete(s.declared.m, e.d)
	}
	e.mu.Unlock()
	s.declared.mu.Unlock()
	if last {
		e.close()
	}
}

// verifyOnly hashes the body of a blob that is stored (and held open by
// the caller, so neither GC nor eviction removes it) and, if it matches,
// records the push: the blob becomes pushed content and the push a use.
func (s *Store) verifyOnly(d digest.Digest, r io.Reader, size int64, origin Origin) error {
	h := d.Algorithm().Hash()
	bufp := uploadBufs.Get().(*[]byte)
	n, err := io.CopyBuffer(h, r, *bufp)
	uploadBufs.Put(bufp)
	if err != nil {
		return err
	}
	if size >= 0 && n != size {
		return fmt.Errorf("%w: got %d bytes, want %d", ErrSizeMismatch, n, size)
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return fmt.Errorf("%w: got %s, want %s", ErrDigestMismatch, got, d)
	}
	return s.storedAgainNow(d, origin)
}

// holdBlob opens a stored blob's file and counts it as a reader, without
// counting a use: a push that only verifies is not a pull.
func (s *Store) holdBlob(d digest.Digest) (*os.File, error) {
	if _, err := s.StatBlob(d); err != nil {
		return nil, err
	}
	defer s.locks.Lock(string(d))()
	f, err := os.Open(s.blobPath(d))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	s.trackReader(d, f)
	return f, nil
}

// writeBlob is the plain write: temp file, then Commit.
func (s *Store) writeBlob(d digest.Digest, r io.Reader, size int64, origin Origin) error {
	w, err := s.NewBlobWriter(d.Algorithm())
	if err != nil {
		return err
	}
	defer w.Cancel()
	bufp := uploadBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(w, r, *bufp)
	uploadBufs.Put(bufp)
	if err != nil {
		return err
	}
	return w.Commit(d, size, origin)
}
