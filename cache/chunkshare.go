package cache

import (
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"
)

// Chunked pushes of one layer share one file. docker push and crane
// name the digest only at the final PUT, so parallel CI jobs pushing the
// same layer would each write (and flush) a copy that all but one throw
// away. Instead, an upload's first chunk is keyed by the hash of its first
// bytes, and uploads whose first bytes agree write one file together the
// way pushes of a declared digest do (declared.go): bytes the file has are
// compared, bytes past its end appended. An upload whose bytes differ goes
// on in its own file, starting with a copy of the prefix it agreed on. The
// first upload whose PUT names the file's bytes commits it (one fsync);
// the others find the blob stored and cost nothing more.
//
// A shared file is named "chunks-…" under tmp/, and every upload on it
// names it in its state, so a restart keeps it. Its members are known
// only in memory: after a restart, each upload on it copies its prefix to
// a file of its own before going on, and the shared file is left to
// ReapUploads once no upload names it.

const (
	// sharedChunksPrefix starts the name of a shared upload file.
	sharedChunksPrefix = "chunks-"
	// shareKeyBytes is how much of a first chunk keys the file it joins;
	// a shorter first chunk (a small blob) is written alone.
	shareKeyBytes = 256 << 10
)

// chunkGroup is a file that chunked uploads write together.
type chunkGroup struct {
	sharedFile
	key     string
	members map[string]bool // upload ids on it (under chunkGroups.mu)
	// what it was committed as (under mu, once done)
	doneDigest digest.Digest
	doneSize   int64
}

type chunkGroups struct {
	mu     sync.Mutex
	byKey  map[string]*chunkGroup // the file that new uploads with this key join
	byName map[string]*chunkGroup // every open shared file, by its name under tmp/
}

func isSharedChunks(temp string) bool { return strings.HasPrefix(temp, sharedChunksPrefix) }

// group returns the shared file upload id is on, if it is on one this
// process has open.
func (s *Store) group(id, temp string) *chunkGroup {
	if !isSharedChunks(temp) {
		return nil
	}
	s.chunks.mu.Lock()
	defer s.chunks.mu.Unlock()
	if g := s.chunks.byName[temp]; g != nil && g.members[id] {
		return g
	}
	return nil
}

// joinGroup puts upload id on the shared file for key, starting one if
// none is open to new uploads.
func (s *Store) joinGroup(id, key string) (*chunkGroup, error) {
	s.chunks.mu.Lock()
	defer s.chunks.mu.Unlock()
	if g := s.chunks.byKey[key]; g != nil {
		g.mu.Lock()
		ok := !g.done && !g.broken
		g.mu.Unlock()
		if ok {
			g.members[id] = true
			return g, nil
		}
		delete(s.chunks.byKey, key)
	}
	g := &chunkGroup{key: key, members: map[string]bool{id: true}}
	if err := g.create(s, sharedChunksPrefix); err != nil {
		return nil, err
	}
	if s.chunks.byKey == nil {
		s.chunks.byKey, s.chunks.byName = map[string]*chunkGroup{}, map[string]*chunkGroup{}
	}
	s.chunks.byKey[key], s.chunks.byName[filepath.Base(g.path)] = g, g
	return g, nil
}

// closeGroupLocked forgets a shared file nobody is on and removes it.
func (s *Store) closeGroupLocked(g *chunkGroup) {
	if s.chunks.byKey[g.key] == g {
		delete(s.chunks.byKey, g.key)
	}
	delete(s.chunks.byName, filepath.Base(g.path))
	g.close()
}

// releaseTemp is called when upload id no longer uses temp: its own file
// is removed, its place on a shared file given up (the file goes with its
// last upload). A shared file this process does not have open is left to
// ReapUploads: other uploads may name it.
func (s *Store) releaseTemp(id, temp string) {
	if !isSharedChunks(temp) {
		os.Remove(filepath.Join(s.tmpDir(), temp))
		return
	}
	s.chunks.mu.Lock()
	defer s.chunks.mu.Unlock()
	g := s.chunks.byName[temp]
	if g == nil || !g.members[id] {
		return
	}
	delete(g.members, id)
	if len(g.members) == 0 {
		s.closeGroupLocked(g)
	}
}

