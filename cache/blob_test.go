package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

const (
	// waitLong bounds every wait for something that must happen.
	waitLong = 10 * time.Second
	// quiet is how long a negative check ("this Read is still blocked")
	// watches. It never synchronizes anything: a Read that returns early
	// fails the test whatever the timing.
	quiet = 20 * time.Millisecond
)

// newStore opens a store in a fresh temp dir and closes it when the test ends.
func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	return newStoreOpts(t, Options{})
}

func newStoreOpts(t *testing.T, opt Options) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(dir, opt)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s, dir
}

// stepClock is an injected clock that moves one second per call.
func stepClock() func() time.Time {
	var n atomic.Int64
	base := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	return func() time.Time { return base.Add(time.Duration(n.Add(1)) * time.Second) }
}

// testBytes returns n deterministic pseudo-random bytes.
func testBytes(n int, seed byte) []byte {
	var s [32]byte
	s[0] = seed
	b := make([]byte, n)
	rand.NewChaCha8(s).Read(b)
	return b
}

// tmpEntries lists dataDir/tmp.
func tmpEntries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "tmp"))
	if err != nil {
		t.Fatalf("read tmp: %v", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func assertTmpEmpty(t *testing.T, dir string) {
	t.Helper()
	if ents := tmpEntries(t, dir); len(ents) != 0 {
		t.Fatalf("tmp/ is not empty: %v", ents)
	}
}

// blobFiles lists the regular files under dataDir/blobs, relative to it.
func blobFiles(t *testing.T, dir string) []string {
	t.Helper()
	root := filepath.Join(dir, "blobs")
	var files []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(root, p)
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk blobs: %v", err)
	}
	sort.Strings(files)
	return files
}

func wantBlobPath(d digest.Digest) string {
	return string(d.Algorithm()) + "/" + d.Encoded()[:2] + "/" + d.Encoded()
}

// countKeys counts index keys with a one-byte prefix.
func countKeys(t *testing.T, s *Store, prefix byte) int {
	t.Helper()
	n := 0
	err := s.ix.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.PrefetchValues = false
		o.Prefix = []byte{prefix}
		it := txn.NewIterator(o)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatalf("count keys: %v", err)
	}
	return n
}

func lockCount(s *Store) int {
	s.locks.mu.Lock()
	defer s.locks.mu.Unlock()
	return len(s.locks.locks)
}

// writeAll writes b to w in chunks of at most chunk bytes.
func writeAll(t *testing.T, w io.Writer, b []byte, chunk int) {
	t.Helper()
	for len(b) > 0 {
		n := min(chunk, len(b))
		m, err := w.Write(b[:n])
		if err != nil {
			t.Fatalf("Write: %v", err)
		}
		if m != n {
			t.Fatalf("Write wrote %d of %d bytes", m, n)
		}
		b = b[n:]
	}
}

func readBlob(t *testing.T, s *Store, d digest.Digest) ([]byte, BlobInfo) {
	t.Helper()
	f, info, err := s.OpenBlob(d)
	if err != nil {
		t.Fatalf("OpenBlob(%s): %v", d, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatalf("read blob: %v", err)
	}
	return b, info
}

func assertNotStored(t *testing.T, s *Store, dir string, d digest.Digest) {
	t.Helper()
	if _, err := s.StatBlob(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("StatBlob(%s) = %v, want ErrNotFound", d, err)
	}
	if f, _, err := s.OpenBlob(d); !errors.Is(err, ErrNotFound) {
		if f != nil {
			f.Close()
		}
		t.Fatalf("OpenBlob(%s) = %v, want ErrNotFound", d, err)
	}
	if files := blobFiles(t, dir); len(files) != 0 {
		t.Fatalf("blobs/ holds %v, want nothing", files)
	}
	if n := countKeys(t, s, prefixBlob); n != 0 {
		t.Fatalf("%d blob index entries, want 0", n)
	}
}

type readResult struct {
	b   []byte
	err error
}

// readAsync runs one Read of up to size bytes in a goroutine.
func readAsync(r io.Reader, size int) <-chan readResult {
	ch := make(chan readResult, 1)
	go func() {
		p := make([]byte, size)
		n, err := r.Read(p)
		ch <- readResult{p[:n], err}
	}()
	return ch
}

func assertBlocked(t *testing.T, ch <-chan readResult, what string) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("%s: Read returned %d bytes, err %v; want it to block", what, len(r.b), r.err)
	case <-time.After(quiet):
	}
}

