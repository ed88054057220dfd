package cache

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Pushes that name their digest before their body (a monolithic PUT, a
// POST with ?digest=) are written once however many arrive together. CI
// jobs push the same base layers at the same moment: of 16 pushes of one
// layer, one writes and fsyncs it and the other 15 wait, then only hash
// their bodies against the stored blob. A waiter reads no byte of its body
// until the writer is done, so if the writer fails (its client went away,
// its bytes were wrong) nothing is lost: the waiter writes its own copy.

// declaredStall is how long a waiter waits for a writer that receives
// nothing before it writes its own copy: a stalled client must not hold
// up the others. Tests shorten it.
var declaredStall = 2 * time.Second

// declaredWrite is the one write in flight of a declared digest.
type declaredWrite struct {
	received   atomic.Int64 // body bytes read so far
	committing atomic.Bool  // reading is done; the commit (fsync) runs
	waiters    atomic.Int32 // for tests: how many wait for it now
	done       chan struct{}
}

type declaredWrites struct {
	mu sync.Mutex
	m  map[digest.Digest]*declaredWrite
}

// WriteDeclared stores what r yields as blob d, which the client declared
// (size is its declared length, or negative). It verifies the size and the
// digest, like Commit, and errs with ErrSizeMismatch or ErrDigestMismatch.
// A blob already stored is not written again: the body is only hashed.
func (s *Store) WriteDeclared(d digest.Digest, r io.Reader, size int64, origin Origin) error {
	if err := d.Validate(); err != nil {
		return err
	}
	// Bounded: each round waits for a writer that ended; a third writer
	// failing in a row is rare enough to write our own copy.
	for round := 0; round < 3; round++ {
		if f, err := s.holdBlob(d); err == nil {
			defer f.Close()
			return s.verifyOnly(d, r, size, origin)
		}
		e, mine := s.claimDeclared(d)
		if mine {
			defer s.releaseDeclared(d, e)
			return s.writeBlob(d, &countingReader{r: r, n: &e.received}, size, origin, &e.committing)
		}
		if !waitDeclared(e) {
			break
		}
	}
	return s.writeBlob(d, r, size, origin, nil)
}

func (s *Store) claimDeclared(d digest.Digest) (e *declaredWrite, mine bool) {
	s.declared.mu.Lock()
	defer s.declared.mu.Unlock()
	if e := s.declared.m[d]; e != nil {
		return e, false
	}
	if s.declared.m == nil {
		s.declared.m = map[digest.Digest]*declaredWrite{}
	}
	e = &declaredWrite{done: make(chan struct{})}
	s.declared.m[d] = e
	return e, true
}

func (s *Store) releaseDeclared(d digest.Digest, e *declaredWrite) {
	s.declared.mu.Lock()
	delete(s.declared.m, d)
	s.declared.mu.Unlock()
	close(e.done)
}

// waitDeclared waits until the write ends (true) or receives nothing for
// declaredStall while not committing (false).
func waitDeclared(e *declaredWrite) bool {
	e.waiters.Add(1)
	defer e.waiters.Add(-1)
	t := time.NewTicker(declaredStall)
	defer t.Stop()
	last := e.received.Load()
	for {
		select {
		case <-e.done:
			return true
		case <-t.C:
			n := e.received.Load()
			if n == last && !e.committing.Load() {
				return false
			}
			last = n
		}
	}
}

// writeBlob is the plain write: temp file, then Commit. committing, if
// not nil, is set when the body has been read.
func (s *Store) writeBlob(d digest.Digest, r io.Reader, size int64, origin Origin, committing *atomic.Bool) error {
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
	if committing != nil {
		committing.Store(true)
	}
	return w.Commit(d, size, origin)
}

// verifyOnly hashes the body of a blob that is stored (and held open by
// the caller, so eviction leaves it) and, if it matches, records a push.
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
	if origin != OriginPushed {
		return nil
	}
	defer s.locks.Lock(string(d))()
	info, err := s.StatBlob(d)
	if err != nil || info.Origin == OriginPushed {
		return err
	}
	info.Origin = OriginPushed
	return s.set(keyBlob(d), encodeBlob(info))
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

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}