// closeGroups closes the shared files at Close, and keeps them: the
// uploads on them name them, and go on from them after a restart.
func (s *Store) closeGroups() {
	s.chunks.mu.Lock()
	defer s.chunks.mu.Unlock()
	for name, g := range s.chunks.byName {
		g.wb.stop()
		g.f.Close()
		delete(s.chunks.byName, name)
		delete(s.chunks.byKey, g.key)
	}
}

// pruneGroups drops from the shared files the uploads whose state is gone
// (expired), and closes the files nobody is on. live: the uploads' ids
// when the caller looked; one missing from it is looked up again, since
// it may have started since.
func (s *Store) pruneGroups(live map[string]bool) {
	s.chunks.mu.Lock()
	defer s.chunks.mu.Unlock()
	for _, g := range s.chunks.byName {
		for id := range g.members {
			if live[id] {
				continue
			}
			if _, err := s.getUpload(id); errors.Is(err, ErrNotFound) {
				delete(g.members, id)
			}
		}
		if len(g.members) == 0 {
			s.closeGroupLocked(g)
		}
	}
}

// ownFile is an upload's own file, open for appending at its end.
type ownFile struct {
	f   *os.File
	out io.Writer
	wb  *writeBehind
}

func (o *ownFile) close() {
	o.wb.stop()
	o.f.Close()
}

// openOwn opens upload u's own file to append at u.Size, dropping bytes
// past it (from a chunk that failed, or a crash).
func (s *Store) openOwn(u *uploadState) (*ownFile, error) {
	f, err := os.OpenFile(filepath.Join(s.tmpDir(), u.temp), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("cache: open upload: %w", err)
	}
	if err := f.Truncate(u.Size); err != nil {
		f.Close()
		return nil, fmt.Errorf("cache: %w", err)
	}
	if _, err := f.Seek(u.Size, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("cache: %w", err)
	}
	out, wb := behind(s.wrapWrite(f), f, u.Size)
	return &ownFile{f: f, out: out, wb: wb}, nil
}

// splitOwn starts a file of upload u's own holding the first n bytes of
// from (which agree with the upload's), and makes it u's temp.
func (s *Store) splitOwn(u *uploadState, from *os.File, n int64) (*ownFile, error) {
	path, f, err := s.createTemp()
	if err != nil {
		return nil, err
	}
	out, wb := behind(s.wrapWrite(f), f, 0)
	own := &ownFile{f: f, out: out, wb: wb}
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	if _, err := io.CopyBuffer(out, io.NewSectionReader(from, 0, n), *bufp); err != nil {
		own.close()
		os.Remove(path)
		return nil, s.writeErr("copy upload", err)
	}
	u.temp = filepath.Base(path)
	return own, nil
}