func await(t *testing.T, ch <-chan readResult, what string) readResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitLong):
		t.Fatalf("%s: Read still blocked after %v", what, waitLong)
		return readResult{}
	}
}

func follow(t *testing.T, w *BlobWriter, ctx context.Context) io.ReadCloser {
	t.Helper()
	r, err := w.Follow(ctx)
	if err != nil {
		t.Fatalf("Follow: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestCommit(t *testing.T) {
	clock := stepClock()
	s, dir := newStoreOpts(t, Options{Now: clock})
	data := testBytes(64<<10+3, 1)
	d := digest.FromBytes(data)

	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 4096)
	if got := w.Size(); got != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", got, len(data))
	}
	if n := len(tmpEntries(t, dir)); n != 1 {
		t.Fatalf("tmp/ holds %d files while writing, want 1", n)
	}
	// Not visible before Commit.
	assertNotStored(t, s, dir, d)

	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatalf("Commit: %v", err)
	}

	if files := blobFiles(t, dir); len(files) != 1 || files[0] != wantBlobPath(d) {
		t.Fatalf("blobs/ = %v, want [%s]", files, wantBlobPath(d))
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, data) {
		t.Fatal("file bytes differ from what was written")
	}
	assertTmpEmpty(t, dir)

	info, err := s.StatBlob(d)
	if err != nil {
		t.Fatalf("StatBlob: %v", err)
	}
	if info.Digest != d || info.Size != int64(len(data)) || info.Origin != OriginPulled {
		t.Fatalf("StatBlob = %+v", info)
	}
	if info.StoredAt.IsZero() || info.StoredAt.Before(time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("StoredAt = %v, want the injected clock's time", info.StoredAt)
	}
	if n := countKeys(t, s, prefixBlob); n != 1 {
		t.Fatalf("%d blob index entries, want 1", n)
	}

	got, oinfo := readBlob(t, s, d)
	if !bytes.Equal(got, data) {
		t.Fatal("OpenBlob bytes differ")
	}
	if oinfo != info {
		t.Fatalf("OpenBlob info %+v, StatBlob %+v", oinfo, info)
	}
	if lockCount(s) != 0 {
		t.Fatal("keyed lock map not empty after Commit")
	}
}

func TestCommitUnknownSize(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(1000, 2)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter(digest.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 333)
	if err := w.Commit(d, -1, OriginPushed); err != nil {
		t.Fatalf("Commit(size -1): %v", err)
	}
	info, err := s.StatBlob(d)
	if err != nil || info.Size != 1000 || info.Origin != OriginPushed {
		t.Fatalf("StatBlob = %+v, %v", info, err)
	}
	assertTmpEmpty(t, dir)
}

func TestCommitEmptyBlob(t *testing.T) {
	s, dir := newStore(t)
	d := digest.FromBytes(nil)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	r := follow(t, w, context.Background())
	pending := readAsync(r, 10)
	assertBlocked(t, pending, "empty blob before Commit")
	if err := w.Commit(d, 0, OriginPulled); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if res := await(t, pending, "empty blob after Commit"); len(res.b) != 0 || res.err != io.EOF {
		t.Fatalf("Read = %d bytes, %v; want 0, io.EOF", len(res.b), res.err)
	}
	got, info := readBlob(t, s, d)
	if len(got) != 0 || info.Size != 0 {
		t.Fatalf("empty blob: %d bytes, size %d", len(got), info.Size)
	}
	assertTmpEmpty(t, dir)
}

