package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// clock is an injected clock that moves only when told.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func openLife(t *testing.T, dir string, o Options) *Store {
	t.Helper()
	o.MaintenanceInterval = time.Hour // passes run when the test asks
	o.GCEvery = -1
	s, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func blobOf(i, size int) ([]byte, digest.Digest) {
	b := bytes.Repeat([]byte{byte(i)}, size)
	copy(b, fmt.Sprint(i))
	return b, digest.FromBytes(b)
}

func put(t *testing.T, s *Store, b []byte, o Origin) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := s.PutBlob(bytes.NewReader(b), d, o); err != nil {
		t.Fatal(err)
	}
	return d
}

func has(s *Store, d digest.Digest) bool {
	_, err := s.StatBlob(d)
	return err == nil
}

// A stream of pulls over a budget: the least recently used pulled blobs go
// first, the total ends at or under the low mark, and pushed, pinned and
// recently used blobs stay.
func TestEvictionOrderAndBudget(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	// The low mark (5200) leaves room for the manifest, which counts too.
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, MaxSize: 10 * 1000, LowWatermark: 0.52, HighWatermark: 0.95,
		Pins: []Pin{{NS: "up.example", Repo: "library/golang", Tag: "1.*"}}})

	pushed := put(t, s, bytes.Repeat([]byte("P"), 1000), OriginPushed)
	// A pinned image: a manifest, tagged, referencing one layer.
	layer := put(t, s, bytes.Repeat([]byte("L"), 1000), OriginPulled)
	man := []byte(fmt.Sprintf(`{"schemaVersion":2,"layers":[{"digest":%q}]}`, layer))
	md := digest.FromBytes(man)
	if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: md, Bytes: man, MediaType: "application/vnd.oci.image.manifest.v1+json", Origin: OriginPulled}}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTag("up.example", "library/golang", "1.22", Tag{Digest: md, FetchedAt: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	var pulled []digest.Digest
	for i := range 6 {
		clk.Add(time.Minute)
		b, _ := blobOf(i, 1000)
		pulled = append(pulled, put(t, s, b, OriginPulled))
	}
	// Blob 0 is used again: it is now the most recent.
	clk.Add(time.Minute)
	f, _, err := s.OpenBlob(pulled[0])
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if st := s.Stats(); st.BlobBytes != 8000 || st.Blobs != 8 || st.Manifests != 1 || st.Bytes != 8000+int64(len(man)) {
		t.Fatalf("stats = %+v, want 8 blobs, 8000 bytes, and the manifest", st)
	}
	// Past the high mark (9500): evicts down to the low mark (5200).
	clk.Add(time.Minute)
	b, _ := blobOf(6, 1000)
	pulled = append(pulled, put(t, s, b, OriginPulled))
	clk.Add(time.Minute)
	b, _ = blobOf(7, 1000)
	pulled = append(pulled, put(t, s, b, OriginPulled))
	if _, err := s.EvictToBudget(); err != nil {
		t.Fatal(err)
	}
	if got := s.Stats().Bytes; got > 5200 {
		t.Fatalf("after eviction %d bytes, want <= 5200", got)
	}
	for _, d := range []digest.Digest{pushed, layer} {
		if !has(s, d) {
			t.Errorf("%s (pushed or pinned) was evicted", d)
		}
	}
	// 10 blobs and a manifest (10115 bytes) -> 5200: the 5 oldest pulled
	// blobs go: 1..5.
	for i, d := range pulled {
		want := i == 0 || i >= 6
		if has(s, d) != want {
			t.Errorf("blob %d present = %v, want %v", i, !want, want)
		}
		if !want {
			if _, err := os.Stat(s.blobPath(d)); !os.IsNotExist(err) {
				t.Errorf("blob %d: file still there", i)
			}
		}
	}
	if st := s.Stats(); st.Evicted != 5 || st.Blobs != 5 {
		t.Errorf("stats = %+v, want 5 evicted, 5 left", st)
	}
}

// Access times survive a restart (flushed on Close) and the running totals
// are recomputed from the index.
func TestAccessTimesPersist(t *testing.T) {
	dir := t.TempDir()
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s, err := Open(dir, Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	a := put(t, s, []byte("aaaa"), OriginPulled)
	clk.Add(time.Minute)
	bd := put(t, s, []byte("bbbb"), OriginPulled)
	clk.Add(time.Minute)
	s.Touch(a)
	s.Close()
	s = openLife(t, dir, Options{Now: clk.Now, MaxSize: 1000})
	if st := s.Stats(); st.Bytes != 8 || st.Blobs != 2 {
		t.Fatalf("stats after restart = %+v", st)
	}
	if _, err := s.Evict(4, false); err != nil {
		t.Fatal(err)
	}
	if !has(s, a) || has(s, bd) {
		t.Fatalf("evicted the wrong blob: a=%v b=%v", has(s, a), has(s, bd))
	}
}

// A blob a reader holds open is not evicted under it; once closed, it is.
func TestEvictionSkipsOpenReaders(t *testing.T) {
	s := openLife(t, t.TempDir(), Options{MaxSize: 1 << 20})
	b, _ := blobOf(1, 4096)
	d := put(t, s, b, OriginPulled)
	f, _, err := s.OpenBlob(d)
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.Evict(0, false)
	if err != nil {
		t.Fatal(err)
	}
	if r.Blobs != 0 || !has(s, d) {
		t.Fatalf("evicted a blob with an open reader: %+v", r)
	}
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, b) {
		t.Fatalf("reader got %d bytes, %v", len(got), err)
	}
	f.Close()
	if r, _ := s.Evict(0, false); r.Blobs != 1 || has(s, d) {
		t.Fatalf("closed blob not evicted: %+v", r)
	}
}

// A follower of a fill becomes a reader of the committed blob.
func TestEvictionSkipsFollowers(t *testing.T) {
	s := openLife(t, t.TempDir(), Options{MaxSize: 1 << 20})
	b, d := blobOf(2, 4096)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	rc, err := w.Follow(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(d, int64(len(b)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Evict(0, false); r.Blobs != 0 {
		t.Fatalf("evicted under a follower: %+v", r)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, b) {
		t.Fatal("follower read wrong bytes")
	}
	if r, _ := s.Evict(0, false); r.Blobs != 1 {
		t.Fatalf("not evicted after the follower closed: %+v", r)
	}
}

// Dry run reports and removes nothing.
func TestEvictDryRun(t *testing.T) {
	s := openLife(t, t.TempDir(), Options{MaxSize: 100})
	put(t, s, []byte("xxxxxxxx"), OriginPulled)
	r, err := s.Evict(0, true)
	if err != nil || r.Blobs != 1 || r.Bytes != 8 || s.Stats().Blobs != 1 {
		t.Fatalf("dry run: %+v %v, stats %+v", r, err, s.Stats())
	}
}

// GC removes blobs no linked or tagged manifest references, after the
// grace period only.
func TestGC(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, GCGrace: time.Hour})
	kept := put(t, s, []byte("layer kept"), OriginPushed)
	orphan := put(t, s, []byte("layer orphaned"), OriginPushed)
	man := []byte(fmt.Sprintf(`{"schemaVersion":2,"layers":[{"digest":%q}]}`, kept))
	md := digest.FromBytes(man)
	if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: md, Bytes: man, Origin: OriginPushed}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Link("", "app", md, kept, orphan); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.GC(GCOptions{}); r.Blobs != 0 {
		t.Fatalf("GC within the grace period removed %+v", r)
	}
	clk.Add(2 * time.Hour)
	r, err := s.GC(GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Blobs != 1 || has(s, orphan) || !has(s, kept) {
		t.Fatalf("GC: %+v; orphan present %v, kept present %v", r, has(s, orphan), has(s, kept))
	}
	// The manifest is deleted (unlinked): its layer goes next.
	s.Unlink("", "app", md)
	if r, _ := s.GC(GCOptions{}); r.Blobs != 1 || has(s, kept) {
		t.Fatalf("GC after manifest delete: %+v", r)
	}
}

// Startup recovery: leftover temp files go (a live upload's stays), an
// entry without its file is dropped, a verified file without an entry is
// adopted, a bad one is removed.
func TestRecovery(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	up, err := s.CreateUpload("app", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendUpload(up.ID, 0, bytes.NewReader([]byte("part")), 4, time.Hour); err != nil {
		t.Fatal(err)
	}
	gone := put(t, s, []byte("file vanished"), OriginPulled)
	kept := put(t, s, []byte("kept"), OriginPushed)
	s.Close()

	os.Remove(filepath.Join(dir, "blobs", "sha256", gone.Encoded()[:2], gone.Encoded()))
	os.WriteFile(filepath.Join(dir, "tmp", "leftover"), []byte("partial"), 0o644)
	good := []byte("adopt me")
	gd := digest.FromBytes(good)
	os.MkdirAll(filepath.Join(dir, "blobs", "sha256", gd.Encoded()[:2]), 0o755)
	os.WriteFile(filepath.Join(dir, "blobs", "sha256", gd.Encoded()[:2], gd.Encoded()), good, 0o644)
	bad := digest.FromString("something else")
	os.MkdirAll(filepath.Join(dir, "blobs", "sha256", bad.Encoded()[:2]), 0o755)
	badPath := filepath.Join(dir, "blobs", "sha256", bad.Encoded()[:2], bad.Encoded())
	os.WriteFile(badPath, []byte("not it"), 0o644)

	s = openLife(t, dir, Options{})
	if has(s, gone) || !has(s, kept) || !has(s, gd) || has(s, bad) {
		t.Fatalf("after recovery: gone %v kept %v adopted %v bad %v", has(s, gone), has(s, kept), has(s, gd), has(s, bad))
	}
	if _, err := os.Stat(badPath); !os.IsNotExist(err) {
		t.Error("bad file not removed")
	}
	if _, err := os.Stat(filepath.Join(dir, "tmp", "leftover")); !os.IsNotExist(err) {
		t.Error("leftover temp file not removed")
	}
	if u, err := s.GetUpload(up.ID); err != nil || u.Size != 4 {
		t.Fatalf("live upload lost: %+v %v", u, err)
	}
	if _, err := s.AppendUpload(up.ID, 4, bytes.NewReader([]byte("more")), 4, time.Hour); err != nil {
		t.Fatalf("live upload's file removed: %v", err)
	}
	if st := s.Stats(); st.Blobs != 2 || st.Bytes != int64(len("kept")+len(good)) {
		t.Errorf("stats = %+v", st)
	}
}

// Verify finds a flipped byte, a truncated file and a missing one; pulled
// blobs leave the index (a pull refills them), a pushed one is quarantined.
func TestVerifyCorruption(t *testing.T) {
	s := openLife(t, t.TempDir(), Options{})
	ok := put(t, s, []byte("fine"), OriginPulled)
	flip := put(t, s, []byte("flip a byte"), OriginPulled)
	short := put(t, s, []byte("truncate me"), OriginPulled)
	pushed := put(t, s, []byte("pushed and broken"), OriginPushed)
	p := s.blobPath(flip)
	b, _ := os.ReadFile(p)
	b[0] ^= 0xff
	os.WriteFile(p, b, 0o644)
	os.Truncate(s.blobPath(short), 3)
	os.Remove(s.blobPath(pushed))
	junk := digest.FromString("an unreadable index entry")
	if err := s.ix.set(keyBlob(junk), []byte("x")); err != nil {
		t.Fatal(err)
	}

	quick, err := s.Verify(context.Background(), VerifyOptions{Quick: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(quick.Problems) != 3 {
		t.Fatalf("quick verify found %+v, want the short, missing and unreadable blobs", quick.Problems)
	}
	var calls int
	r, err := s.Verify(context.Background(), VerifyOptions{Progress: func(done, total int64) { calls++ }})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Problems) != 1 || r.Problems[0].Digest != flip || r.Problems[0].Action != "removed" || calls == 0 {
		t.Fatalf("verify: %+v (progress calls %d)", r, calls)
	}
	for _, p := range quick.Problems {
		if p.Digest == pushed && p.Action != "quarantined" {
			t.Errorf("pushed blob: %+v", p)
		}
	}
	if !has(s, ok) || has(s, flip) || has(s, short) || has(s, pushed) {
		t.Fatal("index after verify is wrong")
	}
	if r, _ := s.Verify(context.Background(), VerifyOptions{}); !r.OK() || r.Blobs != 1 {
		t.Fatalf("second verify: %+v", r)
	}
	// The next fill stores it again.
	put(t, s, []byte("flip a byte"), OriginPulled)
	if !has(s, flip) {
		t.Fatal("refill failed")
	}
}

type fullDisk struct {
	w    io.Writer
	room *int64
	mu   *sync.Mutex
}

func (f fullDisk) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if int64(len(p)) > *f.room {
		return 0, &os.PathError{Op: "write", Path: "blob", Err: syscall.ENOSPC}
	}
	*f.room -= int64(len(p))
	return f.w.Write(p)
}

// A full disk: the write fails with ErrNoSpace, no temp file is left, the
// index is untouched, and once there is room the same blob is stored.
func TestNoSpace(t *testing.T) {
	var mu sync.Mutex
	room := int64(100)
	dir := t.TempDir()
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, dir, Options{Now: clk.Now, WrapWrite: func(w io.Writer) io.Writer { return fullDisk{w, &room, &mu} }})
	up, err := s.CreateUpload("app", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, d := blobOf(3, 1000)
	err = s.PutBlob(bytes.NewReader(b), d, OriginPulled)
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("err = %v, want ErrNoSpace", err)
	}
	if has(s, d) {
		t.Fatal("indexed after a failed write")
	}
	// Until space is freed (or a while passed), new writes fail fast.
	if _, err := s.NewBlobWriter(""); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("new writer on a full disk: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(ents) != 1 {
		t.Fatalf("temp files: %v, want the upload's only", ents)
	}
	clk.Add(time.Minute)
	if _, err := s.AppendUpload(up.ID, 0, bytes.NewReader(b), -1, time.Hour); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("upload err = %v, want ErrNoSpace", err)
	}
	mu.Lock()
	room = 1 << 20
	mu.Unlock()
	clk.Add(time.Minute)
	if err := s.PutBlob(bytes.NewReader(b), d, OriginPulled); err != nil || !has(s, d) {
		t.Fatalf("after freeing space: %v", err)
	}
	if _, err := s.AppendUpload(up.ID, 0, bytes.NewReader(b), -1, time.Hour); err != nil {
		t.Fatalf("upload after freeing space: %v", err)
	}
}

// Close waits for the maintenance loops; a pass asked for just before Close
// does not outlive it.
func TestCloseWaitsForMaintenance(t *testing.T) {
	s, err := Open(t.TempDir(), Options{MaxSize: 10, MaintenanceInterval: time.Millisecond, GCEvery: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		b, _ := blobOf(i, 100)
		put(t, s, b, OriginPulled)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}