// appendChunk reads a chunk of upload u (at u.Size) from r into h and
// wherever the upload's bytes go: its shared file, or its own. It may
// move the upload (u.temp): onto a shared file with its first chunk, or
// off one to its own file where its bytes part from the others'. It
// returns how many bytes the chunk had.
func (s *Store) appendChunk(u *uploadState, r io.Reader, h hash.Hash, share bool) (int64, error) {
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	buf := *bufp
	g := s.group(u.ID, u.temp)
	var own *ownFile
	var n int64
	switch {
	case g != nil:
	case isSharedChunks(u.temp):
		// A shared file this process does not have open (it
		// restarted): go on alone.
		f, err := os.Open(filepath.Join(s.tmpDir(), u.temp))
		if err != nil {
			return 0, fmt.Errorf("cache: open upload: %w", err)
		}
		own, err = s.splitOwn(u, f, u.Size)
		f.Close()
		if err != nil {
			return 0, err
		}
	case share && u.Size == 0:
		k, err := io.ReadFull(r, buf[:shareKeyBytes])
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
			return 0, err
		}
		h.Write(buf[:k])
		if k == shareKeyBytes {
			state, err := h.(encoding.BinaryMarshaler).MarshalBinary()
			if err != nil {
				return 0, err
			}
			if g, err = s.joinGroup(u.ID, string(state)); err != nil {
				return 0, err
			}
			u.temp = filepath.Base(g.path)
		} else if own, err = s.openOwn(u); err != nil {
			return 0, err
		}
		if n, err = s.take(u, g, &own, buf[:k], 0); err != nil {
			return n, err
		}
	default:
		var err error
		if own, err = s.openOwn(u); err != nil {
			return 0, err
		}
	}
	defer func() {
		if own != nil {
			own.close()
		}
	}()
	cmpp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(cmpp)
	for {
		k, rerr := r.Read(buf)
		if k > 0 {
			h.Write(buf[:k])
			m, err := s.take(u, g, &own, buf[:k], n)
			n += m
			if err != nil {
				return n, err
			}
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

// take puts chunk, the upload's bytes at u.Size+off, in its shared file
// (compared or appended) or its own; where they part from the shared
// file's, it starts the upload's own file (*own).
func (s *Store) take(u *uploadState, g *chunkGroup, own **ownFile, chunk []byte, off int64) (int64, error) {
	if *own == nil && g != nil {
		cmpp := uploadBufs.Get().(*[]byte)
		agreed, _, err := g.apply(u.Size+off, chunk, *cmpp)
		uploadBufs.Put(cmpp)
		if err != nil {
			return 0, s.writeErr("append upload", err)
		}
		if agreed {
			return int64(len(chunk)), nil
		}
		if *own, err = s.splitOwn(u, g.f, u.Size+off); err != nil {
			return 0, err
		}
	}
	k, err := (*own).out.Write(chunk)
	if err != nil {
		return int64(k), s.writeErr("append upload", err)
	}
	return int64(k), nil
}

// errGoAlone: the upload's shared file is not exactly its blob (it is
// longer, or was committed as another); the upload commits a copy.
var errGoAlone = errors.New("cache: the shared file is not this upload's blob")

// commitGroup commits upload u, on shared file g, as blob d: the file
// itself if it holds exactly the upload's bytes, or nothing at all if it
// was committed as d already.
func (s *Store) commitGroup(u uploadState, g *chunkGroup, d digest.Digest, origin Origin) error {
	if d.Algorithm() != digest.SHA256 {
		return errGoAlone
	}
	h, err := restoreSHA256(u.hash)
	if err != nil {
		return err
	}
	got := digest.NewDigest(digest.SHA256, h)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.done {
		if g.doneDigest != d || g.doneSize != u.Size {
			return errGoAlone
		}
		if got != d {
			return fmt.Errorf("%w: got %s, want %s", ErrDigestMismatch, got, d)
		}
		if err := s.storedAgainNow(d, origin); !errors.Is(err, ErrNotFound) {
			return err
		}
		return errGoAlone // collected meanwhile: store it again
	}
	if g.end.Load() != u.Size {
		return errGoAlone
	}
	// Its own descriptor: a failed commit closes nothing the group uses.
	f, err := os.OpenFile(g.path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	defer f.Close()
	g.wb.stop()
	w := &BlobWriter{
		s: s, f: f, out: f, alg: digest.SHA256, digester: hashDigester{digest.SHA256, h},
		path: g.path, written: u.Size, changed: make(chan struct{}), keep: true,
	}
	defer w.Cancel()
	if err := w.Commit(d, u.Size, origin); err != nil {
		return err
	}
	g.done, g.doneDigest, g.doneSize = true, d, u.Size
	return nil
}

// commitAlone commits a copy of the first u.Size bytes of a shared file
// as blob d. The upload stays on the shared file until it ends, so a
// commit that fails for a reason that may pass can be retried.
func (s *Store) commitAlone(u uploadState, d digest.Digest, origin Origin) error {
	from, err := os.Open(filepath.Join(s.tmpDir(), u.temp))
	if err != nil {
		return fmt.Errorf("cache: open upload: %w", err)
	}
	defer from.Close()
	w, err := s.NewBlobWriter(d.Algorithm())
	if err != nil {
		return err
	}
	defer w.Cancel()
	bufp := uploadBufs.Get().(*[]byte)
	defer uploadBufs.Put(bufp)
	if _, err := io.CopyBuffer(w, io.NewSectionReader(from, 0, u.Size), *bufp); err != nil {
		return err
	}
	return w.Commit(d, u.Size, origin)
}