func TestCommitMismatch(t *testing.T) {
	data := testBytes(10<<10, 3)
	good := digest.FromBytes(data)
	other := digest.FromString("something else")
	n := int64(len(data))
	tests := []struct {
		name string
		d    digest.Digest
		size int64
		want error
	}{
		{"digest", other, n, ErrDigestMismatch},
		{"digest unknown size", other, -1, ErrDigestMismatch},
		{"size too big", good, n + 1, ErrSizeMismatch},
		{"size too small", good, n - 1, ErrSizeMismatch},
		{"size zero", good, 0, ErrSizeMismatch},
		{"both", other, n + 1, ErrSizeMismatch},
		{"sha512 digest", digest.SHA512.FromString("x"), n, ErrDigestMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, dir := newStore(t)
			w, err := s.NewBlobWriter("")
			if err != nil {
				t.Fatal(err)
			}
			defer w.Cancel()
			writeAll(t, w, data, 1024)
			r := follow(t, w, context.Background())
			// The follower may have all but the last byte, never the last.
			head := make([]byte, len(data)-1)
			if _, err := io.ReadFull(r, head); err != nil {
				t.Fatalf("follower ReadFull: %v", err)
			}
			pending := readAsync(r, 10)
			assertBlocked(t, pending, "last byte before Commit")

			err = w.Commit(tt.d, tt.size, OriginPushed)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Commit = %v, want %v", err, tt.want)
			}
			if res := await(t, pending, "follower after failed Commit"); len(res.b) != 0 || !errors.Is(res.err, tt.want) {
				t.Fatalf("follower got %d bytes, %v; want 0 bytes, %v", len(res.b), res.err, tt.want)
			}
			assertNotStored(t, s, dir, tt.d)
			assertNotStored(t, s, dir, good)
			assertTmpEmpty(t, dir)

			// The writer is dead: no more writes, follows or commits.
			if _, err := w.Write([]byte("x")); err == nil {
				t.Fatal("Write after failed Commit succeeded")
			}
			if _, err := w.Follow(context.Background()); !errors.Is(err, tt.want) {
				t.Fatalf("Follow after failed Commit = %v, want %v", err, tt.want)
			}
			if err := w.Commit(good, n, OriginPushed); err == nil {
				t.Fatal("second Commit after a failed one succeeded")
			}
			assertNotStored(t, s, dir, good)

			// Nothing is poisoned: the next writer stores it.
			if err := s.PutBlob(bytes.NewReader(data), good, OriginPulled); err != nil {
				t.Fatalf("PutBlob after failed Commit: %v", err)
			}
			if got, _ := readBlob(t, s, good); !bytes.Equal(got, data) {
				t.Fatal("stored bytes differ")
			}
			assertTmpEmpty(t, dir)
		})
	}
}

func TestCommitInvalidDigest(t *testing.T) {
	for _, bad := range []digest.Digest{"", "sha256:abc", "sha256", "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:../../../../etc/passwd"} {
		t.Run(string(bad), func(t *testing.T) {
			s, dir := newStore(t)
			w, err := s.NewBlobWriter("")
			if err != nil {
				t.Fatal(err)
			}
			defer w.Cancel()
			writeAll(t, w, []byte("hello"), 5)
			if err := w.Commit(bad, 5, OriginPushed); err == nil {
				t.Fatalf("Commit(%q) succeeded", bad)
			}
			assertTmpEmpty(t, dir)
			if files := blobFiles(t, dir); len(files) != 0 {
				t.Fatalf("blobs/ = %v", files)
			}
		})
	}
}

func TestNewBlobWriterUnavailable(t *testing.T) {
	s, dir := newStore(t)
	if w, err := s.NewBlobWriter("md5"); err == nil {
		w.Cancel()
		t.Fatal("NewBlobWriter(md5) succeeded")
	}
	assertTmpEmpty(t, dir)
}

