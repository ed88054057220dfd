package cache

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// tmpFiles lists the files left in the store's tmp/.
func tmpFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// chunkedPush pushes b as docker and crane do, the digest known only at
// the PUT: POST, PATCHes of chunk bytes, PUT with no body. between, if
// set, runs after the first PATCH.
func chunkedPush(s *Store, b []byte, chunk int, d digest.Digest, between func()) error {
	u, err := s.CreateUpload("app", time.Hour)
	if err != nil {
		return err
	}
	for off := 0; off < len(b); off += chunk {
		end := min(off+chunk, len(b))
		if _, err := s.AppendUpload(u.ID, int64(off), bytes.NewReader(b[off:end]), int64(end-off), time.Hour); err != nil {
			return err
		}
		if off == 0 && between != nil {
			between()
		}
	}
	_, err = s.FinishUpload(u.ID, int64(len(b)), nil, 0, d, OriginPushed, time.Hour)
	return err
}

// Sixteen chunked pushes of one layer at once, as parallel CI jobs make
// them: the bytes reach the disk once, however many pushes carry them, and
// every push succeeds. (Each push's first chunk lands before any goes on,
// so that all are under way together, as in CI.)
func TestConcurrentChunkedPushesOfOneBlobWriteItOnce(t *testing.T) {
	var wrote atomic.Int64
	s, dir := newStoreOpts(t, Options{WrapWrite: func(w io.Writer) io.Writer { return countingWriter{w, &wrote} }})
	b := testBytes(4<<20, 3)
	d := digest.FromBytes(b)
	const pushes = 16
	var started sync.WaitGroup
	started.Add(pushes)
	var g errgroup.Group
	for range pushes {
		g.Go(func() error {
			return chunkedPush(s, b, 1<<20, d, func() {
				started.Done()
				started.Wait()
			})
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	checkStored(t, s, d, b, OriginPushed)
	if n := wrote.Load(); n != int64(len(b)) {
		t.Errorf("%d pushes of a %d-byte blob wrote %d bytes (%.1f copies), want one copy", pushes, len(b), n, float64(n)/float64(len(b)))
	}
	if left := tmpFiles(t, dir); len(left) != 0 {
		t.Errorf("tmp/ still holds %v", left)
	}
}

// Chunked pushes that share a file part ways where their bytes do: a
// blob that shares only its first MiB, a push whose digest is wrong, one
// that is canceled halfway, and a slow one that is still comparing when
// the file is committed. Each gets what it would alone.
func TestChunkedPushesThatShareAPrefixPartWays(t *testing.T) {
	s, dir := newStore(t)
	x := testBytes(3<<20, 5)
	y := append(append([]byte(nil), x[:1<<20]...), testBytes(2<<20+12345, 6)...)
	dx, dy := digest.FromBytes(x), digest.FromBytes(y)
	var started sync.WaitGroup
	const pushes = 5
	started.Add(pushes)
	together := func() { started.Done(); started.Wait() }
	var g errgroup.Group
	g.Go(func() error { return chunkedPush(s, x, 512<<10, dx, together) })
	g.Go(func() error { return chunkedPush(s, y, 1<<20, dy, together) })
	g.Go(func() error {
		err := chunkedPush(s, x, 768<<10, dy, together)
		if !errors.Is(err, ErrDigestMismatch) {
			return errors.New("a push of x named as y: " + errString(err))
		}
		return nil
	})
	g.Go(func() error {
		u, err := s.CreateUpload("app", time.Hour)
		if err != nil {
			return err
		}
		if _, err := s.AppendUpload(u.ID, 0, bytes.NewReader(x[:1<<20]), 1<<20, time.Hour); err != nil {
			return err
		}
		together()
		return s.DeleteUpload(u.ID)
	})
	slow := make(chan struct{})
	g.Go(func() error {
		return chunkedPush(s, x, 1<<20, dx, func() { together(); <-slow })
	})
	// The slow push goes on once the others are done (x is stored by then).
	go func() {
		for range 200 {
			if _, err := s.StatBlob(dy); err == nil {
				if _, err := s.StatBlob(dx); err == nil {
					break
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
		close(slow)
	}()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	checkStored(t, s, dx, x, OriginPushed)
	checkStored(t, s, dy, y, OriginPushed)
	if left := tmpFiles(t, dir); len(left) != 0 {
		t.Errorf("tmp/ still holds %v", left)
	}
	if n, err := s.UploadsOpen(); err != nil || n != 0 {
		t.Errorf("%d uploads open, %v", n, err)
	}
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

// Pushes that shared a file go on after a restart, each on its own, and
// the shared file goes once no upload refers to it.
func TestSharedChunksResumeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := testBytes(2<<20, 9)
	d := digest.FromBytes(b)
	var ids []string
	for range 3 {
		u, err := s.CreateUpload("app", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.AppendUpload(u.ID, 0, bytes.NewReader(b[:1<<20]), 1<<20, time.Hour); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, u.ID)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// One is canceled, one finishes in its PUT, one in a PATCH then a PUT.
	if err := s.DeleteUpload(ids[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FinishUpload(ids[1], 1<<20, bytes.NewReader(b[1<<20:]), int64(len(b)-1<<20), d, OriginPushed, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendUpload(ids[2], 1<<20, bytes.NewReader(b[1<<20:]), int64(len(b)-1<<20), time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FinishUpload(ids[2], -1, nil, 0, d, OriginPushed, time.Hour); err != nil {
		t.Fatal(err)
	}
	checkStored(t, s, d, b, OriginPushed)
	if _, err := s.ReapUploads(0); err != nil {
		t.Fatal(err)
	}
	if left := tmpFiles(t, dir); len(left) != 0 {
		t.Errorf("tmp/ still holds %v", left)
	}
}

// Uploads whose state expired give up their place on a shared file: it
// stays while an upload names it, and goes with the last.
func TestExpiredUploadsLeaveTheirSharedFile(t *testing.T) {
	s, dir := newStore(t)
	b := testBytes(1<<20, 11)
	var ids []string
	for range 2 {
		u, err := s.CreateUpload("app", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.AppendUpload(u.ID, 0, bytes.NewReader(b), int64(len(b)), time.Hour); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, u.ID)
	}
	if left := tmpFiles(t, dir); len(left) != 1 || !isSharedChunks(left[0]) {
		t.Fatalf("two uploads of the same bytes: tmp/ holds %v, want one shared file", left)
	}
	for i, id := range ids {
		if err := s.deleteUploadKey(id); err != nil { // as its ttl does
			t.Fatal(err)
		}
		if _, err := s.ReapUploads(0); err != nil {
			t.Fatal(err)
		}
		if left := tmpFiles(t, dir); len(left) != 1-i {
			t.Fatalf("%d of 2 uploads expired: tmp/ holds %v", i+1, left)
		}
	}
}