func TestPutBlob(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(3<<20, 4) // a few MiB
	d := digest.FromBytes(data)
	if err := s.PutBlob(bytes.NewReader(data), d, OriginPushed); err != nil {
		t.Fatalf("PutBlob: %v", err)
	}
	got, info := readBlob(t, s, d)
	if !bytes.Equal(got, data) || info.Size != int64(len(data)) || info.Origin != OriginPushed {
		t.Fatalf("PutBlob stored %d bytes, info %+v", len(got), info)
	}
	bad := digest.FromString("nope")
	if err := s.PutBlob(bytes.NewReader(data), bad, OriginPushed); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("PutBlob(wrong digest) = %v, want ErrDigestMismatch", err)
	}
	if _, err := s.StatBlob(bad); !errors.Is(err, ErrNotFound) {
		t.Fatalf("StatBlob(wrong digest) = %v", err)
	}
	readErr := errors.New("reader broke")
	if err := s.PutBlob(io.MultiReader(bytes.NewReader(data[:100]), errReader{readErr}), digest.FromBytes(data[:100]), OriginPushed); !errors.Is(err, readErr) {
		t.Fatalf("PutBlob(failing reader) = %v, want %v", err, readErr)
	}
	assertTmpEmpty(t, dir)
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v", files)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestSHA512(t *testing.T) {
	data := testBytes(20<<10, 5)
	d512 := digest.SHA512.FromBytes(data)

	check := func(t *testing.T, s *Store, dir string) {
		t.Helper()
		if files := blobFiles(t, dir); len(files) != 1 || files[0] != wantBlobPath(d512) {
			t.Fatalf("blobs/ = %v, want [%s]", files, wantBlobPath(d512))
		}
		if !bytes.HasPrefix([]byte(blobFiles(t, dir)[0]), []byte("sha512/")) {
			t.Fatal("sha512 blob not under blobs/sha512")
		}
		got, info := readBlob(t, s, d512)
		if !bytes.Equal(got, data) || info.Digest != d512 || info.Size != int64(len(data)) {
			t.Fatalf("stored %d bytes, info %+v", len(got), info)
		}
		if _, err := s.StatBlob(digest.FromBytes(data)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("sha256 of the same bytes is indexed too: %v", err)
		}
		assertTmpEmpty(t, dir)
	}

	t.Run("sha512 writer", func(t *testing.T) {
		s, dir := newStore(t)
		w, err := s.NewBlobWriter(digest.SHA512)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Cancel()
		writeAll(t, w, data, 4096)
		if err := w.Commit(d512, int64(len(data)), OriginPushed); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		check(t, s, dir)
	})
	t.Run("sha256 writer rehashed", func(t *testing.T) {
		s, dir := newStore(t)
		w, err := s.NewBlobWriter(digest.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Cancel()
		writeAll(t, w, data, 4096)
		if err := w.Commit(d512, int64(len(data)), OriginPushed); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		check(t, s, dir)
	})
	t.Run("sha512 writer committed under sha256", func(t *testing.T) {
		s, dir := newStore(t)
		w, err := s.NewBlobWriter(digest.SHA512)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Cancel()
		writeAll(t, w, data, 4096)
		d256 := digest.FromBytes(data)
		if err := w.Commit(d256, -1, OriginPushed); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		if got, _ := readBlob(t, s, d256); !bytes.Equal(got, data) {
			t.Fatal("bytes differ")
		}
		assertTmpEmpty(t, dir)
	})
	t.Run("rehash mismatch", func(t *testing.T) {
		s, dir := newStore(t)
		w, err := s.NewBlobWriter(digest.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Cancel()
		writeAll(t, w, data, 4096)
		wrong := digest.SHA512.FromBytes(data[1:])
		if err := w.Commit(wrong, -1, OriginPushed); !errors.Is(err, ErrDigestMismatch) {
			t.Fatalf("Commit = %v, want ErrDigestMismatch", err)
		}
		assertNotStored(t, s, dir, wrong)
		assertTmpEmpty(t, dir)
	})
}

// Invariant 3: concurrent writers of one digest all succeed and leave one
// file and one index entry.
func TestConcurrentCommitSameDigest(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(256<<10, 6)
	d := digest.FromBytes(data)
	const writers = 16

	start := make(chan struct{})
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := s.NewBlobWriter("")
			if err != nil {
				errs <- err
				return
			}
			defer w.Cancel()
			// Different chunkings, the same bytes.
			rest := data
			for chunk := 1000 + i*997; len(rest) > 0; {
				n := min(chunk, len(rest))
				if _, err := w.Write(rest[:n]); err != nil {
					errs <- err
					return
				}
				rest = rest[n:]
			}
			<-start
			errs <- w.Commit(d, int64(len(data)), OriginPushed)
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("Commit: %v", err)
		}
	}
	if files := blobFiles(t, dir); len(files) != 1 || files[0] != wantBlobPath(d) {
		t.Fatalf("blobs/ = %v, want one file", files)
	}
	if n := countKeys(t, s, prefixBlob); n != 1 {
		t.Fatalf("%d blob index entries, want 1", n)
	}
	assertTmpEmpty(t, dir)
	if got, info := readBlob(t, s, d); !bytes.Equal(got, data) || info.Origin != OriginPushed {
		t.Fatalf("stored %d bytes, origin %v", len(got), info.Origin)
	}
	if lockCount(s) != 0 {
		t.Fatal("keyed lock map not empty after concurrent commits")
	}
}

func TestConcurrentCommitMixedOrigins(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(64<<10, 7)
	d := digest.FromBytes(data)
	const writers = 16
	start := make(chan struct{})
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for i := range writers {
		origin := OriginPulled
		if i%4 == 3 {
			origin = OriginPushed
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- s.PutBlob(bytes.NewReader(data), d, origin)
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("PutBlob: %v", err)
		}
	}
	info, err := s.StatBlob(d)
	if err != nil || info.Origin != OriginPushed {
		t.Fatalf("StatBlob = %+v, %v; want origin pushed", info, err)
	}
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v", files)
	}
	if n := countKeys(t, s, prefixBlob); n != 1 {
		t.Fatalf("%d blob index entries, want 1", n)
	}
	assertTmpEmpty(t, dir)
}

func TestCommitOrigin(t *testing.T) {
	data := testBytes(4096, 8)
	d := digest.FromBytes(data)
	tests := []struct {
		name  string
		steps []Origin
		want  Origin
	}{
		{"pulled", []Origin{OriginPulled}, OriginPulled},
		{"pushed", []Origin{OriginPushed}, OriginPushed},
		{"pulled then pushed upgrades", []Origin{OriginPulled, OriginPushed}, OriginPushed},
		{"pushed then pulled keeps pushed", []Origin{OriginPushed, OriginPulled}, OriginPushed},
		{"pulled twice", []Origin{OriginPulled, OriginPulled}, OriginPulled},
		{"pulled pushed pulled", []Origin{OriginPulled, OriginPushed, OriginPulled}, OriginPushed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, dir := newStoreOpts(t, Options{Now: stepClock()})
			var first time.Time
			for i, o := range tt.steps {
				if err := s.PutBlob(bytes.NewReader(data), d, o); err != nil {
					t.Fatalf("PutBlob #%d: %v", i, err)
				}
				if i == 0 {
					info, _ := s.StatBlob(d)
					first = info.StoredAt
				}
			}
			info, err := s.StatBlob(d)
			if err != nil {
				t.Fatal(err)
			}
			if info.Origin != tt.want {
				t.Fatalf("origin = %v, want %v", info.Origin, tt.want)
			}
			if !info.StoredAt.Equal(first) {
				t.Fatalf("StoredAt moved from %v to %v on a dedup commit", first, info.StoredAt)
			}
			if info.Size != int64(len(data)) {
				t.Fatalf("size = %d", info.Size)
			}
			if files := blobFiles(t, dir); len(files) != 1 {
				t.Fatalf("blobs/ = %v", files)
			}
			assertTmpEmpty(t, dir)
		})
	}
}

func TestCommitExisting(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(32<<10, 9)
	d := digest.FromBytes(data)
	if err := s.PutBlob(bytes.NewReader(data), d, OriginPulled); err != nil {
		t.Fatal(err)
	}
	final := filepath.Join(dir, "blobs", wantBlobPath(d))
	before, err := os.Stat(final)
	if err != nil {
		t.Fatal(err)
	}

	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 5000)
	early := follow(t, w, context.Background()) // opened on the temp file
	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatalf("Commit of an existing blob: %v", err)
	}
	assertTmpEmpty(t, dir)
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v", files)
	}
	after, err := os.Stat(final)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) {
		t.Fatal("the stored file was replaced; want it left alone")
	}
	// A follower opened before the temp file was dropped, and one opened
	// after, both read the whole blob.
	late := follow(t, w, context.Background())
	for name, r := range map[string]io.Reader{"early": early, "late": late} {
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s follower: %d bytes, %v", name, len(got), err)
		}
	}
	// Cancel after a dedup Commit must not remove the stored blob.
	w.Cancel()
	if got, _ := readBlob(t, s, d); !bytes.Equal(got, data) {
		t.Fatal("blob changed")
	}
}

func TestCommitIndexedButFileMissing(t *testing.T) {
	data := testBytes(8<<10, 10)
	d := digest.FromBytes(data)
	tests := []struct {
		name         string
		first, again Origin
		want         Origin
	}{
		{"pulled then pulled", OriginPulled, OriginPulled, OriginPulled},
		{"pulled then pushed", OriginPulled, OriginPushed, OriginPushed},
		// The index said pushed (pinned); restoring its file through a
		// fill must not unpin it.
		{"pushed then pulled", OriginPushed, OriginPulled, OriginPushed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, dir := newStore(t)
			if err := s.PutBlob(bytes.NewReader(data), d, tt.first); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(dir, "blobs", wantBlobPath(d))); err != nil {
				t.Fatal(err)
			}
			if _, err := s.StatBlob(d); err != nil {
				t.Fatalf("StatBlob after removing the file: %v (index entry should remain)", err)
			}
			f, _, err := s.OpenBlob(d)
			if !errors.Is(err, ErrNotFound) {
				if f != nil {
					f.Close()
				}
				t.Fatalf("OpenBlob with the file gone = %v, want ErrNotFound", err)
			}

			w, err := s.NewBlobWriter("")
			if err != nil {
				t.Fatal(err)
			}
			defer w.Cancel()
			writeAll(t, w, data, 1000)
			if err := w.Commit(d, int64(len(data)), tt.again); err != nil {
				t.Fatalf("Commit: %v", err)
			}
			got, info := readBlob(t, s, d)
			if !bytes.Equal(got, data) {
				t.Fatal("restored bytes differ")
			}
			if info.Origin != tt.want {
				t.Fatalf("origin = %v, want %v", info.Origin, tt.want)
			}
			if n := countKeys(t, s, prefixBlob); n != 1 {
				t.Fatalf("%d blob index entries", n)
			}
			assertTmpEmpty(t, dir)
		})
	}
}

func TestCancel(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(5000, 11)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	writeAll(t, w, data, 1000)
	r := follow(t, w, context.Background())
	w.Cancel()
	w.Cancel() // twice is fine
	assertTmpEmpty(t, dir)
	if _, err := r.Read(make([]byte, 10)); !errors.Is(err, ErrCanceled) {
		t.Fatalf("follower Read after Cancel = %v, want ErrCanceled", err)
	}
	if _, err := w.Follow(context.Background()); !errors.Is(err, ErrCanceled) {
		t.Fatalf("Follow after Cancel = %v, want ErrCanceled", err)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, ErrCanceled) {
		t.Fatalf("Write after Cancel = %v, want ErrCanceled", err)
	}
	if err := w.Commit(d, int64(len(data)), OriginPushed); !errors.Is(err, ErrCanceled) {
		t.Fatalf("Commit after Cancel = %v, want ErrCanceled", err)
	}
	assertNotStored(t, s, dir, d)
	assertTmpEmpty(t, dir)
}

func TestCancelAfterCommitIsNoop(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(5000, 12)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	writeAll(t, w, data, 1000)
	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	w.Cancel()
	w.Abort(errors.New("late abort"))
	if got, _ := readBlob(t, s, d); !bytes.Equal(got, data) {
		t.Fatal("blob gone or changed after Cancel")
	}
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v", files)
	}
	// The writer still serves followers: its bytes are stored and final.
	r := follow(t, w, context.Background())
	if got, err := io.ReadAll(r); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Follow after Commit+Cancel: %d bytes, %v", len(got), err)
	}
}

func TestWriteAfterCommit(t *testing.T) {
	s, _ := newStore(t)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, []byte("abc"), 3)
	if err := w.Commit(digest.FromString("abc"), 3, OriginPulled); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("d")); err == nil {
		t.Fatal("Write after Commit succeeded")
	}
	if got, _ := readBlob(t, s, digest.FromString("abc")); string(got) != "abc" {
		t.Fatalf("blob = %q", got)
	}
}

// A second Commit of a committed writer (a retry, a confused caller) must
// never touch the stored blob.
func TestCommitTwiceKeepsBlob(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(4096, 13)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 4096)
	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatalf("second Commit of the same digest: %v", err)
	}
	if err := w.Commit(digest.FromString("other"), -1, OriginPulled); err == nil {
		t.Fatal("Commit of a committed writer under another digest succeeded")
	}
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v, want the blob still there", files)
	}
	if got, _ := readBlob(t, s, d); !bytes.Equal(got, data) {
		t.Fatal("blob changed")
	}
	assertTmpEmpty(t, dir)
}

func TestOpenBlobMissing(t *testing.T) {
	s, _ := newStore(t)
	d := digest.FromString("never stored")
	if _, err := s.StatBlob(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("StatBlob = %v", err)
	}
	if _, _, err := s.OpenBlob(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenBlob = %v", err)
	}
}

// The follower contract, step by step: nothing before the first write, all
// but the last byte while writing, the last byte and io.EOF only after
// Commit, and the path moving under it does not matter.
func TestFollowHoldsLastByteUntilCommit(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(10000, 14)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()

	r := follow(t, w, context.Background())
	pending := readAsync(r, len(data))
	assertBlocked(t, pending, "before any write")

	// One byte written is still nothing visible.
	writeAll(t, w, data[:1], 1)
	assertBlocked(t, pending, "after one byte")

	writeAll(t, w, data[1:2], 1)
	res := await(t, pending, "after two bytes")
	if res.err != nil || !bytes.Equal(res.b, data[:1]) {
		t.Fatalf("first Read = %d bytes, %v; want the first byte", len(res.b), res.err)
	}

	writeAll(t, w, data[2:], 777)
	rest := make([]byte, len(data)-2) // everything but the last byte
	if _, err := io.ReadFull(r, rest); err != nil {
		t.Fatalf("ReadFull: %v", err)
	}
	if !bytes.Equal(rest, data[1:len(data)-1]) {
		t.Fatal("follower bytes differ")
	}
	last := readAsync(r, 100)
	assertBlocked(t, last, "last byte before Commit")

	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	res = await(t, last, "last byte after Commit")
	if res.err != nil || !bytes.Equal(res.b, data[len(data)-1:]) {
		t.Fatalf("Read after Commit = %q, %v; want the last byte", res.b, res.err)
	}
	if n, err := r.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("Read at end = %d, %v; want 0, io.EOF", n, err)
	}

	// The temp file is gone (renamed into place); a new follower opens the
	// stored file and reads everything.
	assertTmpEmpty(t, dir)
	late := follow(t, w, context.Background())
	if got, err := io.ReadAll(late); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("follower after Commit: %d bytes, %v", len(got), err)
	}
}

func TestFollowAbort(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(3000, 15)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 1000)
	r := follow(t, w, context.Background())
	head := make([]byte, len(data)-1)
	if _, err := io.ReadFull(r, head); err != nil {
		t.Fatal(err)
	}
	pending := readAsync(r, 10)
	idle := follow(t, w, context.Background()) // never read yet
	assertBlocked(t, pending, "before Abort")

	cause := errors.New("upstream went away")
	w.Abort(cause)
	if res := await(t, pending, "after Abort"); len(res.b) != 0 || !errors.Is(res.err, cause) {
		t.Fatalf("blocked follower got %d bytes, %v; want %v", len(res.b), res.err, cause)
	}
	// A follower with bytes still unread gets the error too: a failed
	// blob is not served in part.
	if _, err := idle.Read(make([]byte, 10)); !errors.Is(err, cause) {
		t.Fatalf("idle follower Read = %v, want %v", err, cause)
	}
	if _, err := w.Follow(context.Background()); !errors.Is(err, cause) {
		t.Fatalf("Follow after Abort = %v, want %v", err, cause)
	}
	// The first cause sticks.
	w.Abort(errors.New("second"))
	w.Cancel()
	if _, err := w.Follow(context.Background()); !errors.Is(err, cause) {
		t.Fatalf("Follow after second Abort = %v, want the first cause", err)
	}
	assertTmpEmpty(t, dir)
}

// A follower that learns a write failed finds its temp file gone: a fill
// that failed leaves nothing behind by the time its waiters hear of it,
// so a retry they make does not meet its remains.
func TestAbortRemovesTheTempFileBeforeFollowersHear(t *testing.T) {
	s, dir := newStore(t)
	for i := range 50 {
		w, err := s.NewBlobWriter("")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(testBytes(4096, byte(i))); err != nil {
			t.Fatal(err)
		}
		r := follow(t, w, context.Background())
		if _, err := io.ReadFull(r, make([]byte, 4095)); err != nil {
			t.Fatal(err)
		}
		pending := readAsync(r, 10)
		assertBlocked(t, pending, "before Abort")
		go w.Abort(errors.New("upstream went away"))
		if res := await(t, pending, "after Abort"); res.err == nil {
			t.Fatal("a follower of an aborted write read on")
		}
		assertTmpEmpty(t, dir)
		r.Close()
	}
}

func TestFollowContextCancel(t *testing.T) {
	s, _ := newStore(t)
	data := testBytes(100, 16)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	writeAll(t, w, data, 100)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := follow(t, w, ctx)
	other := follow(t, w, context.Background())
	if _, err := io.ReadFull(r, make([]byte, 99)); err != nil {
		t.Fatal(err)
	}
	pending := readAsync(r, 10)
	assertBlocked(t, pending, "before ctx cancel")
	cancel()
	if res := await(t, pending, "after ctx cancel"); len(res.b) != 0 || !errors.Is(res.err, context.Canceled) {
		t.Fatalf("Read = %d bytes, %v; want context.Canceled", len(res.b), res.err)
	}
	// One reader leaving does not disturb the writer or other followers.
	if err := w.Commit(digest.FromBytes(data), 100, OriginPulled); err != nil {
		t.Fatalf("Commit after a follower left: %v", err)
	}
	if got, err := io.ReadAll(other); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("other follower: %d bytes, %v", len(got), err)
	}
}

func TestFollowZeroLengthRead(t *testing.T) {
	s, _ := newStore(t)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	r := follow(t, w, context.Background())
	// A zero-length Read must not block even with nothing written.
	done := make(chan error, 1)
	go func() { _, err := r.Read(nil); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Read(nil) = %v", err)
		}
	case <-time.After(waitLong):
		t.Fatal("Read(nil) blocked")
	}
}

// Streaming a few MiB to followers that join at different times, under -race.
func TestFollowStreaming(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(2<<20+11, 17)
	d := digest.FromBytes(data)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()

	type got struct {
		name string
		b    []byte
		err  error
	}
	results := make(chan got, 3)
	readAll := func(name string, r io.Reader) {
		b, err := io.ReadAll(r)
		results <- got{name, b, err}
	}
	go readAll("before", follow(t, w, context.Background()))

	half := len(data) / 2
	writeAll(t, w, data[:half], 32<<10)
	go readAll("middle", follow(t, w, context.Background()))
	writeAll(t, w, data[half:], 32<<10)
	if err := w.Commit(d, int64(len(data)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	go readAll("after", follow(t, w, context.Background()))

	deadline := time.After(waitLong)
	for range 3 {
		select {
		case g := <-results:
			if g.err != nil || !bytes.Equal(g.b, data) {
				t.Errorf("%s follower: %d bytes, %v", g.name, len(g.b), g.err)
			}
		case <-deadline:
			t.Fatal("followers did not finish")
		}
	}
	assertTmpEmpty(t, dir)
}

// Followers of many writers of one digest racing their commits: everyone
// reads the whole blob, one copy is stored.
func TestFollowConcurrentWritersSameDigest(t *testing.T) {
	s, dir := newStore(t)
	data := testBytes(128<<10, 18)
	d := digest.FromBytes(data)
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, 2*writers)
	for range writers {
		w, err := s.NewBlobWriter("")
		if err != nil {
			t.Fatal(err)
		}
		r := follow(t, w, context.Background())
		wg.Add(2)
		go func() {
			defer wg.Done()
			defer w.Cancel()
			for rest := data; len(rest) > 0; {
				n := min(8<<10, len(rest))
				if _, err := w.Write(rest[:n]); err != nil {
					errs <- err
					return
				}
				rest = rest[n:]
			}
			errs <- w.Commit(d, int64(len(data)), OriginPulled)
		}()
		go func() {
			defer wg.Done()
			b, err := io.ReadAll(r)
			if err == nil && !bytes.Equal(b, data) {
				err = errors.New("follower bytes differ")
			}
			errs <- err
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitLong):
		t.Fatal("writers and followers did not finish")
	}
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if files := blobFiles(t, dir); len(files) != 1 {
		t.Fatalf("blobs/ = %v", files)
	}
	if n := countKeys(t, s, prefixBlob); n != 1 {
		t.Fatalf("%d blob index entries", n)
	}
	assertTmpEmpty(t, dir)
}

func TestClosedStore(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(context.Background()); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	d := digest.FromString("x")
	if _, err := s.StatBlob(d); !errors.Is(err, ErrClosed) {
		t.Fatalf("StatBlob after Close = %v, want ErrClosed", err)
	}
	if _, err := s.GetManifest(d); !errors.Is(err, ErrClosed) {
		t.Fatalf("GetManifest after Close = %v, want ErrClosed", err)
	}
	if err := s.SetTag("", "r", "t", Tag{Digest: d}); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetTag after Close = %v, want ErrClosed", err)
	}
	if err := s.Ping(context.Background()); err == nil {
		t.Fatal("Ping after Close succeeded")
	}
}
